"""Measures what makes training and generation fast on this machine, and prints it as one table.

    python bench.py            # GPT-2 small + ResNet-50 with random weights, offline: minutes on a laptop CPU
    python bench.py --quick    # toy sizes, seconds: keeps every row working (the tests run it)
    python bench.py --checkpoint vlm_model.pt   # section 5's quality rows on your trained model
    python bench.py --only 6 --real vlm_model.pt   # int8 and start-up on a model of real weights (the small preset)

Random weights, because speed does not depend on them and nothing has to be downloaded; the
images and stories are the sample data in data/. Every row runs in its own forked process, so the
peak memory printed next to it belongs to that row: the process's peak resident set size (which
starts with Python, torch and transformers already imported: the "baseline" row), or on CUDA the
peak GPU memory allocated by torch. Section 5 (int8 weights) counts the peak from the start of
decoding instead, once the float32 weights that quantizing replaced are freed: a whole-process
peak would count the float32 model that every --quantize run loads first.
"""
import argparse
import contextlib
import copy
import ctypes
import gc
import multiprocessing
import os
import platform
import resource
import select
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from transformers import GPT2Config

import dataset
import quantize
import storyteller
import training
from backbones import train_tokenizer
from checkpoint import load_checkpoint, load_model
from cli import UserError, parse_device, pick_device, run_cli
from distributed import Run
from model import StoryConfig, StoryModel, build_encoder

ROOT = Path(__file__).resolve().parent
DATA = ROOT / "data"

SIZES = {
    # What `python train.py` trains: GPT-2 small (124M) and ResNet-50 at 224 px.
    "full": dict(decoder=dict(), encoder="resnet50", image_size=224, resize_size=232, batch_size=8, steps=3,
                 encoder_batch=16, new_tokens=100, story_images=16, story_tokens=40),
    "quick": dict(decoder=dict(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=2000), encoder="resnet-tiny",
                  image_size=32, resize_size=32, batch_size=2, steps=1, encoder_batch=2, new_tokens=8,
                  story_images=2, story_tokens=4),
}
TARGETS = {"frozen_c_over_a": 2.5, "b_over_d": 0.9, "encoder": 2.5, "vs_recompute": 10, "vs_transformers": 1.3,
           "batched": 4, "int8_batch_1": 2, "int8_batched": 1.5, "int8_loss": 1.02, "int8_memory": 1,
           "first_word": 6, "whole": 10}  # the last two in seconds, not ratios


# ----------------------------------------------------------------------------- running a row

def measure(fn, *args):
    """fn(*args) in a fresh process: (its result, that process's peak memory in MiB). Forked on
    Linux for a quick start, except with CUDA, which a forked child cannot use once the parent has."""
    device = args[1]
    fork = sys.platform == "linux" and device.type != "cuda"
    context = multiprocessing.get_context("fork" if fork else "spawn")
    with context.Pool(1) as pool:
        return pool.apply(_in_child, (fn, args))


