"""Stories file parsing, image loading and the training Dataset.

stories.txt holds one `image_name<TAB>story` per line (UTF-8; a BOM and CRLF are fine;
blank lines and `#` comments are skipped; an image may have several lines). An optional
third column names the story's style.
"""
import hashlib
import os
import random
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import torch
import torchvision
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.models import ResNet50_Weights

from cli import DataError, UserError
from files import os_error, temp_file_beside

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
# What load_image raises for a file that is not a usable image (UnidentifiedImageError is an OSError).
IMAGE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)
# load_image refuses every image over Image.MAX_IMAGE_PIXELS itself, with a clear error; Pillow
# would only warn up to twice that limit, so its warning is redundant.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


ALBUM = "|"  # separates the images of an album in a stories line: day1.jpg|day2.jpg<TAB>story


@dataclass(frozen=True)
class Example:
    image: str  # path relative to the images folder, or an album's paths joined by ALBUM
    story: str
    line: int  # line number in the stories file, for error messages
    style: str | None = None

    @property
    def images(self) -> tuple[str, ...]:
        """The image names of the story, in order: one, or an album's."""
        return tuple(self.image.split(ALBUM))


def read_examples(stories_path, images_dir, min_side=None) -> list[Example]:
    """Parses the stories file and opens every image it names, before any training starts.
    Raises DataError listing every problem at once, each with its file and line."""
    examples, problems = parse_stories(stories_path)
    problems += image_problems(examples, images_dir, stories_path, min_side)
    if problems:
        raise DataError([msg for _, msg in sorted(problems)])
    if not examples:
        raise UserError(f"{stories_path}: no stories found; add lines of image_name<TAB>story")
    return examples


def parse_stories(path) -> tuple[list[Example], list[tuple[int, str]]]:
    """The good lines of a stories file as Examples, and (line, message) for each bad one."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; pass --stories FILE (lines of image_name<TAB>story)")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: stories file not found; pass --stories FILE (lines of image_name<TAB>story)") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the stories file ({err.strerror})") from None
    # A whole file in the wrong format is one problem, not one per line.
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"{path}: UTF-16 text; save the stories file as UTF-8")
    if b"\x00" in data:
        raise UserError(f"{path}: a binary file, not text; --stories takes lines of image_name<TAB>story")
    examples, problems = [], []
    for number, line_bytes in enumerate(data.splitlines(), start=1):
        where = f"{path}:{number}:"
        try:
            line = line_bytes.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            problems.append((number, f"{where} not UTF-8 text; save the file as UTF-8"))
            continue
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) not in (2, 3):
            problems.append((number, f"{where} expected image_name<TAB>story[<TAB>style], "
                                     f"found {len(fields)} tab-separated field(s)"))
            continue
        image, story = ALBUM.join(name.strip() for name in fields[0].split(ALBUM)), fields[1]
        style = fields[2] if len(fields) == 3 and fields[2] else None
        if (why := name_problem(image)):
            problems.append((number, f"{where} {why}"))
        elif not story:
            problems.append((number, f"{where} empty story for {image}"))
        else:
            examples.append(Example(image, story, number, style))
    return examples, problems


def read_image_names(path) -> list[str]:
    """Image names from a list file: the first tab-separated field of each line (so a stories file
    works too; an album's names stay joined by ALBUM), blank lines and # comments skipped, each once, in order."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: image list not found" if not path.exists() else f"{path}: not a file")
    names, problems = {}, []
    for number, line_bytes in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = line_bytes.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            problems.append(f"{path}:{number}: not UTF-8 text; save the file as UTF-8")
            continue
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name = ALBUM.join(n.strip() for n in line.split("\t")[0].split(ALBUM))
        if (why := name_problem(name)):
            problems.append(f"{path}:{number}: {why}")
        else:
            names.setdefault(name, None)
    if problems:
        raise DataError(problems)
    if not names:
        raise UserError(f"{path}: no image names found; put one image name at the start of each line")
    return list(names)


def name_problem(field: str) -> str | None:
    """What is wrong with the image field of a line (one name, or an album's joined by ALBUM), or None."""
    names = field.split(ALBUM)
    if not field or not all(n.strip() for n in names):
        return "empty image name" + (f" in the album {field!r}" if len(names) > 1 else "")
    for name in names:
        if (why := _unsafe_name(name.strip())):
            return f"image name {name!r} {why}; give a path inside the images folder"
    return None


def _unsafe_name(name: str) -> str | None:
    """Why an image name would leave the images folder, or None if it stays inside."""
    for pure in (PurePosixPath(name), PureWindowsPath(name)):
        if pure.is_absolute() or pure.drive or pure.root:
            return "is an absolute path"
        if ".." in pure.parts:
            return "contains '..'"
    return None


def load_image(path, min_side: int | None = None) -> Image.Image:
    """Opens any image Pillow reads as an upright RGB image.

    EXIF orientation is applied, transparency is composited on white, 16-bit and float
    images are scaled to 8 bits, animations give their first frame. min_side lets a JPEG
    decode at a reduced scale that still covers that many pixels (much faster for photos).
    Raises one of IMAGE_ERRORS for a file that is not a usable image, and
    Image.DecompressionBombError for one with more pixels than Image.MAX_IMAGE_PIXELS
    (set by --max-image-pixels) before decoding it.
    """
    with Image.open(path) as img:  # reads the header only
        limit, pixels = Image.MAX_IMAGE_PIXELS, img.width * img.height
        if limit and pixels > limit:
            raise Image.DecompressionBombError(f"Image size ({pixels} pixels) exceeds limit of {limit} pixels")
        if min_side and img.format == "JPEG":
            img.draft("RGB", (min_side, min_side))
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)


