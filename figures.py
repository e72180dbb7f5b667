"""The pictures evaluate.py draws: a contact sheet of images (or albums) with their stories, and the
training curves of a metrics log written by train.py."""
import json
import math
import textwrap
from pathlib import Path

from PIL import Image

import dataset
from cli import UserError
from dataset import ALBUM
from files import atomic_write


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    pyplot().close(fig)


def draw_sheet(path, items, images_dir, columns=4, width=34, max_lines=9):
    """items: [(image name or album, story)]. A grid of thumbnails, each with its story wrapped beneath;
    an album is a strip of its images, in order."""
    plt = pyplot()
    texts = []
    for _, story in items:
        lines = textwrap.wrap(story, width) or [""]
        texts.append("\n".join(lines[:max_lines - 1] + [lines[max_lines - 1] + " ..."] if len(lines) > max_lines else lines))
    text_height = 0.17 * max(t.count("\n") + 1 for t in texts)  # inches for the longest story
    columns = min(columns, len(items))
    rows = math.ceil(len(items) / columns)
    fig, axes = plt.subplots(2 * rows, columns, squeeze=False, figsize=(3 * columns, rows * (2.3 + text_height)),
                             gridspec_kw={"height_ratios": [2.3, text_height] * rows})
    for ax in axes.flat:
        ax.axis("off")
    for k, ((name, _), text) in enumerate(zip(items, texts)):
        image_ax, text_ax = axes[2 * (k // columns), k % columns], axes[2 * (k // columns) + 1, k % columns]
        image = strip([dataset.load_image(Path(images_dir) / n, 256) for n in name.split(ALBUM)])
        image_ax.imshow(image)
        album = name.split(ALBUM)
        image_ax.set_title(name if len(album) == 1 else f"{album[0]} + {len(album) - 1} more", fontsize=8)
        text_ax.text(0, 1, text, va="top", ha="left", fontsize=8, transform=text_ax.transAxes)
    fig.tight_layout()
    save_figure(fig, path)


def strip(images, size=256):
    """Thumbnails of at most size x size side by side, top-aligned: an album as one picture."""
    for image in images:
        image.thumbnail((size, size))
    if len(images) == 1:
        return images[0]
    gap = size // 32
    sheet = Image.new("RGB", (sum(im.width for im in images) + gap * (len(images) - 1),
                              max(im.height for im in images)), "white")
    x = 0
    for image in images:
        sheet.paste(image.convert("RGB"), (x, 0))
        x += image.width + gap
    return sheet


def read_metrics_log(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: metrics log not found; train.py writes it beside the checkpoint "
                        f"(NAME.metrics.jsonl), or pass --metrics-log FILE")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):  # only the last line may be cut, by a run killed while writing it
                raise UserError(f"{path}:{number}: not a JSON line; is this a metrics log written by train.py?") from None
    if not any("train_loss" in r for r in records):
        raise UserError(f"{path}: no training steps logged; nothing to draw")
    return records


def draw_curves(path, records):
    """Training loss per step (raw and smoothed), validation loss per epoch, and the learning rate."""
    plt = pyplot()
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    rates = [(r["step"], r["lr"]) for r in records if "lr" in r]
    smooth, running = [], None
    for _, loss in train:  # the same running mean as train.py's progress bar
        running = loss if running is None else 0.9 * running + 0.1 * loss
        smooth.append(running)
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, sharex=True, figsize=(8, 6), gridspec_kw={"height_ratios": [3, 1]})
    steps = [s for s, _ in train]
    ax_loss.plot(steps, [loss for _, loss in train], alpha=0.3, color="C0", label="train loss per step")
    ax_loss.plot(steps, smooth, color="C0", label="train loss, running mean")
    if val:
        ax_loss.plot(*zip(*val), "o-", color="C1", label="validation loss")
    ax_loss.set_ylabel("loss per token")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if rates:
        ax_lr.plot(*zip(*rates), color="C2")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