def _in_child(fn, args):
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        value = fn(*args)
    device = args[1]
    if device.type == "cuda":
        return value, torch.cuda.max_memory_allocated() / 2**20
    return value, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def fastest(step, n) -> float:
    """Seconds of the fastest of n calls of step(), after one warm-up call. The fastest, because
    other programs on the machine only ever make a call slower."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    step()
    times = []
    for _ in range(n):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def quantized(model, method, tokenizer):
    """The model as section 5 measures it: its decoder quantized by method ("none": left float32),
    and the peak memory counted from here on, after the float weights quantizing replaced are freed."""
    if method != "none":
        model.decoder = quantize.quantize_decoder(model.decoder, method, quantize.calibration_ids(tokenizer))
    gc.collect()
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed memory for reuse: give it back
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # the peak RSS getrusage reports := the RSS now
    return model


def build(size, device, train_decoder=True):
    """A story model of the benchmark's size with random weights, and a tokenizer trained on the sample stories."""
    torch.manual_seed(0)
    stories = [ex.story for ex in dataset.parse_stories(DATA / "stories.txt")[0]]
    tokenizer = train_tokenizer(stories, vocab_size=2000)
    decoder = GPT2Config(**size["decoder"], bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = StoryConfig(encoder=size["encoder"], image_size=size["image_size"], resize_size=size["resize_size"],
                         decoder=decoder.to_dict(), train_encoder=False, train_decoder=train_decoder)
    model = StoryModel(config).to(device)
    model.encoder.to(memory_format=torch.channels_last)
    return model, tokenizer


# ----------------------------------------------------------------------------- the rows

def baseline(size, device):
    return 0.0


def training_rate(size, device, freeze_gpt2, path):
    """Training samples/s through train.py's own data loader and step.
    path: plain (decode and encode every image every step), cached, cached-bf16, or in-memory
    (the decoder-only limit: one batch of features already on the device, reused)."""
    model, tokenizer = build(size, device, train_decoder=not freeze_gpt2)
    with tempfile.TemporaryDirectory() as cache:
        dtype = "bfloat16" if path == "cached-bf16" else "float32"
        run = Run(device)
        examples = dataset.read_examples(DATA / "stories.txt", DATA / "images", min_side=size["resize_size"])
        features = training.cached_features(model.train(), examples, run, images_dir=DATA / "images",  # not timed
                                            cache_dir=None if path == "plain" else cache, dtype=dtype,
                                            batch_size=size["batch_size"], num_workers=0)
        loader, _ = training.make_loaders(model, tokenizer, examples, run, images_dir=DATA / "images",
                                          stories_path=DATA / "stories.txt", batch_size=size["batch_size"],
                                          num_workers=0, val_split=0, seed=0, features=features)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        amp = partial(training.autocast, device, dtype)
        if path == "in-memory":
            fixed = training.to_device(next(iter(loader)), device)
            batches = iter(lambda: fixed, None)
        else:
            batches = epochs(loader)

        def step():
            batch = next(batches)
            training.forward_backward(model, [batch], device, amp, scaler)
            training.optimizer_step(optimizer, scheduler, scaler, params, grad_clip=1.0)

        return size["batch_size"] / fastest(step, size["steps"])  # (66 stories: no short batch within 4 steps)


def epochs(loader):
    """The loader's batches, epoch after epoch: a plain loader decodes every image again each time."""
    while True:
        yield from loader


@torch.no_grad()
def encoder_rate(size, device, layout, dtype):
    """Encoder images/s on a batch of preprocessed images (decoding not included)."""
    torch.manual_seed(0)
    encoder = build_encoder(size["encoder"], {}).eval().to(device)
    images = torch.randn(size["encoder_batch"], 3, size["image_size"], size["image_size"], device=device)
    if layout == "channels-last":
        encoder.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with amp:
            encoder(images)

    return size["encoder_batch"] / fastest(step, size["steps"])


@torch.no_grad()
def decoding_rate(size, device, how, method=None):
    """New tokens/s for one story (batch 1) of exactly new_tokens tokens, greedy, from image features.
    method: section 5's quantization of the decoder ("none" or a quantize.METHODS), or None for none."""
    model, tokenizer = build(size, device)
    model.eval()
    if method is not None:
        quantized(model, method, tokenizer)
    n = size["new_tokens"]
    features = torch.randn(1, model.config.feature_dim, device=device)
    if how == "generate.py":  # its own generation settings (greedy), through StoryModel.generate
        config = storyteller.generation_config(tokenizer, n, strategy="greedy")
        config.min_new_tokens = n
        run = partial(model.generate, features=features, generation_config=config)
    elif how == "transformers":  # plain transformers generate on the prefix, float32, nothing else
        prefix, _ = model.prefix(features)
        run = partial(model.decoder.generate, inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], device=device),
                      max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    else:  # re-run the whole sequence for every new token, as the closest peer decodes
        def run():
            embeds, _ = model.prefix(features)
            for _ in range(n):
                logits = model.decoder(inputs_embeds=embeds).logits[:, -1]  # (1, vocab)
                token = logits.argmax(-1)
                embeds = torch.cat([embeds, model.decoder.get_input_embeddings()(token)[:, None]], dim=1)
    return n / fastest(run, 1)


def stories_rate(size, device, batch_size, method=None):
    """Stories/s for story_images images through generate.py's path, storyteller.encode_images and
    stories_from_features, batch_size images at a time (its default sampling).
    method: as decoding_rate's."""
    model, tokenizer = build(size, device)
    model.eval()
    if method is not None:
        quantized(model, method, tokenizer)
    paths = sorted((DATA / "images").glob("*.jpg"))[: size["story_images"]]
    images = [dataset.load_image(p, size["resize_size"]) for p in paths]
    n = size["story_tokens"]
    config = storyteller.generation_config(tokenizer, n)
    config.min_new_tokens = n  # every story as long, batched or not

    def run():
        torch.manual_seed(0)
        for start in range(0, len(images), batch_size):
            features = storyteller.encode_images(model, images[start:start + batch_size])
            storyteller.stories_from_features(model, tokenizer, features, config)

    return len(images) / fastest(run, 1)