def set_max_image_pixels(limit: int | None) -> None:
    """--max-image-pixels: None keeps Pillow's default (about 89 million), 0 removes the limit."""
    if limit is not None:
        Image.MAX_IMAGE_PIXELS = limit or None


def to_rgb(img: Image.Image) -> Image.Image:
    """An image of any mode as 8-bit RGB, as load_image gives it: transparency on white, 16-bit and
    float grey scaled to the full 8 bits (Pillow's own convert drops alpha, leaving what the transparent
    pixels held, often black, and clips 16-bit grey at 255)."""
    if img.mode.startswith("I") or img.mode == "F":
        # 16/32-bit grey: Pillow's convert would clip at 255, so scale to the full 8-bit range.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def image_transform(config):
    """The encoder's preprocessing: PIL RGB image -> normalised (3, S, S) float tensor.
    Its settings live in StoryConfig (for CLIP: those of CLIPImageProcessor), so no files are needed."""
    if config.encoder == "resnet50" and (config.image_size, config.resize_size) == (224, 232):
        return ResNet50_Weights.IMAGENET1K_V2.transforms()  # torchvision's own preprocessing
    return transforms.Compose([
        transforms.Resize(config.resize_size, transforms.InterpolationMode(config.interpolation), antialias=True),
        transforms.CenterCrop(config.image_size),
        transforms.ToTensor(),
        transforms.Normalize(config.image_mean, config.image_std),
    ])


