"""Model folders, the way the Hugging Face hub shares models: config.json, model.safetensors, the
tokenizer's own files, training.json and a README.md model card. Written atomically from a checkpoint,
read back into the same checkpoint dict (tensors without pickle, the safetensors header checked
before any tensor is read), and fetched by hub name (user/name) through huggingface_hub.

    python prepare.py convert vlm_model.pt my_model/    # and back: prepare.py convert my_model/ copy.pt
    hf upload user/my_model my_model/                    # the hub's own tool uploads it
    python generate.py photo.jpg --checkpoint user/my_model
"""
import glob
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

import backbones
import checkpoint
import dataset
from cli import UserError
from files import UMASK
from training import metrics_path

FOLDER_FORMAT = 1
CONFIG, WEIGHTS, TOKENIZER, TRAINING, CARD = "config.json", "model.safetensors", "tokenizer.json", "training.json", "README.md"
NEEDED = (CONFIG, WEIGHTS, TOKENIZER)  # what loading reads; training.json and the card are for people
# What a hub snapshot needs of a model repository: the folder's files and the tokenizer's (save_pretrained's).
HUB_FILES = [CONFIG, WEIGHTS, TOKENIZER, TRAINING, CARD, "tokenizer_config.json", "chat_template.jinja"]
# A folder is data from anywhere: nothing in it is read whole before its size is known to be sane.
MAX_JSON_BYTES = 64 * 2 ** 20  # the largest tokenizer.json of a published model is ~20 MB
MAX_HEADER_BYTES = 16 * 2 ** 20  # a safetensors header is ~100 bytes a tensor: this is 100,000+ tensors
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
REMAKE = "write it again with `train.py --out DIR/` or `prepare.py convert FILE.pt DIR/`"


# ----------------------------------------------------------------------------- where a checkpoint is

def is_hub_name(name: str) -> bool:
    """user/name as the hub spells it: never a path that climbs (..), starts at / or names a .pt file."""
    return bool(HUB_NAME.fullmatch(name)) and ".." not in name and "--" not in name and not name.endswith(".pt")


def find_folder(path) -> Path | None:
    """The model folder that --checkpoint names: a folder here, or a hub name's snapshot in the Hugging
    Face cache (fetched first when the hub is reachable); None for a file or a path that does not exist."""
    if Path(path).is_dir():
        return Path(path)
    if Path(path).exists() or not is_hub_name(str(path)):
        return None
    return snapshot(str(path))


def snapshot(name: str) -> Path:
    """The local folder of hub model `name`: from the cache, or downloaded (only the folder's files)."""
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError, or a repository id the hub refuses)
        pass
    ways_out = (f"nor is it a file or folder here; check the name, or fetch it where the hub is reachable "
                f"(hf download {name} --local-dir DIR) and pass --checkpoint DIR")
    backbones._check_hub("the model", name, ways_out)  # one line at once, not minutes of retries
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except Exception as err:  # a wrong name (RepositoryNotFoundError), a private model, a network error
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:150]
        raise UserError(f"cannot load the model {name!r} from the hub ({reason}); {ways_out}") from None


def not_found(path) -> str:
    """Why a --checkpoint that is neither a file, a folder nor a hub name was refused."""
    name = str(path)
    if "/" in name and not name.endswith(".pt"):  # meant as a hub name, but one the hub cannot have
        return (f"{name}: no such checkpoint file or model folder, and not a hub name (user/name: letters, digits, "
                f"'-', '_' and '.', without '..' or a leading '/'); pass a .pt file, a model folder or user/name")
    return (f"{name}: checkpoint not found; train one with `python train.py` (or `python train.py --preset tiny` "
            f"offline) or pass --checkpoint FILE, a model folder or a hub name user/name")


# ----------------------------------------------------------------------------- reading a folder

def read_json(path: Path, where: str):
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise UserError(f"{where}: refused: {path.name} is {size:,} bytes, over the limit of {MAX_JSON_BYTES:,}; "
                        f"nothing was built; {REMAKE}")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{where}: {path.name} is not JSON ({str(err)[:120]}); {REMAKE}") from None


