"""Writes a short story about each image with a model trained by train.py.

    python generate.py data/images/day_grass_house.jpg
    python generate.py photos/*.jpg --strategy beam --num-beams 4 --json
    python generate.py photo.jpg --style noir    # a model trained with styles
    python generate.py photos/ --json > stories.jsonl            # every image in a folder, with a progress bar
    python generate.py data/stories.txt --images data/images     # the images a list or stories file names
"""
import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GenerationConfig

import dataset
import quantize
import utils
from model import decoder_sizes
from train import DTYPES, checked_number, non_negative_int, positive_float, positive_int
from utils import UserError

# The prefix is embeddings, not tokens, so n-gram blocking and the repetition penalty can only look
# at the story itself: as intended.
warnings.filterwarnings("ignore", message="Passing `(no_repeat_ngram_size|repetition_penalty)` with `inputs_embeds`")

# A story wants some surprise but stays on topic: top-k sampling, a little cooler than 1.
DEFAULTS = dict(strategy="sample", top_k=50, top_p=1.0, temperature=0.8, num_beams=4,
                repetition_penalty=1.0, no_repeat_ngram_size=3, max_new_tokens=80)


def top_p_value(value):
    return checked_number(float, value, lambda x: 0 < x <= 1, "in (0, 1]")


def add_decoding_args(p):
    """The decoding flags, shared with evaluate.py so both decode the same way."""
    p.add_argument("--strategy", choices=["greedy", "sample", "beam"], default=DEFAULTS["strategy"],
                   help="greedy: most likely words; sample: top-k/top-p sampling; beam: beam search (default: %(default)s)")
    p.add_argument("--top-k", type=non_negative_int, default=DEFAULTS["top_k"], help="sample from the k most likely tokens; 0 = all (default: %(default)s)")
    p.add_argument("--top-p", type=top_p_value, default=DEFAULTS["top_p"], help="nucleus sampling mass in (0, 1] (default: %(default)s)")
    p.add_argument("--temperature", type=positive_float, default=DEFAULTS["temperature"], help="sampling temperature (default: %(default)s)")
    p.add_argument("--num-beams", type=positive_int, default=DEFAULTS["num_beams"], help="beams for --strategy beam (default: %(default)s)")
    p.add_argument("--repetition-penalty", type=positive_float, default=DEFAULTS["repetition_penalty"],
                   help="above 1 discourages repeating tokens (default: %(default)s)")
    p.add_argument("--no-repeat-ngram-size", type=non_negative_int, default=DEFAULTS["no_repeat_ngram_size"],
                   help="never repeat an n-gram of this size; 0 = off (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=positive_int, default=DEFAULTS["max_new_tokens"], help="story length limit in tokens (default: %(default)s)")
    p.add_argument("--num-stories", type=positive_int, default=1, help="stories per image, with sample or beam (default: %(default)s)")
    p.add_argument("--seed", type=int, help="random seed: the same seed gives the same stories")


def add_quantize_arg(p):
    """--quantize, shared with app.py and evaluate.py."""
    p.add_argument("--quantize", choices=["none", *quantize.METHODS], default="none",
                   help="int8: the decoder's weights become int8 when the model loads: 1.6-1.8x the tokens/s of "
                        "float32 on the README's CPU, CPU only; fine for GPT-2-style models, but it raised a real "
                        "SmolLM2's loss 2.4x: check yours with bench.py --only 5 --checkpoint (default: %(default)s)")


def check_decoding_args(p, args):
    if args.strategy == "greedy" and args.num_stories > 1:
        p.error("--num-stories above 1 needs --strategy sample or beam (greedy gives one story)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, folders of images, or .txt/.tsv lists whose lines start with an image name")
    p.add_argument("--images", dest="images_dir", metavar="DIR",
                   help="folder the names in a list are relative to (default: the list's own folder)")
    p.add_argument("--checkpoint", default="vlm_model.pt", help="checkpoint written by train.py (default: %(default)s)")
    add_decoding_args(p)
    p.add_argument("--batch-size", type=positive_int, default=8, help="images encoded and decoded together (default: %(default)s)")
    p.add_argument("--style", help="style of the stories, for a model trained with a style column (default: no style)")
    p.add_argument("--json", action="store_true", help='print one JSON object per story: {"image": ..., "story": ...}')
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="precision of the weights while generating: bfloat16 halves the memory and is faster on "
                        "GPUs and on CPUs with AMX or AVX512-BF16 (default: %(default)s)")
    add_quantize_arg(p)
    p.add_argument("--device", type=utils.parse_device, default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--decoder", "--gpt2", dest="decoder",
                   help="where to load a frozen decoder from (a hub name or folder), if not where training took it")
    p.add_argument("--encoder-weights", help="state_dict file of a frozen ResNet-50 or timm encoder, if not where "
                                              "training took it (the library's cache or download)")
    p.add_argument("--clip", help="where to load a frozen CLIP encoder from, if not where training took it")
    p.add_argument("--max-image-pixels", type=non_negative_int,
                   help="refuse larger images, a guard against decompression bombs; 0 = no limit (default: Pillow's, about 89 million)")
    args = p.parse_args(argv)
    check_decoding_args(p, args)
    return args