def whole_picture(image: Image.Image, config) -> Image.Image:
    """The image centred on a white square just large enough that image_transform's centre crop
    keeps all of it: the whole picture, where the crop cuts off a wide one's sides and the edges of
    a cut-out. The classifier's tags read both (storyteller.picture_tags)."""
    if max(image.size) > 2 * config.resize_size:  # a panorama's square would be huge; the encoder sees
        image = image.copy()  # image_size pixels across it in the end, so twice resize_size loses nothing
        image.thumbnail((2 * config.resize_size, 2 * config.resize_size), Image.Resampling.BICUBIC)
    side = -(-max(image.size) * config.resize_size // config.image_size)  # the crop keeps image/resize of it
    square = Image.new("RGB", (side, side), (255, 255, 255))  # white: what transparency is composited on
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square


def describe_image_error(path, err: Exception) -> str:
    """One line saying why an image could not be used, and what to do."""
    if isinstance(err, Image.DecompressionBombError):
        found = re.search(r"\((\d+) pixels\)", str(err))
        pixels = int(found[1]) if found else None
        return (f"{path}: {pixels or 'too many'} pixels, over the limit of {Image.MAX_IMAGE_PIXELS} that guards "
                f"against decompression bombs; if you trust the file, raise it with --max-image-pixels "
                f"{pixels or 'N'} (0 = no limit)")
    if isinstance(err, FileNotFoundError):
        return f"{path}: image not found"
    if isinstance(err, IsADirectoryError) or Path(path).is_dir():
        return f"{path}: is a directory, not an image"
    if isinstance(err, PermissionError):
        return f"{path}: cannot read it (permission denied); check the file's permissions"
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        return f"{path}: empty file (0 bytes); copy it again or remove it"
    if isinstance(err, Image.UnidentifiedImageError):
        return (f"{path}: not an image Pillow can read (JPEG, PNG, GIF, WebP, TIFF, BMP ...); "
                "convert it to JPEG or PNG, or remove it")
    reason = getattr(err, "strerror", None) or str(err).strip() or type(err).__name__
    reason = reason.splitlines()[0][:200]
    if "truncated" in reason.lower():
        return f"{path}: truncated image file (the end is missing); copy it again or remove it"
    return f"{path}: unreadable image ({reason}); re-save it as JPEG or PNG, or remove it"


def image_problems(examples: list[Example], images_dir, stories_path, min_side=None) -> list[tuple[int, str]]:
    """Opens every listed image once; (line, message) for each one that cannot be used."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        what = "is a file, not a folder" if images_dir.exists() else "images folder not found"
        raise UserError(f"{images_dir}: {what}; pass --images DIR, the folder the image names are relative to")
    first_line = {}
    for ex in examples:
        for name in ex.images:  # each image of an album on its own: a picture may be in several
            first_line.setdefault(name, ex.line)

    def problem(name):
        path = images_dir / name
        try:
            load_image(path, min_side)
        except Exception as err:  # Pillow raises many types for broken files; all are reported
            return first_line[name], f"{stories_path}:{first_line[name]}: {describe_image_error(path, err)}"
        return None

    with ThreadPoolExecutor(max_workers=4) as pool:  # Pillow decodes outside the GIL
        return [p for p in pool.map(problem, first_line) if p]


def split_by_image(examples: list[Example], fraction: float, seed: int):
    """Holds out a fraction of the images (all their stories) for validation. Albums that share a
    picture, and that picture's own stories, are held out together: split by each line's image field
    alone, a picture could be trained on in one album and "unseen" in another's validation."""
    parent = {}  # picture -> a picture told with it; following parents leads to its group's root

    def root(name):
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name
    for ex in examples:  # the pictures of one line are one group
        for name in ex.images[1:]:
            parent[root(name)] = root(ex.images[0])
    # A group is named by the first image field among its lines: without shared pictures, the split is as before.
    fields = {}
    for ex in examples:
        fields.setdefault(root(ex.images[0]), []).append(ex.image)
    unit = {group: min(names) for group, names in fields.items()}
    images = sorted(unit.values())
    random.Random(seed).shuffle(images)
    n_val = int(len(images) * fraction)
    if n_val == 0 or n_val == len(images):
        return examples, []
    held_out = set(images[:n_val])
    return ([ex for ex in examples if unit[root(ex.images[0])] not in held_out],
            [ex for ex in examples if unit[root(ex.images[0])] in held_out])


class StoryDataset(Dataset):
    """(image, story token ids ending with EOS) pairs, each story's style id when style_id
    (StoryConfig.style_id of a model trained with styles) is given, and its length bucket when
    length_bucket (StoryConfig.length_bucket) is. The image is a preprocessed tensor, or its pooled
    encoder features when a features dict {image name: (feature_dim,) tensor} is given; with
    album=True (a model of several album slots) every story has a stack of them, one per image."""

    def __init__(self, examples, images_dir, tokenizer, transform, max_tokens: int, min_side=None, style_id=None,
                 features=None, album=False, length_bucket=None, prompts=None):
        self.examples = examples
        self.features = features
        self.album = album
        self.prompts = prompts  # {image name: its tag words' token ids}, for a model with tags
        self.style_ids = [style_id(ex.style) for ex in examples] if style_id else None
        self.images_dir = Path(images_dir)
        self.transform = transform
        self.min_side = min_side
        eos = tokenizer.eos_token_id
        # verbose=False: train.py reports the stories that are too long itself, in one line.
        ids = tokenizer([ex.story for ex in examples], add_special_tokens=False, verbose=False)["input_ids"]
        self.truncated = [ex.line for ex, x in zip(examples, ids) if len(x) + 1 > max_tokens]  # line numbers
        self.tokens = [torch.tensor(x[: max_tokens - 1] + [eos]) for x in ids]
        self.length_ids = [length_bucket(len(x)) for x in ids] if length_bucket else None

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        if self.features is not None:
            pictures = [self.features[name] for name in self.examples[i].images]
            key = "features"
        else:
            pictures = [self.transform(load_image(self.images_dir / name, self.min_side)) for name in self.examples[i].images]
            key = "image"
        item = {key: torch.stack(pictures) if self.album else pictures[0], "input_ids": self.tokens[i]}
        if self.style_ids is not None:
            item["style_id"] = self.style_ids[i]
        if self.length_ids is not None:
            item["length_id"] = self.length_ids[i]
        if self.prompts is not None:
            item["prompt_ids"] = self.prompts[self.examples[i].image]
        return item


class ImageDataset(Dataset):
    """Preprocessed images by name, for encoding them once into the feature cache."""

    def __init__(self, names, images_dir, transform, min_side=None):
        self.names, self.images_dir, self.transform, self.min_side = names, Path(images_dir), transform, min_side

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        return self.transform(load_image(self.images_dir / self.names[i], self.min_side))


def collate(batch, pad_id: int):
    """Stacks images (or features) and right-pads stories; the mask, not the pad id, marks padding.
    Albums of different lengths are padded at the end to the longest, album_mask marking the real images."""
    lengths = [len(item["input_ids"]) for item in batch]
    input_ids = torch.full((len(batch), max(lengths)), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, item in enumerate(batch):
        input_ids[row, : lengths[row]] = item["input_ids"]
        attention_mask[row, : lengths[row]] = 1
    key, name = ("features", "features") if "features" in batch[0] else ("image", "images")
    out = pad_albums([item[key] for item in batch], name) if batch[0][key].dim() in (2, 4) else \
        {name: torch.stack([item[key] for item in batch])}
    out.update(input_ids=input_ids, attention_mask=attention_mask)
    if "style_id" in batch[0]:
        out["style_ids"] = torch.tensor([item["style_id"] for item in batch])
    if "length_id" in batch[0]:
        out["length_ids"] = torch.tensor([item["length_id"] for item in batch])
    if "prompt_ids" in batch[0]:
        out["prompt_ids"], out["prompt_mask"] = left_pad([item["prompt_ids"] for item in batch], pad_id)
    return out


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists (a picture's tag words) -> (B, L) ids padded on the left, and their mask: the
    words then end right where the story starts."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        if row:
            ids[r, width - len(row):], mask[r, width - len(row):] = torch.tensor(row), 1
    return ids, mask


def pad_albums(albums: list[torch.Tensor], name="features") -> dict:
    """Albums of (images, ...) tensors -> {name: (B, S, ...) zero-padded to the longest, "album_mask": (B, S)}."""
    S = max(len(album) for album in albums)
    stacked = albums[0].new_zeros(len(albums), S, *albums[0].shape[1:])
    mask = torch.zeros(len(albums), S, dtype=torch.bool)
    for row, album in enumerate(albums):
        stacked[row, :len(album)], mask[row, :len(album)] = album, True
    return {name: stacked, "album_mask": mask}


# ----------------------------------------------------------------------------- feature cache

CACHE_VERSION = 1  # bump when load_image or the preprocessing code changes what an image's tensor is


def encoder_fingerprint(model, transform, min_side, dtype) -> str:
    """What an image's pooled features depend on besides its bytes: the encoder's name and weights,
    the preprocessing (sizes, transform, JPEG draft size), the compute dtype and the library versions."""
    h = hashlib.sha256(repr((CACHE_VERSION, model.config.encoder, model.config.image_size, model.config.resize_size,
                             min_side, repr(transform), str(dtype), torch.__version__,
                             torchvision.__version__)).encode())
    for name, tensor in model.encoder.state_dict().items():
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


class FeatureCache:
    """Pooled encoder features on disk, one small file per image: DIR/<encoder fingerprint>/<image hash>.pt.

    The fingerprint covers the encoder and the preprocessing, the file name the image's bytes, so a
    changed image or encoder misses the cache and is encoded again; nothing stale is ever served.
    Files are written atomically; a damaged one reads as missing and is encoded again.
    """

    def __init__(self, root, fingerprint: str, feature_dim: int):
        self.dir = Path(root) / fingerprint
        self.feature_dim = feature_dim

    @staticmethod
    def key(image_path) -> str:
        return hashlib.sha256(Path(image_path).read_bytes()).hexdigest()[:32]

    def load(self, key: str) -> torch.Tensor | None:
        try:
            features = torch.load(self.dir / f"{key}.pt", map_location="cpu", weights_only=True)
        except Exception:  # missing, or damaged by a crash or a full disk: encode it again
            return None
        # save writes float32: another dtype is a file from elsewhere, and would crash the float32 mapper mid-run
        ok = isinstance(features, torch.Tensor) and features.shape == (self.feature_dim,) and features.dtype == torch.float32
        return features if ok else None

    def save(self, key: str, features: torch.Tensor) -> None:
        tmp = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = temp_file_beside(self.dir / f"{key}.pt")
            with os.fdopen(fd, "wb") as f:
                torch.save(features.detach().float().cpu().clone(), f)
            os.replace(tmp, self.dir / f"{key}.pt")
        except (OSError, RuntimeError) as err:
            if tmp:
                Path(tmp).unlink(missing_ok=True)
            if (cause := os_error(err)) is None:
                raise
            raise UserError(f"{self.dir}: cannot write the feature cache ({cause.strerror or cause}); "
                            f"pass --feature-cache DIR somewhere writable, or --no-feature-cache") from None
