"""Trains the image-to-story model on data/images + data/stories.txt and writes vlm_model.pt.

    python train.py                      # ResNet-50 + GPT-2 small, pretrained weights
    python train.py --preset tiny        # toy sizes, random weights, fully offline (about a minute on CPU)
    python train.py --encoder clip-vit-b32 --mapper transformer --lora    # CLIP, ClipCap's mapper, LoRA
"""
import argparse
import math
import random
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import GPT2Config, get_cosine_schedule_with_warmup

import dataset
import utils
from model import MAPPERS, StoryConfig, StoryModel
from utils import UserError

# Defaults that depend on the preset; a flag given on the command line wins.
PRESETS = {
    "gpt2": dict(epochs=10, batch_size=16, lr=2e-5, image_size=224, resize_size=232, train_encoder=False,
                 feature_norm=False),
    # Toy sizes for offline runs and tests. The random encoder is trained: frozen random
    # features tell shapes apart poorly (see README, "The tiny preset").
    "tiny": dict(epochs=40, batch_size=16, lr=1e-3, image_size=64, resize_size=64, train_encoder=True, feature_norm=True,
                 n_layer=2, n_head=4, n_embd=128, n_positions=128, vocab_size=2000),
}


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


LORA_TARGETS = ["c_attn", "c_proj", "c_fc"]  # GPT-2's attention q/k/v, attention and MLP outputs, MLP input


