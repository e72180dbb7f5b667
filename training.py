"""The pieces of training that train.py and bench.py share: mixed precision, image features from the
feature cache, the data loaders, one optimizer step over micro-batches, the validation loss, and the
metrics log a run writes as it goes."""
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import dataset
from cli import DTYPES, UserError
from files import atomic_write
from distributed import EpochSampler, ignore_ctrl_c
from model import decoder_sizes


def autocast(device, dtype_name: str):
    """Mixed precision: matmuls and convolutions in --dtype; the weights and the loss stay float32."""
    dtype = DTYPES[dtype_name]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def to_device(batch: dict, device) -> dict:
    """Moves a batch; images go channels-last, the layout the CNN's convolutions run fastest in."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if "images" in batch and batch["images"].dim() == 4:  # (an album batch is 5-d; its images go flat)
        batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)
    return batch


@torch.no_grad()
def cached_features(model, examples, run, *, images_dir, cache_dir, dtype, batch_size, num_workers) -> dict | None:
    """{image name: pooled features} for every image, read from the feature cache or encoded once and
    written there (cache_dir: its folder; None turns it off). None where the cache does not apply: turned
    off, or the encoder is being trained. dtype: the name of the --dtype the encoder runs in."""
    if cache_dir is None:
        return None
    if model.config.train_encoder:
        run.log("feature cache: not used, the encoder is being trained (--no-train-encoder freezes it)")
        return None
    config = model.config
    transform = dataset.image_transform(config)
    cache = dataset.FeatureCache(cache_dir, dataset.encoder_fingerprint(model, transform, config.resize_size, dtype),
                                 config.feature_dim)
    names = sorted({name for ex in examples for name in ex.images})
    keys = {name: cache.key(Path(images_dir) / name) for name in names}
    features = {name: cache.load(keys[name]) for name in names}
    missing = [name for name in names if features[name] is None]
    if run.world_size > 1:
        dist.barrier()  # all processes have looked before any writes, so they agree on what is missing

    def encode(todo):
        loader = DataLoader(dataset.ImageDataset(todo, images_dir, transform, config.resize_size),
                            batch_size=batch_size, num_workers=num_workers, worker_init_fn=ignore_ctrl_c,
                            generator=torch.Generator())  # draws nothing from the global random state
        done = 0
        for images in tqdm(loader, desc="encoding images", leave=False, disable=None if run.main else True):
            with autocast(run.device, dtype):
                batch = model.encode(images.to(run.device).contiguous(memory_format=torch.channels_last))  # (B, feature_dim)
            for name, row in zip(todo[done:done + len(batch)], batch.float().cpu()):
                cache.save(keys[name], row)
                features[name] = row
            done += len(batch)

    encode(missing[run.rank::run.world_size])  # under torchrun each process encodes its share
    if run.world_size > 1:
        dist.barrier()  # the other processes' shares are on disk now
        features.update({name: cache.load(keys[name]) for name in missing})
        # Machines of a multi-node run may not share a disk: what another one wrote, encode here too.
        encode([name for name in missing if features[name] is None])
    run.log(f"feature cache: {len(names) - len(missing)} of {len(names)} images read from {cache.dir}, "
            f"{len(missing)} encoded")
    return features


def make_loaders(model, tokenizer, examples, run, *, images_dir, stories_path, batch_size, num_workers, val_split,
                 seed, features=None, prompts=None, val_on_every_rank=False):
    """Training and validation loaders; batches carry images, or cached features when given. The first
    process alone computes the validation loss, unless val_on_every_rank (FSDP, whose processes each
    hold a shard of the model, so every one takes part in every forward)."""
    config = model.config
    context = decoder_sizes(model.decoder.config)[2]
    max_tokens = context - config.prefix_tokens
    if max_tokens < 2:  # a story needs at least one token and its end-of-text
        most = context - 2 - (config.prefix_tokens - config.prefix_length)
        raise UserError(f"--prefix-length {config.prefix_length} leaves no room for a story in the decoder's "
                        f"{context} positions; use at most {most}")
    train_examples, val_examples = dataset.split_by_image(examples, val_split, seed)
    make_set = partial(dataset.StoryDataset, images_dir=images_dir, tokenizer=tokenizer,
                       transform=dataset.image_transform(config), max_tokens=max_tokens, min_side=config.resize_size,
                       style_id=config.style_id if config.styles else None, features=features,
                       album=config.album_slots > 1, length_bucket=config.length_bucket if config.length_buckets else None,
                       prompts=prompts)
    train_set = make_set(train_examples)
    val_set = make_set(val_examples) if val_examples else None
    cut = sorted(train_set.truncated + (val_set.truncated if val_set is not None else []))
    if cut and run.main:  # long stories are cut, not refused: one line, counting them all
        lines = ", ".join(map(str, cut[:10])) + (", ..." if len(cut) > 10 else "")
        print(f"warning: {stories_path}: {len(cut)} of {len(examples)} stories are longer than the {max_tokens} "
              f"tokens the model has room for and were cut (lines {lines})", file=sys.stderr)
    common = dict(batch_size=batch_size, collate_fn=partial(dataset.collate, pad_id=tokenizer.pad_token_id),
                  num_workers=num_workers, pin_memory=run.device.type == "cuda", worker_init_fn=ignore_ctrl_c,
                  persistent_workers=num_workers > 0)
    sampler = EpochSampler(train_set, num_replicas=run.world_size, rank=run.rank, seed=seed)
    # Its own generator, so that starting an epoch draws nothing from the global random state.
    loader = DataLoader(train_set, sampler=sampler, generator=torch.Generator().manual_seed(seed), **common)
    val_loader = (DataLoader(val_set, generator=torch.Generator().manual_seed(seed), **common)
                  if val_set is not None and (run.main or val_on_every_rank) else None)
    n_images = len({name for ex in train_examples for name in ex.images})
    albums = sum(len(ex.images) > 1 for ex in examples)
    run.log(f"data: {len(train_examples)} stories of {n_images} images for training, "
            f"{len(val_examples)} stories held out for validation"
            + (f"; {albums} of the stories are about albums of up to {config.album_slots} images" if albums else ""))
    if config.length_buckets:
        short, medium = config.length_buckets
        run.log(f"lengths: short up to {short} tokens, medium up to {medium}, long above")
    if config.styles:
        unstyled = sum(ex.style is None for ex in examples)
        run.log(f"styles: {', '.join(config.styles)}"
                + (f" ({unstyled} stories without a style train the unstyled case)" if unstyled else ""))
    return loader, val_loader


def checkpoint_activations(decoder) -> None:
    """--gradient-checkpointing: each decoder block keeps only its input for the backward pass and runs
    its forward again there, instead of keeping every activation inside it (transformers' own switch).
    Non-reentrant, torch's recommended variant: it works under FSDP and needs no input that requires grad."""
    decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# ----------------------------------------------------------------------------- one step

def forward_backward(model, micro_batches, device, amp, scaler, world_size=1) -> torch.Tensor:
    """Adds up the gradient of one optimizer step over its micro-batches and returns the mean loss per
    story token. Each micro-batch counts by its share of the step's story tokens, so --grad-accum 2 at
    --batch-size 8 gives the gradient of one batch of 16. Under torchrun (world_size processes, DDP or
    FSDP) the share is of every process's tokens, so 2 processes at --batch-size 8 also give the
    gradient of one batch of 16, and every process returns the loss of all of them."""
    tokens = [int(batch["attention_mask"].sum()) for batch in micro_batches]
    per_process = float(sum(tokens))  # story tokens of a process: its own, or all processes' mean
    if world_size > 1:
        # DDP and FSDP average the processes' gradients: a loss scaled by world_size x this process's
        # share of all the tokens averages to the gradient of one batch of all of them. (Without it each
        # process's stories weigh as much as the other's, whatever their lengths.)
        count = torch.tensor(per_process, device=device)
        dist.all_reduce(count)
        per_process = count.item() / world_size
    total = torch.zeros((), device=device)
    for i, (batch, n) in enumerate(zip(micro_batches, tokens)):
        last = i == len(micro_batches) - 1
        # Under DDP only the last micro-batch averages the gradient across processes. (FSDP reduces
        # every micro-batch's into the shards: skipping it would keep whole gradients, the memory FSDP saves.)
        sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext()
        with sync:
            with amp():
                loss = model(**to_device(batch, device)).loss * (n / per_process)
            scaler.scale(loss).backward()
        total += loss.detach()
    if world_size > 1:
        dist.all_reduce(total)
        total /= world_size
    return total


def optimizer_step(optimizer, scheduler, scaler, params, grad_clip):
    scaler.unscale_(optimizer)  # clip the true gradient (the scaler only scales with float16)
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def validation_loss(model, loader, device, amp=nullcontext):
    """Mean loss per story token over a loader."""
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        batch = to_device(batch, device)
        n = int(batch["attention_mask"].sum())
        with amp():
            total += model(**batch).loss.item() * n
        count += n
    model.train()
    return total / max(count, 1)


# ----------------------------------------------------------------------------- the metrics log

def metrics_path(checkpoint) -> Path:
    """Where train.py logs a checkpoint's metrics: vlm_model.pt -> vlm_model.metrics.jsonl beside it."""
    return Path(checkpoint).with_suffix(".metrics.jsonl")


def _logged_step(line: str) -> float:
    """The step of one metrics-log line; a line cut short by a kill counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class MetricsLog:
    """One JSON object per line ({"step": 12, "epoch": 1, "train_loss": 3.2, "lr": 1e-3, "time": 4.1}),
    flushed as it goes, so a crashed run keeps its curve; `evaluate.py --curves` draws it. The same
    values go to TensorBoard (runs/<name> beside the log) when tensorboard is installed.
    resume_step=N continues the log of a run resumed at step N: records after N (logged before a
    kill, and trained again now) are dropped first, so each step appears once.

    A new run over an existing log writes .NAME.new beside it until saved() says its first
    checkpoint is written: the previous checkpoint keeps its own curve until it is replaced."""

    def __init__(self, path, resume_step: int | None = None):
        self.path = Path(path)
        self.pending = None
        try:
            if resume_step is not None and self.path.is_file():
                kept = [line for line in self.path.read_text(encoding="utf-8").splitlines(keepends=True)
                        if _logged_step(line) <= resume_step]
                with atomic_write(self.path) as f:
                    f.writelines(kept)
            elif resume_step is None and self.path.exists():
                self.pending = self.path.with_name(f".{self.path.name}.new")
            self.file = open(self.pending or self.path, "a" if resume_step is not None else "w", encoding="utf-8")
        except OSError as err:
            raise UserError(f"{self.path}: cannot write the metrics log ({err.strerror}); choose another --out") from None
        self.start = time.time()
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs `pip install tensorboard`; optional
        except ImportError:
            return
        self.tensorboard = SummaryWriter(self.path.parent / "runs" / self.path.name.removesuffix(".metrics.jsonl"))

    def write(self, step: int, **values) -> None:
        self.file.write(json.dumps({"step": step, **values, "time": round(time.time() - self.start, 3)}) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in values.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, step)

    def saved(self) -> None:
        """The run's checkpoint is written: from now on this is its log."""
        if self.pending is not None:
            os.replace(self.pending, self.path)  # the open file keeps writing to it under its new name
            self.pending = None

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def __str__(self):
        return str(self.path) + (f" and TensorBoard {self.tensorboard.log_dir}" if self.tensorboard else "")


