"""Synthetic coloured shapes on coloured backgrounds: a data set where only the picture can
tell the model which words to write. Used by the tests and by the README's measurement.

    python tests/shapes.py OUT_DIR --n 1000     # OUT_DIR/images/*.png + OUT_DIR/stories.txt
    python tests/shapes.py OUT_DIR --styles     # each image also told in the styles of STYLES
    python tests/shapes.py OUT_DIR --albums     # albums of 2 or 3 shapes, one story each (a.png|b.png<TAB>...)
    python tests/shapes.py OUT_DIR --lengths    # stories of 1, 2 or 3 sentences, for --length-control
"""
import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
           "yellow": (240, 220, 20), "purple": (140, 40, 170)}
BACKGROUNDS = {"white": (250, 250, 250), "black": (10, 10, 10), "gray": (128, 128, 128), "orange": (250, 140, 20)}
SHAPES = ["circle", "square", "triangle"]


def draw(colour, shape, background, rng, size=64, big=False):
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    r = rng.randint(size // 3, 9 * size // 20) if big else rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def story(colour, shape, background):
    return f"A {colour} {shape} on a {background} background."


# Styles whose wording differs from the first word on; the picture still decides colour, shape, background.
STYLES = {"grand": "Behold, the magnificent {colour} {shape} upon a {background} field!",
          "noir": "The rain fell on a {colour} {shape}. The {background} night asked no questions."}


def make_shapes(out_dir, n, seed=0, size=64, styles=False):
    """Writes n images and a stories file; returns [(file name, colour, shape, background)].
    styles: each image gets, besides its plain story (no style), one story in each of STYLES."""
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour, shape, background = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))
        name = f"{seed}_{i:05d}.png"
        draw(colour, shape, background, rng, size).save(out_dir / "images" / name)
        rows.append((name, colour, shape, background))
    lines = [f"{name}\t{story(c, s, b)}" for name, c, s, b in rows]
    if styles:
        lines += [f"{name}\t{text.format(colour=c, shape=s, background=b)}\t{style}"
                  for name, c, s, b in rows for style, text in STYLES.items()]
    (out_dir / "stories.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return rows


ORDER = ["First", "Then", "Last"]  # how an album story names its pictures, in order


def make_albums(out_dir, n, seed=0, sizes=(2, 3), size=64):
    """Writes n albums of len in sizes shapes each (every picture its own file) and a stories file of
    album lines ("a.png|b.png<TAB>First a red circle. Last a blue square."); returns
    [([file names], [(colour, shape), ...])]. The shapes are big, on white: the test trains quickly
    with a frozen random encoder, whose features see large areas of colour best."""
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    albums, lines = [], []
    for i in range(n):
        names, pictures = [], []
        for k in range(rng.choice(sizes)):
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            names.append(f"{seed}_{i:05d}_{k}.png")
            draw(colour, shape, "white", rng, size, big=True).save(out_dir / "images" / names[-1])
            pictures.append((colour, shape))
        albums.append((names, pictures))
        words = ORDER[:len(pictures) - 1] + ORDER[-1:]
        lines.append("|".join(names) + "\t" + " ".join(f"{w} a {c} {s}." for w, (c, s) in zip(words, pictures)))
    (out_dir / "stories.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return albums


def album_words(story):
    """[(colour, shape), ...] an album story names, in its order."""
    words = story.lower().replace(".", " ").split()
    return [(words[i + 2], words[i + 3]) for i, w in enumerate(words[:-3]) if w in ("first", "then", "last")
            and words[i + 1] == "a"]


# Stories of one, two or three sentences, for length control: the picture decides the first.
MORE = ["It sat there all day.", "Nobody came to see it."]


def make_lengths(out_dir, n, seed=0, size=64):
    """n shapes, each told in a story of 1, 2 or 3 sentences chosen at random; returns
    [(file name, sentences)]."""
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows, lines = [], []
    for i in range(n):
        colour, shape, background = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))
        name = f"{seed}_{i:05d}.png"
        draw(colour, shape, background, rng, size).save(out_dir / "images" / name)
        sentences = rng.choice([1, 2, 3])
        rows.append((name, sentences))
        lines.append(f"{name}\t" + " ".join([story(colour, shape, background)] + MORE[:sentences - 1]))
    (out_dir / "stories.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return rows


def sentences(story):
    return sum(story.count(end) for end in ".!?")


def score(rows, stories):
    """Fraction of stories naming the right colour, shape and background."""
    hits = {"colour": 0, "shape": 0, "background": 0}
    for (_, colour, shape, background), text in zip(rows, stories):
        words = text.lower().replace(".", " ").split()
        hits["colour"] += words[1:2] == [colour]
        hits["shape"] += words[2:3] == [shape]
        hits["background"] += background in words[3:]
    return {k: v / len(rows) for k, v in hits.items()}


CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "background": 1 / len(BACKGROUNDS)}

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="folder to write images/ and stories.txt into")
    p.add_argument("--n", type=int, default=1000, help="number of images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed; use another for a held-out set (default: %(default)s)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--styles", action="store_true", help=f"also write each image's story in the styles {', '.join(STYLES)}")
    kind.add_argument("--albums", action="store_true", help="N albums of 2 or 3 big shapes on white, a story each")
    kind.add_argument("--lengths", action="store_true", help="stories of 1, 2 or 3 sentences chosen at random")
    args = p.parse_args()
    if args.albums:
        make_albums(args.out_dir, args.n, args.seed)
    elif args.lengths:
        make_lengths(args.out_dir, args.n, args.seed)
    else:
        make_shapes(args.out_dir, args.n, args.seed, styles=args.styles)
    print(f"wrote {args.n} {'albums' if args.albums else 'images'} to {args.out_dir}")