def generation_config(args, tokenizer, max_new_tokens) -> GenerationConfig:
    common = dict(max_new_tokens=max_new_tokens, num_return_sequences=args.num_stories,
                  repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if args.strategy == "sample":
        return GenerationConfig(do_sample=True, top_k=args.top_k, top_p=args.top_p,
                                temperature=args.temperature, **common)
    if args.strategy == "beam":
        beams = max(args.num_beams, args.num_stories)
        return GenerationConfig(do_sample=False, num_beams=beams, early_stopping=beams > 1, **common)
    return GenerationConfig(do_sample=False, num_beams=1, **common)


def story_room(model) -> int:
    """Story tokens that fit in the decoder's context after the prefix: the most --max-new-tokens can give."""
    return decoder_sizes(model.decoder.config)[2] - model.config.prefix_tokens


def style_id(config, style: str | None) -> int:
    """The id of the asked-for style; a UserError naming the known ones if the model has no such style."""
    try:
        return config.style_id(style)
    except ValueError as err:
        raise UserError(f"--style {style}: {err}") from None


@torch.no_grad()
def encode_images(model, images) -> torch.Tensor:
    """Pooled encoder features (B, feature_dim) of RGB PIL images, on the model's device and dtype."""
    transform = dataset.image_transform(model.config)
    weight = next(model.encoder.parameters())
    pixels = torch.stack([transform(image) for image in images]).to(weight.device, weight.dtype)
    return model.encode(pixels.contiguous(memory_format=torch.channels_last))  # the CNN's fastest layout


def stories_from_features(model, tokenizer, features, gen_config, style=None) -> list[list[str]]:
    """gen_config.num_return_sequences stories for each row of features (B, feature_dim)."""
    sid = style_id(model.config, style)
    style_ids = torch.full((len(features),), sid, device=features.device) if model.config.styles else None
    ids = model.generate(features=features, style_ids=style_ids, generation_config=gen_config)
    texts = [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    n = gen_config.num_return_sequences
    return [texts[i * n:(i + 1) * n] for i in range(len(features))]


def write_stories(model, tokenizer, images, gen_config, batch_size, style=None):
    """Yields (image path, [stories]) for (path, PIL image) pairs, batch_size images per generate call."""
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        features = encode_images(model, [image for _, image in chunk])
        yield from zip([path for path, _ in chunk], stories_from_features(model, tokenizer, features, gen_config, style))


def image_paths(args) -> list[str]:
    """The command line's images, with folders and lists expanded in order."""
    paths = []
    for arg in args.images:
        path = Path(arg)
        # (A folder named like an image, photo.jpg/, is a mistake reported with the unreadable images.)
        if path.is_dir() and path.suffix.lower() not in dataset.IMAGE_SUFFIXES:
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in dataset.IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise UserError(f"{path}: no images in this folder ({', '.join(sorted(dataset.IMAGE_SUFFIXES))})")
            paths += found
        elif path.suffix.lower() in (".txt", ".tsv"):
            folder = Path(args.images_dir) if args.images_dir else path.parent
            paths += [str(folder / name) for name in dataset.read_image_names(path)]
        else:
            paths.append(arg)
    return paths


def main(argv=None):
    args = parse_args(argv)
    device = utils.pick_device(args.device)
    dataset.set_max_image_pixels(args.max_image_pixels)
    paths = image_paths(args)
    ckpt = utils.load_checkpoint(args.checkpoint)
    model, tokenizer = utils.load_model(ckpt, decoder=args.decoder, encoder_weights=args.encoder_weights, clip=args.clip,
                                        where=args.checkpoint)
    model.to(device, DTYPES[args.dtype]).eval()
    model.encoder.to(memory_format=torch.channels_last)
    if args.quantize != "none":
        model.decoder = quantize.quantize_decoder(model.decoder, args.quantize)
    style_id(model.config, args.style)  # refuse an unknown style before reading any image
    gen_config = generation_config(args, tokenizer, min(args.max_new_tokens, story_room(model)))
    if args.seed is not None:
        torch.manual_seed(args.seed)

    # Images are read a batch at a time, so a folder of any size fits in memory.
    failed = 0
    bar = tqdm(total=len(paths), unit="image", file=sys.stderr, disable=True if len(paths) <= args.batch_size else None)
    for start in range(0, len(paths), args.batch_size):
        images = []
        for path in paths[start:start + args.batch_size]:
            try:
                images.append((path, dataset.load_image(path, model.config.resize_size)))
            except Exception as err:  # every unreadable file is named; the others still get stories
                tqdm.write(f"error: {dataset.describe_image_error(path, err)}", file=sys.stderr)
                failed += 1
        for path, stories in write_stories(model, tokenizer, images, gen_config, args.batch_size, args.style):
            tqdm.write(format_stories(path, stories, args.json, several=len(paths) > 1), file=sys.stdout)
        sys.stdout.flush()
        bar.update(len(paths[start:start + args.batch_size]))
    bar.close()
    return 2 if failed else 0


def format_stories(path, stories, as_json, several) -> str:
    if as_json:
        return "\n".join(json.dumps({"image": path, "story": story}, ensure_ascii=False) for story in stories)
    lines = [f"== {path} =="] if several else []
    for k, story in enumerate(stories, start=1):
        lines += ["Generated Story:" if len(stories) == 1 else f"Generated Story {k}/{len(stories)}:", story, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    utils.run_cli(main)