def lora_targets(value):
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names or set(names) - set(LORA_TARGETS):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list from {', '.join(LORA_TARGETS)}, got {value!r}")
    return sorted(set(names))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="data/images", help="folder the image names are relative to (default: %(default)s)")
    p.add_argument("--stories", default="data/stories.txt", help="image_name<TAB>story lines (default: %(default)s)")
    p.add_argument("--out", default="vlm_model.pt", help="checkpoint to write (default: %(default)s)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpt2",
                   help="gpt2: ResNet-50 + GPT-2 small, pretrained; tiny: toy sizes, random weights, offline")
    p.add_argument("--epochs", type=positive_int, help="passes over the data (gpt2: 10, tiny: 40)")
    p.add_argument("--batch-size", type=positive_int, help="stories per step (default: 16)")
    p.add_argument("--lr", type=positive_float, help="peak learning rate of AdamW (gpt2: 2e-5, or 2e-4 with --lora; tiny: 1e-3)")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.01, help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--warmup", type=fraction, default=0.05,
                   help="fraction of the steps spent warming the learning rate up before cosine decay (default: %(default)s)")
    p.add_argument("--grad-clip", type=positive_float, default=1.0, help="gradient norm clip (default: %(default)s)")
    p.add_argument("--prefix-length", type=positive_int, default=10,
                   help="prefix embeddings the mapper makes from an image (default: %(default)s)")
    p.add_argument("--feature-norm", action=argparse.BooleanOptionalAction,
                   help="LayerNorm the image features before the mapper (default: on for tiny, off for gpt2)")
    p.add_argument("--encoder", choices=["resnet50", "clip-vit-b32"], default="resnet50",
                   help="resnet50: torchvision's ImageNet ResNet-50 (a small random ResNet with --preset tiny); "
                        "clip-vit-b32: CLIP's vision tower through transformers, frozen (default: %(default)s)")
    p.add_argument("--clip", default="openai/clip-vit-base-patch32",
                   help="the CLIP for --encoder clip-vit-b32: a hub name or a save_pretrained folder (default: %(default)s)")
    p.add_argument("--mapper", choices=MAPPERS, default="linear",
                   help="features -> prefix: linear, mlp (ClipCap's Linear-Tanh-Linear) or transformer "
                        "(ClipCap's transformer with learned constant queries) (default: %(default)s)")
    p.add_argument("--mapper-layers", type=positive_int, default=8, help="layers of the transformer mapper (default: %(default)s)")
    p.add_argument("--freeze-gpt2", action="store_true", help="train the mapper only; GPT-2 stays as loaded")
    p.add_argument("--lora", action="store_true",
                   help="fine-tune GPT-2 through LoRA adapters (peft): only the adapters and the mapper train and are saved")
    p.add_argument("--lora-rank", type=positive_int, default=8, help="rank of each LoRA adapter (default: %(default)s)")
    p.add_argument("--lora-alpha", type=positive_float, default=16, help="LoRA scaling: updates are scaled by alpha/rank (default: %(default)s)")
    p.add_argument("--lora-dropout", type=fraction, default=0.05, help="dropout on the adapters' input (default: %(default)s)")
    p.add_argument("--lora-targets", type=lora_targets, default="c_attn",
                   help=f"comma-separated GPT-2 layers that get adapters, from {', '.join(LORA_TARGETS)} (default: %(default)s)")
    p.add_argument("--train-encoder", action=argparse.BooleanOptionalAction,
                   help="fine-tune the image encoder (default: on for tiny, whose encoder starts random; off for gpt2)")
    p.add_argument("--gpt2", default="gpt2", help="GPT-2 to start from: a hub name or a save_pretrained folder (default: %(default)s)")
    p.add_argument("--encoder-weights", help="ResNet-50 state_dict file to use instead of torchvision's ImageNet download")
    p.add_argument("--val-split", type=fraction, default=0.1,
                   help="fraction of the images held out for validation; 0 turns it off (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed repeats a CPU run exactly (default: %(default)s)")
    p.add_argument("--device", type=utils.parse_device, default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--max-image-pixels", type=non_negative_int,
                   help="refuse larger images, a guard against decompression bombs; 0 = no limit (default: Pillow's, about 89 million)")
    args = p.parse_args(argv)
    if args.lora and args.freeze_gpt2:
        p.error("--lora trains adapters inside GPT-2, --freeze-gpt2 trains none of it: choose one")
    if args.encoder == "clip-vit-b32":
        # A pretrained CLIP stays frozen unless asked; its crop size comes from its config when it is
        # loaded, and images are decoded at least this large meanwhile.
        args.train_encoder = bool(args.train_encoder)
        args.image_size = args.resize_size = 224
    if args.lora and args.preset == "gpt2" and args.lr is None:
        args.lr = 2e-4  # adapters start at zero and need larger steps than full fine-tuning
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def build_model(args, tokenizer, styles=()):
    """A new model for the chosen preset, encoder, mapper and LoRA, and where its frozen pretrained
    parts are reloaded from (None: the checkpoint stores them)."""
    frozen_gpt2 = args.freeze_gpt2 or args.lora  # with LoRA the base stays as loaded, only adapters train
    if args.preset == "tiny":
        decoder = GPT2Config(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                             n_positions=args.n_positions, vocab_size=len(tokenizer),
                             bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        gpt2_weights, decoder_source = None, None  # random: nothing to reload it from, so it is stored
    else:
        gpt2 = utils.load_gpt2(args.gpt2)
        decoder, gpt2_weights = gpt2.config, gpt2.state_dict()
        decoder_source = args.gpt2 if frozen_gpt2 else None
    clip = utils.load_clip(args.clip) if args.encoder == "clip-vit-b32" else None
    if clip is not None:
        image = clip_settings(clip.config)
    else:
        image = dict(encoder="resnet-tiny" if args.preset == "tiny" else "resnet50",
                     image_size=args.image_size, resize_size=args.resize_size)
    config = StoryConfig(**image, prefix_length=args.prefix_length, feature_norm=args.feature_norm,
                         mapper=args.mapper, mapper_layers=args.mapper_layers, decoder=decoder.to_dict(),
                         lora=lora_config(args), styles=list(styles),
                         train_encoder=args.train_encoder, train_decoder=not frozen_gpt2)
    model = StoryModel(config, decoder_weights=gpt2_weights)
    if clip is not None:
        model.encoder.clip.load_state_dict(clip.state_dict())
    elif config.encoder == "resnet50":
        utils.load_resnet50_weights(model.encoder, args.encoder_weights)
    # A frozen pretrained part is not stored in the checkpoint: generate.py reloads it from here.
    if args.train_encoder or config.encoder == "resnet-tiny":
        encoder_source = None
    else:
        encoder_source = args.clip if clip is not None else (args.encoder_weights or "imagenet")
    return model, {"encoder": encoder_source, "decoder": decoder_source}


def clip_settings(clip_config) -> dict:
    """StoryConfig fields of a CLIP encoder, with CLIPImageProcessor's preprocessing (shorter side to
    the model's image size, bicubic, centre crop, CLIP's mean and std): generation needs no processor files."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    size = clip_config.image_size
    return dict(encoder="clip-vit-b32", encoder_config=clip_config.to_dict(), image_size=size, resize_size=size,
                interpolation="bicubic", image_mean=tuple(OPENAI_CLIP_MEAN), image_std=tuple(OPENAI_CLIP_STD))


def lora_config(args) -> dict | None:
    """peft LoraConfig arguments, kept as plain values for the checkpoint."""
    if not args.lora:
        return None
    # GPT-2's layers are transformers' Conv1D, whose weight is stored (in, out): fan_in_fan_out says so.
    return dict(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                target_modules=list(args.lora_targets), fan_in_fan_out=True, bias="none", task_type="CAUSAL_LM")


@torch.no_grad()
def evaluate(model, loader, device):
    """Mean loss per story token over a loader."""
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int(batch["attention_mask"].sum())
        total += model(**batch).loss.item() * n
        count += n
    model.train()
    return total / max(count, 1)


def main(argv=None):
    args = parse_args(argv)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = utils.pick_device(args.device)
    dataset.set_max_image_pixels(args.max_image_pixels)

    # Data: every problem is reported before any model is built or trained.
    examples = dataset.read_examples(args.stories, args.images, min_side=args.resize_size)
    if args.preset == "tiny":
        tokenizer = utils.train_tokenizer([ex.story for ex in examples], args.vocab_size)
    else:
        tokenizer = utils.load_gpt2_tokenizer(args.gpt2)

    styles = sorted({ex.style for ex in examples if ex.style})  # a third column asks for style control
    model, sources = build_model(args, tokenizer, styles)
    model.to(device).train()
    config = model.config
    transform = dataset.image_transform(config)
    max_tokens = model.decoder.config.n_positions - config.prefix_tokens
    if max_tokens < 2:  # a story needs at least one token and its end-of-text
        most = model.decoder.config.n_positions - 2 - (config.prefix_tokens - config.prefix_length)
        raise UserError(f"--prefix-length {config.prefix_length} leaves no room for a story in GPT-2's "
                        f"{model.decoder.config.n_positions} positions; use at most {most}")
    train_examples, val_examples = dataset.split_by_image(examples, args.val_split, args.seed)
    make_set = partial(dataset.StoryDataset, images_dir=args.images, tokenizer=tokenizer, transform=transform,
                       max_tokens=max_tokens, min_side=config.resize_size,
                       style_id=config.style_id if styles else None)
    train_set = make_set(train_examples)
    val_set = make_set(val_examples) if val_examples else None
    cut = sorted(train_set.truncated + (val_set.truncated if val_set is not None else []))
    if cut:  # long stories are cut, not refused: one line, counting them all
        lines = ", ".join(map(str, cut[:10])) + (", ..." if len(cut) > 10 else "")
        print(f"warning: {args.stories}: {len(cut)} of {len(examples)} stories are longer than the {max_tokens} "
              f"tokens the model has room for and were cut (lines {lines})", file=sys.stderr)
    collate = partial(dataset.collate, pad_id=tokenizer.pad_token_id)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(args.seed))
    val_loader = DataLoader(val_set, batch_size=args.batch_size, collate_fn=collate) if val_set is not None else None
    n_images = len({ex.image for ex in train_examples})
    print(f"data: {len(train_examples)} stories of {n_images} images for training, "
          f"{len(val_examples)} stories held out for validation")
    if styles:
        unstyled = sum(ex.style is None for ex in examples)
        print(f"styles: {', '.join(styles)}" + (f" ({unstyled} stories without a style train the unstyled case)" if unstyled else ""))

    params = [p for p in model.parameters() if p.requires_grad]
    n_train, n_total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    lora = f", LoRA r={args.lora_rank} on {','.join(args.lora_targets)}" if args.lora else ""
    print(f"model: {config.encoder} -> {config.mapper} mapper -> {config.prefix_length}-token prefix -> GPT-2 "
          f"({model.decoder.config.n_layer} layers{lora}); training {n_train:,} of {n_total:,} parameters "
          f"({100 * n_train / n_total:.2f}%) on {device}")
    if args.lora and sources["decoder"] is None:
        print("note: the tiny preset's GPT-2 is random and has no source to reload it from, "
              "so the checkpoint stores it with the adapters")
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    total_steps = args.epochs * len(loader)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(args.warmup * total_steps), total_steps)

    log = utils.MetricsLog(utils.metrics_path(args.out))
    print(f"logging metrics to {log}")
    step, start = 0, time.time()
    for epoch in range(1, args.epochs + 1):
        bar = tqdm(loader, desc=f"epoch {epoch}/{args.epochs}", leave=False, dynamic_ncols=True, disable=None)
        running = None
        for batch in bar:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise UserError(f"loss became {loss.item()} at step {step + 1}; lower --lr "
                                f"(nothing was saved over {args.out})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            step += 1
            running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
            log.write(step, epoch=epoch, train_loss=loss.item(), lr=lr)
            bar.set_postfix(loss=f"{running:.3f}")
        line = f"epoch {epoch}/{args.epochs}: train loss {running:.4f}"
        if val_loader is not None:
            val_loss = evaluate(model, val_loader, device)
            line += f", val loss {val_loss:.4f}"
            log.write(step, epoch=epoch, val_loss=val_loss)
        print(f"{line} ({time.time() - start:.0f}s)", flush=True)
    log.close()

    checkpoint = {
        "format": utils.CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "sources": sources,
        "model": utils.stored_state(model, sources),
        "tokenizer": utils.tokenizer_to_json(tokenizer),
        "eos_token": tokenizer.eos_token,
        "train": {"args": {k: v for k, v in vars(args).items()}, "step": step, "epoch": args.epochs,
                  "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
    }
    utils.save_checkpoint(checkpoint, args.out)
    stored = [k for k, v in sources.items() if v is None] + ["LoRA adapters"] * bool(args.lora and sources["decoder"])
    stored += ["mapper"] + ["style embeddings"] * bool(styles)
    size = Path(args.out).stat().st_size / 2**20
    print(f"saved {args.out} ({size:.1f} MiB: weights of {', '.join(stored)}; tokenizer; optimizer state)")


if __name__ == "__main__":
    utils.run_cli(main)
