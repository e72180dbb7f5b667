"""Writes a short story about each image with a model trained by train.py.

    python generate.py data/images/day_grass_house.jpg
    python generate.py photos/*.jpg --strategy beam --num-beams 4 --json
    python generate.py photo.jpg --style noir    # a model trained with styles
    python generate.py photos/ --json > stories.jsonl            # every image in a folder, with a progress bar
    python generate.py data/stories.txt --images data/images     # the images a list or stories file names
    python generate.py --album day1.jpg day2.jpg day3.jpg        # one story told across the photos, in order
    python generate.py photo.jpg --length short                  # a model trained with --length-control
"""
import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import dataset
from cli import DTYPES, UserError, non_negative_int, parse_device, positive_int, run_cli
from storyteller import (Storyteller, add_decoding_args, add_quantize_arg, check_decoding_args, decoding,
                         format_stories)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, folders of images, or .txt/.tsv lists whose lines start with an image name "
                        "(or an album's names joined by |, which gets one story)")
    p.add_argument("--album", action="store_true",
                   help="one story about all the images, in the order given (folders and lists expanded in order), "
                        "for a model trained on albums")
    p.add_argument("--images", dest="images_dir", metavar="DIR",
                   help="folder the names in a list are relative to (default: the list's own folder)")
    p.add_argument("--checkpoint", default="vlm_model.pt", help="checkpoint written by train.py: a .pt file, a model folder or a hub name user/name (default: %(default)s)")
    add_decoding_args(p)
    p.add_argument("--batch-size", type=positive_int, default=8, help="images encoded and decoded together (default: %(default)s)")
    p.add_argument("--style", help="style of the stories, for a model trained with a style column (default: no style)")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object per story: {"image": ..., "story": ...}, or {"images": [...], ...} for an album; '
                        'a model with tags adds "tags": [{"name": ..., "p": ...}], what it read the picture shows')
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="precision of the weights while generating: bfloat16 halves the memory and is faster on "
                        "GPUs and on CPUs with AMX or AVX512-BF16 (default: %(default)s)")
    add_quantize_arg(p)
    p.add_argument("--device", type=parse_device, default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
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


def image_paths(args) -> list:
    """The command line's images, with folders and lists expanded in order: a path for each image,
    a list of paths for each album (a list's line naming several images, or all of them with --album)."""
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
            for field in dataset.read_image_names(path):
                album = [str(folder / name) for name in field.split(dataset.ALBUM)]
                paths.append(album if len(album) > 1 else album[0])
        else:
            paths.append(arg)
    if args.album:
        return [[p for item in paths for p in (item if isinstance(item, list) else [item])]]
    return paths


def main(argv=None):
    args = parse_args(argv)
    dataset.set_max_image_pixels(args.max_image_pixels)
    items = image_paths(args)
    teller = Storyteller(args.checkpoint, args.device, args.dtype, args.quantize, decoder=args.decoder,
                         encoder_weights=args.encoder_weights, clip=args.clip)
    teller.check_style(args.style, args.length)  # refuse an unknown style or length before reading any image
    for item in items:
        if isinstance(item, list):
            teller.check_album(len(item), "--album" if args.album else f"the album {'|'.join(item)[:80]}")
    gen_config = teller.settings(**decoding(args))
    if args.seed is not None:
        torch.manual_seed(args.seed)
    # A person at a terminal reads one image's story as it is decoded; the text is the same in the end.
    stream = sys.stdout.isatty() and not args.json and args.num_stories == 1 and len(items) == 1 and items == args.images

    # Images are read a batch at a time, so a folder of any size fits in memory; an album is one item.
    failed = 0
    bar = tqdm(total=len(items), unit="image", file=sys.stderr, disable=True if len(items) <= args.batch_size else None)
    for start in range(0, len(items), args.batch_size):
        done, pictures = [], []
        for item in items[start:start + args.batch_size]:
            loaded = []
            try:
                for path in item if isinstance(item, list) else [item]:
                    loaded.append(teller.load_image(path))
            except Exception as err:  # every unreadable file is named; the others still get stories
                tqdm.write(f"error: {dataset.describe_image_error(path, err)}", file=sys.stderr)
                failed += 1
                continue
            done.append(item)
            pictures.append(loaded if isinstance(item, list) else loaded[0])
        if stream:
            if pictures:  # format_stories' text, a word at a time
                print("Generated Story:", flush=True)
                teller.stream_to(lambda piece: print(piece, end="", flush=True), pictures[0], args.style, args.length,
                                 **decoding(args))
                print("\n")
        else:
            for item, stories, tags in zip(done, *teller.stories_and_tags(pictures, gen_config, args.style, args.length)):
                tqdm.write(format_stories(item, stories, args.json, several=len(items) > 1, tags=tags), file=sys.stdout)
        sys.stdout.flush()
        bar.update(len(items[start:start + args.batch_size]))
    bar.close()
    return 2 if failed else 0


if __name__ == "__main__":
    run_cli(main)