def real_decoding_rate(size, device, checkpoint, batch, method):
    """Section 6: new tokens/s of a trained model (the small preset's: real SmolLM2 weights), batch
    stories of exactly 64 new tokens each, greedy, from features of random images."""
    model, tokenizer = load_model(load_checkpoint(checkpoint), where=checkpoint)
    model.to(device).eval()
    quantized(model, method, tokenizer)
    config = storyteller.generation_config(tokenizer, 64, strategy="greedy")
    config.min_new_tokens = 64
    features = torch.randn(batch, model.config.feature_dim, device=device)
    with torch.no_grad():
        return batch * 64 / fastest(partial(model.generate, features=features, generation_config=config), 2)


def first_word(size, device, checkpoint, method, seed=0):
    """Section 6: `python generate.py IMAGE --checkpoint CHECKPOINT --seed SEED` as a user runs it, at a
    terminal (a pseudo-terminal, so the story streams): seconds from the start to the story's first
    word and to the process's end, and the story's words. The peak memory is generate.py's own (its
    process's peak resident set)."""
    import pty
    command = [sys.executable, str(ROOT / "generate.py"), str(DATA / "images" / "photo_cat.jpg"), "--checkpoint",
               checkpoint, "--seed", str(seed), "--device", str(device)] + (["--quantize", method] if method != "none" else [])
    leader, follower = pty.openpty()
    start = time.perf_counter()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=follower, stderr=subprocess.DEVNULL, close_fds=True)
    os.close(follower)
    out, first, deadline = b"", None, start + 600
    while time.perf_counter() < deadline:
        if not select.select([leader], [], [], 1.0)[0]:
            continue
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closes when generate.py ends
            break
        if not chunk:
            break
        out += chunk
        if first is None and out.partition(b"Generated Story:")[2].strip():
            first = time.perf_counter() - start
    if process.poll() is None:  # still running after 10 minutes
        process.kill()
    process.wait()
    whole = time.perf_counter() - start
    os.close(leader)
    if process.returncode != 0 or first is None:
        raise UserError(f"section 6: generate.py --checkpoint {checkpoint} failed (exit {process.returncode}) or "
                        f"wrote no story; run it to see why")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    return first, whole, peak, len(out.partition(b"Generated Story:")[2].split())


def quality(size, device, checkpoint, method):
    """How much quantizing changes a trained model, on the sample data: the mean loss per token of
    the reference stories with float32 and with quantized weights, and how many images get word for
    word the same greedy story. {"float32": loss, method: loss, "same": n, "images": n}
    With --quick, a random model of the toy size, as the figures of --quick mean nothing anyway."""
    if size == SIZES["quick"]:  # (a copy: measure() sends it to another process)
        return compare(*build(size, device), device, method)
    if checkpoint is not None:
        return compare(*load_model(load_checkpoint(checkpoint), where=checkpoint), device, method)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "tiny.pt"
        train_tiny(checkpoint, device)
        return compare(*load_model(load_checkpoint(checkpoint), where=str(checkpoint)), device, method)


def train_tiny(out, device):
    """`python train.py --preset tiny` on the sample data, as a user runs it (a script, not imported)."""
    command = [sys.executable, str(ROOT / "train.py"), "--preset", "tiny", "--images", str(DATA / "images"),
               "--stories", str(DATA / "stories.txt"), "--out", str(out), "--device", str(device)]
    if subprocess.run(command, stdout=subprocess.DEVNULL).returncode != 0:
        raise UserError("training the tiny model for section 5 failed (see above); pass --checkpoint FILE")