def read_header(path: Path, where: str) -> tuple[dict, dict]:
    """The tensors a safetensors file declares ({name: (dtype, shape, (begin, end))}) and its metadata,
    every entry checked against the file before anything is read: 8 bytes of header size, the JSON
    header, then each tensor's bytes, which must tile the rest of the file exactly."""
    def refuse(what):
        raise UserError(f"{where}: refused: {WEIGHTS} {what}; nothing was built; {REMAKE}")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            refuse(f"is {size} bytes, too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > min(MAX_HEADER_BYTES, size - 8):
            refuse(f"claims a header of {n:,} bytes in a file of {size:,} (the limit is {MAX_HEADER_BYTES:,})")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        refuse("has a header that is not JSON")
    if not isinstance(header, dict):
        refuse("has a header that is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        refuse("has __metadata__ that is not text")
    data, tensors = size - 8 - n, {}
    for name, entry in header.items():
        shown = name[:60]
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            refuse(f"has a malformed entry for {shown}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            refuse(f"gives {shown} the dtype {str(dtype)[:20]}, not one of {', '.join(SAFETENSORS_DTYPES)}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 2 ** 40 for d in shape):
            refuse(f"gives {shown} a malformed shape")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(
                isinstance(o, int) and not isinstance(o, bool) for o in offsets) or not 0 <= offsets[0] <= offsets[1] <= data:
            refuse(f"gives {shown} offsets {str(offsets)[:40]} outside its {data:,} bytes of data")
        nbytes = math.prod(shape) * torch.empty((), dtype=SAFETENSORS_DTYPES[dtype]).element_size()
        if offsets[1] - offsets[0] != nbytes:
            refuse(f"gives {shown} {offsets[1] - offsets[0]:,} bytes, its shape {shape} needs {nbytes:,}")
        tensors[name] = (SAFETENSORS_DTYPES[dtype], tuple(shape), tuple(offsets))
    end = 0
    for name, (_, _, (begin, stop)) in sorted(tensors.items(), key=lambda item: item[1][2]):
        if begin != end:  # a gap, or two tensors sharing bytes: safetensors itself requires a tiling
            refuse(f"has tensors that overlap or leave gaps (at {name[:60]})")
        end = stop
    if end != data:
        refuse(f"has {data - end:,} bytes after its last tensor")
    return tensors, metadata


def read_tensors(path: Path, where: str) -> dict:
    """The tensors of a safetensors file, memory-mapped (no pickle: the format is a JSON header and raw
    bytes); tensors that training tied together (GPT-2's input and output embeddings) were stored once,
    under the first name, and come back as the same tensor under each."""
    from safetensors.torch import load_file
    declared, metadata = read_header(path, where)
    try:
        aliases = json.loads(metadata.get("aliases", "{}"))
    except json.JSONDecodeError:
        aliases = None
    if not isinstance(aliases, dict) or not all(isinstance(a, str) and t in declared and a not in declared
                                                 for a, t in aliases.items()):
        raise UserError(f"{where}: refused: {WEIGHTS} has malformed aliases in its metadata; nothing was built; {REMAKE}")
    try:
        tensors = load_file(path)
    except Exception as err:  # checked above, so only a file changed meanwhile or a bug of safetensors lands here
        raise UserError(f"{where}: {WEIGHTS} is unreadable ({str(err)[:120]}); {REMAKE}") from None
    return {**tensors, **{alias: tensors[target] for alias, target in aliases.items()}}


def read_folder(folder: Path, where: str) -> dict:
    """A model folder as the checkpoint dict checkpoint.load_checkpoint returns (without optimizer state)."""
    missing = [name for name in NEEDED if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{where}: not a model folder ({', '.join(missing)} missing); a model folder is written by "
                        f"`train.py --out DIR/` or `prepare.py convert FILE.pt DIR/`")
    config = read_json(folder / CONFIG, where)
    kinds = {"format_version": int, "story_config": dict, "sources": dict, "eos_token": str}
    if not isinstance(config, dict) or config.get("format_version") != FOLDER_FORMAT:
        raise UserError(f"{where}: its {CONFIG} is not a model folder's of this repo (format_version {FOLDER_FORMAT}); {REMAKE}")
    if wrong := [key for key, kind in kinds.items() if not isinstance(config.get(key), kind)]:
        raise UserError(f"{where}: its {CONFIG} has {', '.join(wrong)} missing or malformed; {REMAKE}")
    # (save_pretrained's indented JSON, parsed once by load_model; convert() stores the .pt's compact form)
    ckpt = {"format": checkpoint.CHECKPOINT_FORMAT, "config": config["story_config"], "sources": config["sources"],
            "model": read_tensors(folder / WEIGHTS, where), "tokenizer": read_text(folder / TOKENIZER, where),
            "eos_token": config["eos_token"]}
    if (folder / "chat_template.jinja").is_file():
        ckpt["chat_template"] = read_text(folder / "chat_template.jinja", where)
    training = read_json(folder / TRAINING, where) if (folder / TRAINING).is_file() else {}
    if isinstance(training, dict):  # people's information; nothing is built from it
        ckpt["train"] = {"args": training.get("args") or {}, "step": training.get("steps"),
                         "epoch": training.get("epochs"), **{k: training.get(k) for k in ("train_loss", "val_loss", "data")}}
    return ckpt


def read_text(path: Path, where: str) -> str:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise UserError(f"{where}: refused: {path.name} is over {MAX_JSON_BYTES:,} bytes; {REMAKE}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{where}: {path.name} is not UTF-8 text; {REMAKE}") from None


# ----------------------------------------------------------------------------- what trained it, for people

# Licences of the base models this repo's presets and docs use, from their hub pages (timm's come from timm).
LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0", "HuggingFaceTB/SmolLM2-135M": "apache-2.0",
            "HuggingFaceTB/SmolLM2-360M-Instruct": "apache-2.0", "openai-community/gpt2": "mit",
            "distilbert/distilgpt2": "apache-2.0", "openai/clip-vit-base-patch32": "mit"}
OLD_HUB_NAMES = {"gpt2": "openai-community/gpt2", "distilgpt2": "distilbert/distilgpt2"}  # (the hub redirects them)
# The flags that shape a run, in the order training.json's command gives them (train.py's flags).
COMMAND_FLAGS = ("preset", "images", "stories", "out", *(k for k in checkpoint.RESUME_MUST_MATCH if k != "preset"))
BOOLEAN_OPTIONAL = {"feature_norm", "train_encoder"}  # train.py's --x / --no-x flags


def training_command(args: dict) -> str:
    """The train.py command of a run, from the arguments its checkpoint records."""
    import shlex
    words = ["python", "train.py"]
    for key in COMMAND_FLAGS:
        value = args.get(key)
        skip = (key.startswith("lora_") and not args.get("lora")) or (key == "clip" and args.get("encoder") != "clip-vit-b32") \
            or (key == "mapper_layers" and args.get("mapper") != "transformer")
        if skip or value is None or (value is False and key not in BOOLEAN_OPTIONAL):
            continue
        flag = "--" + ("no-" if value is False else "") + key.replace("_", "-")
        words += [flag] if isinstance(value, bool) else [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return shlex.join(words)


def final_losses(log_path) -> dict:
    """{"train_loss": the mean over the last epoch's steps, "val_loss": the last one} from a metrics log."""
    records = []
    try:
        for line in Path(log_path).read_text(encoding="utf-8").splitlines():
            records.append(json.loads(line))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    train = [r for r in records if isinstance(r, dict) and isinstance(r.get("train_loss"), (int, float))]
    val = [r["val_loss"] for r in records if isinstance(r, dict) and isinstance(r.get("val_loss"), (int, float))]
    last = [r["train_loss"] for r in train if r.get("epoch") == train[-1].get("epoch")] if train else []
    return {"train_loss": sum(last) / len(last) if last else None, "val_loss": val[-1] if val else None}


def data_size(args: dict, data_id) -> dict | None:
    """{"stories", "images"} of the training stories file, if it is still there and unchanged (its
    hash is the one the checkpoint recorded, computed as train.py does)."""
    import hashlib
    try:
        examples, _ = dataset.parse_stories(args.get("stories") or "")
    except (UserError, OSError):
        return None
    if hashlib.sha256(repr([(ex.image, ex.story, ex.style) for ex in examples]).encode()).hexdigest()[:16] != data_id:
        return None
    return {"stories": len(examples), "images": len({name for ex in examples for name in ex.images}),
            "file": Path(args["stories"]).name}


def training_summary(ckpt: dict, pt_path) -> dict:
    """training.json: the arguments and command, data size, epochs, steps and final losses (from the
    metrics log beside pt_path, or as a folder converted to this checkpoint kept them)."""
    train = ckpt.get("train") or {}
    args = train.get("args") or {}
    losses = final_losses(metrics_path(pt_path)) or {k: train.get(k) for k in ("train_loss", "val_loss")}
    return {"command": training_command(args) if args else None, "args": args,
            "data": train.get("data") if isinstance(train.get("data"), dict) else data_size(args, train.get("data")),
            "epochs": train.get("epoch"), "steps": train.get("step"), **losses}


def base_models(config: dict, sources: dict, args: dict) -> list[dict]:
    """The pretrained models a checkpoint started from: {"part", "source", "hub", "license"} for the
    encoder and the decoder, hub and license None where not known. Frozen parts name their source;
    a fine-tuned one is the model training started from (train.py's --decoder), a random one none."""
    import timm
    import weights
    found = []
    decoder = sources.get("decoder") or (args.get("decoder") if args.get("preset") != "tiny" else None)
    if decoder:
        hub = backbones.SMALL_DECODER if Path(decoder).name == weights.LM_DIR else (
            OLD_HUB_NAMES.get(decoder, decoder) if is_hub_name(decoder) or decoder in OLD_HUB_NAMES else None)
        found.append({"part": "decoder", "source": decoder, "hub": hub, "license": LICENSES.get(hub)})
    encoder = config.get("encoder", "")
    source = sources.get("encoder") or args.get("encoder_weights") or {"resnet50": "imagenet"}.get(encoder) or (
        "timm" if encoder.startswith("timm:") else args.get("clip") if encoder == "clip-vit-b32" else None)
    if source:
        hub = license = None
        if encoder == "clip-vit-b32":
            hub = source if is_hub_name(source) else None
            license = LICENSES.get(hub)
        elif source in ("imagenet", "timm") or Path(source).name == weights.ENCODER_FILE:
            name = "resnet50.tv2_in1k" if encoder == "resnet50" else encoder.removeprefix("timm:")  # torchvision's V2
            cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name.split(".")[0]) else None
            hub, license = (getattr(cfg, "hf_hub_id", None), getattr(cfg, "license", None)) if cfg else (None, None)
        found.append({"part": "encoder", "source": source, "hub": hub, "license": license})
    return found


def sample_stories(teller, args: dict) -> list[tuple[str, str]]:
    """Greedy stories of the first three images (or albums) of the training stories file, if it is there."""
    try:
        names = dataset.read_image_names(args.get("stories") or "")[:3]
        folder = Path(args.get("images") or ".")
        samples = []
        for name in names:
            paths = [folder / n for n in name.split(dataset.ALBUM)]
            if len(paths) > teller.model.config.album_slots:
                continue
            samples.append((name, teller.tell([str(p) for p in paths], album=True, strategy="greedy")))
        return samples
    except (UserError, OSError):  # the data is not on this machine: a card without samples
        return []


def model_card(config: dict, sources: dict, training: dict, samples, metrics=None, datasets=(), title="") -> str:
    """README.md: the hub's model card, a YAML header (library_name, pipeline_tag, base_model,
    license, datasets) and what a person wants to know before using it."""
    from huggingface_hub import ModelCardData
    bases = base_models(config, sources, training.get("args") or {})
    hubs = [b["hub"] for b in bases if b["hub"]]
    licenses = {b["license"] for b in bases if b["license"]}
    data = ModelCardData(library_name="pytorch", pipeline_tag="image-to-text", base_model=hubs or None,
                         license=licenses.pop() if len(licenses) == 1 else "other" if licenses else None,
                         datasets=list(datasets) or None, tags=["image-to-story", "clipcap"])
    decoder = config.get("decoder", {}).get("model_type", "decoder")
    lines = ["---", data.to_yaml(), "---", "", f"# {title or 'An image-to-story model'}", "",
             f"Writes a short story about a photo: {config.get('encoder')} image features -> {config.get('mapper')} "
             f"mapper -> a {config.get('prefix_length')}-embedding prefix -> {decoder} language model (the ClipCap idea), "
             f"trained with the image-to-story repository's `train.py`. This folder holds the trained weights "
             f"(`model.safetensors`); frozen parts are loaded from their base models.", "",
             "```bash", "python generate.py photo.jpg --checkpoint USER/NAME      # or this folder's path", "```", "",
             "## Base models", ""]
    if not bases:
        lines.append("None: every part was initialised at random and trained here.")
    for b in bases:
        name = f"[{b['hub']}](https://huggingface.co/{b['hub']})" if b["hub"] else "not on the hub"
        lines.append(f"- {b['part']}: {name}, loaded from `{b['source']}`" + (f" ({b['license']})" if b["license"] else ""))
    lines += ["", "## Training", ""]
    if training.get("command"):
        lines += ["```bash", training["command"], "```", ""]
    if d := training.get("data"):
        lines.append(f"- data: {d['stories']} stories of {d['images']} images (`{d.get('file', 'stories file')}`)")
    lines.append(f"- epochs: {training.get('epochs')} ({training.get('steps')} optimizer steps)")
    for key, what in (("train_loss", "train loss (mean over the last epoch)"), ("val_loss", "validation loss (last epoch)")):
        lines.append(f"- {what}: " + (f"{training[key]:.4f}" if isinstance(training.get(key), (int, float)) else "not recorded"))
    if metrics:
        lines += ["", "## Evaluation", "", f"`evaluate.py` on {metrics.get('settings', {}).get('images', '?')} images "
                  f"(`{metrics.get('settings', {}).get('stories', '')}`, {metrics.get('settings', {}).get('strategy', '')}):",
                  "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in metrics.get("metrics", {}).items() if isinstance(v, (int, float))]
    lines += ["", "## Samples", ""]
    if samples:
        lines.append("Greedy decoding, images from the training stories file:")
        lines += [""] + [f"- `{name}`: {story}" for name, story in samples]
    else:
        lines.append("None: the training images were not on the machine that wrote this card.")
    return "\n".join(lines) + "\n"


def metrics_beside(pt_path) -> dict | None:
    """evaluate.py's metrics.json beside a checkpoint, if it was measured on that checkpoint."""
    path = Path(pt_path).parent / "metrics.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        return report if Path(report["settings"]["checkpoint"]).name == Path(pt_path).name else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ----------------------------------------------------------------------------- writing a folder

def out_paths(out: str) -> tuple[str, Path | None]:
    """train.py --out: a checkpoint file, or a model folder (a name ending in / or an existing folder),
    which is written from the checkpoint saved beside it (DIR.pt: it holds the optimizer state --resume needs)."""
    if not (out.endswith(("/", os.sep)) or Path(out).is_dir()):
        return out, None
    folder = Path(out)
    check_target(folder)
    return str(folder.parent / f"{folder.name}.pt"), folder


def check_target(folder: Path) -> None:
    """A model folder may replace an earlier one, never a folder of anything else."""
    if folder.name in ("", ".", ".."):
        raise UserError(f"{folder}: name the model folder (e.g. runs/my_model/)")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: is a file; a model folder goes to a new folder or replaces an earlier one")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / CONFIG).is_file():
        raise UserError(f"{folder}: is a folder of other files, not a model folder; choose a new folder name")


def write_folder(folder, ckpt: dict, training: dict, card: str) -> None:
    """Writes a model folder atomically: every file into a temporary folder beside it, on the disk,
    then renamed into place (an earlier model folder there is replaced whole), so a run killed at any
    moment leaves the old folder or the new one, never half of one."""
    from safetensors.torch import save_file
    folder = Path(folder)
    check_target(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        for leftover in folder.parent.glob(f".{glob.escape(folder.name)}.*.tmp"):  # what a killed write left
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    except OSError as err:
        raise UserError(f"{folder}: cannot write the model folder ({err.strerror}); choose another place") from None
    try:
        os.chmod(tmp, 0o777 & ~UMASK)  # mkdtemp's folder is private; the model folder is as readable as any other
        config = {"format_version": FOLDER_FORMAT, "library": "image-to-story", "story_config": ckpt["config"],
                  "sources": ckpt.get("sources", {}), "eos_token": ckpt["eos_token"]}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        tensors, aliases = {}, {}
        for name, tensor in ckpt["model"].items():  # safetensors stores each storage once: tied ones by name
            twin = next((n for n, t in tensors.items() if t.data_ptr() == tensor.data_ptr() and t.shape == tensor.shape
                         and t.stride() == tensor.stride() and t.dtype == tensor.dtype), None)
            if twin is not None:
                aliases[name] = twin
            else:
                tensors[name] = tensor.contiguous()
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt", "aliases": json.dumps(aliases)})
        tokenizer = backbones.tokenizer_from_json(ckpt["tokenizer"], ckpt["eos_token"])
        if isinstance(ckpt.get("chat_template"), str):
            tokenizer.chat_template = ckpt["chat_template"]
        tokenizer.save_pretrained(tmp)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
        (tmp / TRAINING).write_text(json.dumps(training, indent=2) + "\n", encoding="utf-8")
        (tmp / CARD).write_text(card, encoding="utf-8")
        for path in tmp.iterdir():
            os.chmod(path, 0o666 & ~UMASK)  # safetensors writes its file private
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if folder.is_dir():  # two renames: the old folder is whole until the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
            os.replace(folder, old)  # (named .tmp too: a write killed between the renames leaves it to clean up)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{folder}: cannot write the model folder ({err.strerror or err}); free some space or "
                        f"choose another place; an earlier folder there is unchanged") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_folder(pt_path, folder, datasets=()) -> str:
    """The model folder of a checkpoint file: its trained tensors exactly, the tokenizer, training.json,
    and a card with the measured losses, metrics.json's numbers when it sits beside the file, and three
    sample stories. Returns a line saying what was written."""
    from storyteller import Storyteller  # (it loads checkpoints through checkpoint.py, which reads folders here)
    ckpt = checkpoint.load_checkpoint(pt_path)
    check_target(Path(folder))
    teller = Storyteller(pt_path, device="cpu")  # builds it: a checkpoint that cannot be used is refused here
    training = training_summary(ckpt, pt_path)
    card = model_card(ckpt["config"], ckpt.get("sources", {}), training, sample_stories(teller, training["args"]),
                      metrics_beside(pt_path), datasets, title=Path(folder).name)
    write_folder(folder, {**ckpt, "chat_template": chat_template(ckpt)}, training, card)
    size = (Path(folder) / WEIGHTS).stat().st_size / 2 ** 20
    return f"wrote the model folder {folder} ({WEIGHTS} {size:.1f} MiB; upload it with `hf upload USER/NAME {folder}`)"


def chat_template(ckpt: dict) -> str | None:
    """The decoder's chat template: the checkpoint's, or for one saved before checkpoints kept it, that
    of the frozen decoder's own tokenizer (the same tokenizer: a frozen decoder keeps its own)."""
    if isinstance(ckpt.get("chat_template"), str) or not (ckpt.get("sources") or {}).get("decoder"):
        return ckpt.get("chat_template")
    try:
        template = backbones.load_tokenizer(ckpt["sources"]["decoder"]).chat_template
    except UserError:  # not on this machine: the folder is complete without it, generation does not use it
        return None
    return template if isinstance(template, str) else None


def convert(source, out, datasets=()) -> str:
    """prepare.py convert: a checkpoint file into a model folder, or a model folder (or hub name) into a
    checkpoint file, with the same tensors. Returns a line saying what was written."""
    folder = find_folder(source)
    if folder is None:
        if str(out).endswith(".pt"):
            raise UserError(f"{out}: a checkpoint file converts to a model folder; name a folder (e.g. my_model/)")
        return save_folder(source, out, datasets)
    if not str(out).endswith(".pt") or Path(out).is_dir():
        raise UserError(f"{out}: a model folder converts to a checkpoint file; name one ending in .pt")
    ckpt = checkpoint.load_checkpoint(source)
    model, tokenizer = checkpoint.load_model(ckpt, where=str(source))  # refuses what could not be used, before anything is written
    # safetensors keeps tensors sorted by name: back in the model's order, as train.py saves them; the
    # tokenizer in the compact JSON train.py stores
    ckpt["model"] = {k: ckpt["model"][k] for k in checkpoint.stored_state(model, ckpt["sources"])}
    ckpt["tokenizer"] = backbones.tokenizer_to_json(tokenizer)
    checkpoint.check_writable(out)
    checkpoint.save_checkpoint(ckpt, out)
    return f"wrote {out} (the folder's weights, tokenizer and training record; no optimizer state to resume from)"