@torch.no_grad()
def compare(model, tokenizer, device, method):
    """quality()'s figures for a loaded model and its copy quantized by method."""
    model.to(device).eval()
    models = {"float32": model, method: quantized(copy.deepcopy(model), method, tokenizer)}
    examples = dataset.read_examples(DATA / "stories.txt", DATA / "images", min_side=model.config.resize_size)
    names = sorted({ex.image for ex in examples})
    images = [dataset.load_image(DATA / "images" / name, model.config.resize_size) for name in names]
    features = torch.cat([storyteller.encode_images(model, images[i:i + 16])
                          for i in range(0, len(images), 16)])  # (images, feature_dim): the encoder stays float32
    row = {name: i for i, name in enumerate(names)}
    tags = {}  # a model with tags reads its picture's tag words before the story, as when it writes one
    if model.config.tags:
        prompt_ids, prompt_mask = dataset.left_pad(storyteller.tag_prompts(model, tokenizer, features), tokenizer.pad_token_id)
        tags = dict(prompt_ids=prompt_ids.to(device), prompt_mask=prompt_mask.to(device))
    room = storyteller.story_room(model)
    result = {}
    for name, m in models.items():
        nll = count = 0
        for ex in examples:  # one story at a time: no padding to think about
            ids = tokenizer(ex.story, add_special_tokens=False)["input_ids"][:room - 1] + [tokenizer.eos_token_id]
            ids = torch.tensor([ids], device=device)  # (1, T), ending with EOS as in training
            styles = [m.config.style_id(ex.style if ex.style in m.config.styles else None)] if m.config.styles else None
            i = row[ex.image]
            out = m(ids, torch.ones_like(ids), features=features[i][None],
                    style_ids=None if styles is None else torch.tensor(styles, device=device),
                    **{key: value[i:i + 1] for key, value in tags.items()})
            nll, count = nll + float(out.loss) * ids.shape[1], count + ids.shape[1]
        result[name] = nll / count
    config = storyteller.generation_config(tokenizer, min(80, room), strategy="greedy")
    greedy = {name: storyteller.stories_from_features(m, tokenizer, features, config) for name, m in models.items()}
    result["same"] = sum(a == b for a, b in zip(greedy["float32"], greedy[method]))
    result["images"] = len(names)
    return result


# ----------------------------------------------------------------------------- the table

def verdict(value, target) -> str:
    """target: None, a lower bound, or (operator, bound)."""
    if target is None:
        return ""
    op, bound = target if isinstance(target, tuple) else (">=", target)
    met = {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]
    return f"{op} {bound:g}x: {'met' if met else 'not met'}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy model sizes: every row in seconds, the figures mean nothing")
    p.add_argument("--device", type=parse_device, default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: %(default)s)")
    p.add_argument("--only", type=int, choices=range(1, 7), metavar="SECTION",
                   help="measure only this section of the table, 1-6 (5: int8 weights; 6: a model on real weights), and its ratios")
    p.add_argument("--checkpoint", help="a model trained by train.py for section 5's quality rows "
                                        "(default: train the tiny preset on the sample data first, about a minute)")
    p.add_argument("--real", default="vlm_model.pt",
                   help="section 6's model on real weights, e.g. the small preset's (python prepare.py weights; "
                        "python train.py --preset small): its decoding speed, int8 quality and generate.py's start "
                        "(default: %(default)s, if it is there)")
    p.add_argument("--runs", type=int, choices=range(1, 11), default=3, metavar="N",
                   help="section 6e: runs of generate.py for each of float32 and int8, seeds 0 to N-1, whose means it "
                        "reports, as each seed's story has its own length (default: %(default)s)")
    return p.parse_args(argv)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    size = SIZES["quick" if args.quick else "full"]
    what = "toy sizes (--quick)" if args.quick else "GPT-2 small (124M) + ResNet-50, random weights"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()}, {os.cpu_count()} CPUs"
    print(f"bench: {what}; {device} ({where}); torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    print("\n| what | figure | peak memory |\n|---|---|---|", flush=True)
    figures, peaks = {}, {}

    def row(key, label, unit, fn, *fn_args):
        value, peak = measure(fn, size, device, *fn_args)
        figures[key], peaks[key] = value, peak
        shown = f"{value:.3g} {unit}" if unit else "-"
        print(f"| {label} | {shown} | {peak:,.0f} MiB |", flush=True)

    row("baseline", "baseline: Python + torch + transformers imported", "", baseline)

    def wanted(section):
        return args.only in (None, section)

    b, e, t, n = size["batch_size"], size["encoder_batch"], size["new_tokens"], size["story_images"]
    for name, frozen in (("frozen", True), ("tuned", False)) if wanted(1) else ():
        title = "GPT-2 frozen" if frozen else "GPT-2 fine-tuned"
        row(f"{name}_a", f"1a. training, {title}: plain float32, decode + encode every image every step (batch {b})",
            "samples/s", training_rate, frozen, "plain")
        row(f"{name}_b", f"1b. training, {title}: feature cache", "samples/s", training_rate, frozen, "cached")
        row(f"{name}_c", f"1c. training, {title}: feature cache + bfloat16", "samples/s", training_rate, frozen, "cached-bf16")
        row(f"{name}_d", f"1d. training, {title}: decoder-only limit, features in memory", "samples/s",
            training_rate, frozen, "in-memory")
    if wanted(2):
        row("enc_fp32", f"2. encoder, float32, default layout (batch {e})", "images/s", encoder_rate, "default", torch.float32)
        row("enc_fp32_cl", "2. encoder, float32 + channels-last", "images/s", encoder_rate, "channels-last", torch.float32)
        row("enc_bf16_cl", "2. encoder, bfloat16 + channels-last", "images/s", encoder_rate, "channels-last", torch.bfloat16)
    if wanted(3):
        row("dec_ours", f"3. decoding, batch 1, {t} new tokens: generate.py's path", "tokens/s", decoding_rate, "generate.py")
        row("dec_hf", "3. decoding: plain transformers generate, float32", "tokens/s", decoding_rate, "transformers")
        row("dec_loop", "3. decoding: re-run the whole sequence every token", "tokens/s", decoding_rate, "recompute")
    if wanted(4):
        row("batched", f"4. stories for {n} images, batched (--batch-size {n})", "stories/s", stories_rate, n)
        row("single", f"4. stories for {n} images, one at a time", "stories/s", stories_rate, 1)
    int8 = wanted(5) and device.type == "cpu"
    if int8:  # int8 weights: CPU only (quantize.py)
        for method, label in (("none", "float32"), ("int8", "int8 (--quantize int8)")):
            row(f"dec_{method}", f"5a. decoding, batch 1, {t} new tokens, {label}, peak from decoding start", "tokens/s",
                decoding_rate, "generate.py", method)
            row(f"stories_{method}", f"5b. stories for {n} images, batched, {label}, peak from decoding start",
                "stories/s", stories_rate, n, method)
        q, _ = measure(quality, size, device, args.checkpoint, "int8")
        which = "a random toy model" if args.quick else args.checkpoint or "the tiny preset trained on the sample data"
        print(f"| 5c. reference loss per token, {which}: float32 | {q['float32']:.4f} | - |")
        print(f"| 5c. reference loss per token, {which}: int8 | {q['int8']:.4f} | - |")
        print(f"| 5d. greedy stories word for word the same in int8 | {q['same']} of {q['images']} images | - |",
              flush=True)
    elif wanted(5):
        print("| 5. int8 weights | - (CPU only) | - |", flush=True)
    real = wanted(6) and not args.quick and device.type == "cpu" and Path(args.real).exists()
    if real:  # a trained model on real weights: what a user of the small preset gets
        for method, label in (("none", "float32"), ("int8", "int8")):
            row(f"real_1_{method}", f"6a. {args.real}: decoding, batch 1, 64 new tokens, {label}", "tokens/s",
                real_decoding_rate, args.real, 1, method)
            row(f"real_16_{method}", f"6b. {args.real}: decoding, 16 stories batched, {label}", "tokens/s",
                real_decoding_rate, args.real, 16, method)
        q, _ = measure(quality, size, device, args.real, "int8")
        figures.update(real_loss_int8=q["int8"], real_loss_none=q["float32"])
        print(f"| 6c. reference loss per token on the sample stories, {args.real}: float32 / int8 | "
              f"{q['float32']:.4f} / {q['int8']:.4f} | - |")
        print(f"| 6d. greedy stories word for word the same in int8 | {q['same']} of {q['images']} images | - |", flush=True)
        # int8 rounds the sampling onto other stories, of other lengths: three seeds each, taken in
        # turns; beside the time per story, the seconds a word after the first (decoding, whatever the length).
        runs = {"none": [], "int8": []}
        for seed in range(args.runs):
            for method in runs:
                runs[method].append(measure(first_word, size, device, args.real, method, seed)[0])
        for method, flag in (("none", ""), ("int8", " --quantize int8")):
            first, whole, peak, words = (statistics.mean(run[i] for run in runs[method]) for i in range(4))
            figures[f"first_{method}"], figures[f"whole_{method}"] = first, whole
            figures[f"per_word_{method}"] = (whole - first) / max(words - 1, 1)  # decoding as the reader sees it
            seeds = f"seeds 0-{args.runs - 1}" if args.runs > 1 else "seed 0"
            print(f"| 6e. python generate.py IMAGE{flag} at a terminal, {seeds}: first word / "
                  f"whole process / story words (means) | {first:.1f} s / {whole:.1f} s / {words:.0f} | "
                  f"{max(run[2] for run in runs[method]):,.0f} MiB |", flush=True)
        met = lambda ok: "met" if ok else "not met"
        print(f"| 6e. targets, float32: first word <= {TARGETS['first_word']:g} s, whole <= {TARGETS['whole']:g} s | "
              f"{met(figures['first_none'] <= TARGETS['first_word'])}, {met(figures['whole_none'] <= TARGETS['whole'])} | - |")
    elif wanted(6):
        why = "CPU only" if device.type != "cpu" else "not with --quick" if args.quick else \
            f"no {args.real}: python prepare.py weights; python train.py --preset small, or --real CHECKPOINT"
        print(f"| 6. a model on real weights | - ({why}) | - |", flush=True)

    ratios = [  # label, numerator, denominator, target: each where its section was measured
        ("1. training, GPT-2 frozen: (c) cache + bfloat16 / (a) plain", "frozen_c", "frozen_a", TARGETS["frozen_c_over_a"]),
        ("1. training, GPT-2 frozen: (b) cache / (d) decoder-only limit", "frozen_b", "frozen_d", TARGETS["b_over_d"]),
        ("1. training, GPT-2 fine-tuned: (c) cache + bfloat16 / (a) plain", "tuned_c", "tuned_a", None),
        ("1. training, GPT-2 fine-tuned: (b) cache / (d) decoder-only limit", "tuned_b", "tuned_d", TARGETS["b_over_d"]),
        ("1. training, GPT-2 frozen: (b) cache / (a) plain", "frozen_b", "frozen_a", None),
        ("2. encoder: bfloat16 + channels-last / float32", "enc_bf16_cl", "enc_fp32", TARGETS["encoder"]),
        ("2. encoder: float32 + channels-last / float32", "enc_fp32_cl", "enc_fp32", None),
        ("3. decoding: generate.py / re-run loop", "dec_ours", "dec_loop", TARGETS["vs_recompute"]),
        ("3. decoding: generate.py / transformers generate", "dec_ours", "dec_hf", TARGETS["vs_transformers"]),
        ("4. stories: batched / one at a time", "batched", "single", TARGETS["batched"]),
        ("5a. decoding, batch 1: int8 / float32", "dec_int8", "dec_none", TARGETS["int8_batch_1"]),
        (f"5b. stories for {n} images, batched: int8 / float32", "stories_int8", "stories_none", TARGETS["int8_batched"]),
        ("5c. reference loss: int8 / float32", "loss_int8", "loss_none", ("<=", TARGETS["int8_loss"])),
        ("5a. peak memory while decoding, batch 1: int8 / float32", "peak_int8", "peak_none", ("<", TARGETS["int8_memory"])),
        ("6a. real weights, decoding, batch 1: int8 / float32", "real_1_int8", "real_1_none", TARGETS["int8_batch_1"]),
        ("6b. real weights, 16 stories batched: int8 / float32", "real_16_int8", "real_16_none", TARGETS["int8_batched"]),
        ("6c. real weights, reference loss: int8 / float32", "real_loss_int8", "real_loss_none", ("<=", TARGETS["int8_loss"])),
        ("6e. generate.py, whole process: int8 / float32", "whole_int8", "whole_none", ("<", 1)),
        ("6e. generate.py, seconds a word after the first: int8 / float32", "per_word_int8", "per_word_none", ("<", 1)),
    ]
    if int8:
        figures.update(loss_int8=q["int8"], loss_none=q["float32"], peak_int8=peaks["dec_int8"], peak_none=peaks["dec_none"])
    print("\n| ratio | measured | target |\n|---|---|---|")
    for label, numerator, denominator, target in ratios:
        if numerator in figures and denominator in figures:
            value = figures[numerator] / figures[denominator]
            digits = 3 if "loss" in label else 2  # a 2% bound needs the third
            print(f"| {label} | {value:.{digits}f}x | {verdict(value, target)} |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end", flush=True)


if __name__ == "__main__":
    run_cli(main)
