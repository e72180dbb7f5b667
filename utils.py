"""Shared plumbing: errors for the command line, devices, checkpoints, pretrained weights, tokenizers."""
import json
import math
import os
import re
import socket
import sys
import tempfile
import time
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch

CHECKPOINT_FORMAT = 1
EOS = "<|endoftext|>"  # GPT-2's end-of-text token; the tiny tokenizer uses the same string


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit code 2, no traceback."""


class DataError(UserError):
    """Several problems in the data, each already a line naming its file and line."""

    SHOWN = 20  # a wrong file (a CSV, say) can have a problem on every line: show the first few

    def __init__(self, problems: list[str]):
        self.problems = problems
        hidden = len(problems) - self.SHOWN
        super().__init__("\n".join(problems[:self.SHOWN] + ([f"... and {hidden} more"] if hidden > 0 else [])))


def run_cli(main) -> None:
    """Runs main(); turns a UserError into one line per problem on stderr and exit code 2,
    and Ctrl-C into exit code 130 without a traceback."""
    try:
        code = main()
    except UserError as err:
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr)
        if isinstance(err, DataError) and len(err.problems) > 1:
            print(f"error: {len(err.problems)} problems found; fix them and run again", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves first): no traceback
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def pick_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; anything else must be available here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available on this machine; use --device auto or cpu")
    return device


def parse_device(value: str) -> str:
    """argparse type for --device: auto, cpu, mps, cuda or cuda:N."""
    import argparse
    try:
        device = torch.device(value) if value != "auto" else None
    except RuntimeError:
        device = False
    if device is False or (device is not None and device.type not in ("cpu", "cuda", "mps")):
        raise argparse.ArgumentTypeError(f"unknown device {value!r}; use auto, cpu, cuda, cuda:N or mps")
    return value


# ----------------------------------------------------------------------------- checkpoints

def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _current_umask()


def temp_file_beside(path: Path) -> tuple[int, str]:
    """(fd, name) of a new temporary file in path's folder, to be renamed over path. mkstemp makes
    it private (0600); it gets the permissions open() would give path, so a shared checkpoint
    stays readable by the others who could read the file it replaces."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    if hasattr(os, "fchmod"):  # not on Windows before Python 3.13, where mkstemp's mode is not private anyway
        os.fchmod(fd, 0o666 & ~UMASK)
    return fd, tmp


def to_cpu(obj):
    """obj with every tensor in it (nested in dicts, lists, tuples) moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save_checkpoint(obj: dict, path) -> None:
    """Writes atomically: a temporary file in the same folder, flushed, then renamed over path.
    A run killed at any moment leaves either the old checkpoint or the new one, never half of one."""
    path = Path(path)
    try:
        fd, tmp = temp_file_beside(path)
    except OSError as err:
        raise UserError(f"{path}: cannot write the checkpoint ({err.strerror}); choose another --out") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        Path(tmp).unlink(missing_ok=True)
        if (cause := os_error(err)) is None:
            raise
        raise UserError(f"{path}: cannot write the checkpoint ({cause.strerror or cause}); "
                        f"free some space or choose another --out; the previous file is unchanged") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def os_error(err: BaseException) -> OSError | None:
    """The OSError behind err, if any: torch.save reports a failed write (disk full, file too large)
    as a RuntimeError raised while handling the OSError."""
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or err.__context__
    return err


def load_torch_file(path, what: str):
    """torch.load(weights_only=True) with one clear line for each way a file can be wrong.
    weights_only=True unpickles tensors and plain data only: a file carrying code is refused
    before anything in it runs."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a {what} file")
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        raise UserError(f"{path}: cannot read the {what} ({err.strerror}); check its permissions") from None
    if not head:
        raise UserError(f"{path}: empty file (0 bytes), not a {what}; copy it again")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it then refuses anyway
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, KeyError, EOFError, ...
        zipped = head == b"PK\x03\x04"  # torch.save writes a zip archive; old versions a bare pickle
        if zipped and not zipfile.is_zipfile(path):
            raise UserError(f"{path}: truncated or corrupt (the end of the file is missing); "
                            f"copy it again or re-train") from None
        if "Weights only load failed" in str(err) and (zipped or head.startswith(b"\x80")):
            found = re.search(r"GLOBAL (\S+)", str(err))
            raise UserError(f"{path}: refused: it holds pickled Python objects" + (f" ({found[1]})" if found else "")
                            + f" beyond tensors and plain data; loading those can run code, so nothing in it was "
                            f"loaded or run; use a {what} from a source you trust") from None
        kind = "zip archive" if zipped else "file"
        raise UserError(f"{path}: not a {what} (torch.load cannot read this {kind})") from None


def load_checkpoint(path) -> dict:
    """Loads a checkpoint written by train.py; a file can never run code (see load_torch_file)."""
    try:
        ckpt = load_torch_file(path, "checkpoint")
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint not found; train one with `python train.py` "
                        f"(or `python train.py --preset tiny` offline) or pass --checkpoint FILE") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a checkpoint written by this repo's train.py (format {CHECKPOINT_FORMAT}; "
                        f"a bare state_dict has no config to rebuild the model from)")
    required = {"config": dict, "model": dict, "tokenizer": str, "eos_token": str}
    wrong = [key for key, kind in required.items() if not isinstance(ckpt.get(key), kind)]
    if not isinstance(ckpt.get("sources", {}), dict):  # optional: no sources means every weight is stored
        wrong.append("sources")
    if wrong:
        raise UserError(f"{path}: incomplete checkpoint ({', '.join(wrong)} missing or malformed); re-train it")
    return ckpt


@contextmanager
def atomic_write(path, mode: str = "w"):
    """A file (text, or bytes with mode "wb") that appears at path only when the with-block ends
    without an error: a failed or interrupted run leaves the previous file (or none), never half of one."""
    path = Path(path)
    try:
        fd, tmp = temp_file_beside(path)
    except OSError as err:
        raise UserError(f"{path}: cannot write here ({err.strerror}); choose another path") from None
    try:
        text = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
        with os.fdopen(fd, mode, **text) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- training logs

def metrics_path(checkpoint) -> Path:
    """Where train.py logs a checkpoint's metrics: vlm_model.pt -> vlm_model.metrics.jsonl beside it."""
    return Path(checkpoint).with_suffix(".metrics.jsonl")


def _logged_step(line: str) -> float:
    """The step of one metrics-log line; a line cut short by a kill counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class MetricsLog:
    """One JSON object per line ({"step": 12, "epoch": 1, "train_loss": 3.2, "lr": 1e-3, "time": 4.1}),
    flushed as it goes, so a crashed run keeps its curve; `evaluate.py --curves` draws it. The same
    values go to TensorBoard (runs/<name> beside the log) when tensorboard is installed.
    resume_step=N continues the log of a run resumed at step N: records after N (logged before a
    kill, and trained again now) are dropped first, so each step appears once.

    A new run over an existing log writes .NAME.new beside it until saved() says its first
    checkpoint is written: the previous checkpoint keeps its own curve until it is replaced."""

    def __init__(self, path, resume_step: int | None = None):
        self.path = Path(path)
        self.pending = None
        try:
            if resume_step is not None and self.path.is_file():
                kept = [line for line in self.path.read_text(encoding="utf-8").splitlines(keepends=True)
                        if _logged_step(line) <= resume_step]
                with atomic_write(self.path) as f:
                    f.writelines(kept)
            elif resume_step is None and self.path.exists():
                self.pending = self.path.with_name(f".{self.path.name}.new")
            self.file = open(self.pending or self.path, "a" if resume_step is not None else "w", encoding="utf-8")
        except OSError as err:
            raise UserError(f"{self.path}: cannot write the metrics log ({err.strerror}); choose another --out") from None
        self.start = time.time()
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs `pip install tensorboard`; optional
        except ImportError:
            return
        self.tensorboard = SummaryWriter(self.path.parent / "runs" / self.path.name.removesuffix(".metrics.jsonl"))

    def write(self, step: int, **values) -> None:
        self.file.write(json.dumps({"step": step, **values, "time": round(time.time() - self.start, 3)}) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in values.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, step)

    def saved(self) -> None:
        """The run's checkpoint is written: from now on this is its log."""
        if self.pending is not None:
            os.replace(self.pending, self.path)  # the open file keeps writing to it under its new name
            self.pending = None

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def __str__(self):
        return str(self.path) + (f" and TensorBoard {self.tensorboard.log_dir}" if self.tensorboard else "")


# ----------------------------------------------------------------------------- pretrained weights

def _host_reachable(url: str) -> bool:
    """A DNS lookup, so an offline machine fails in a moment instead of after minutes of retries."""
    try:
        socket.getaddrinfo(urlparse(url).hostname, 443)
        return True
    except OSError:
        return False


OFFLINE_HINT = "pass a local copy ({flag}) or train offline with --preset tiny"


def _check_hub(what: str, name: str, ways_out: str) -> None:
    """Before a download: one line at once, not minutes of retries, when the hub cannot be reached."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE or not _host_reachable(constants.ENDPOINT):
        raise UserError(f"cannot load {what} {name!r}: not in the Hugging Face cache and the hub is not "
                        f"reachable; {ways_out}")


def check_model_path(name_or_dir: str, what: str = "GPT-2", flag: str = "--gpt2") -> None:
    """A value that is clearly a path must be a folder: never ask the hub for '/data/gpt2'."""
    path = Path(name_or_dir).expanduser()
    if path.is_file():
        raise UserError(f"{name_or_dir}: is a file; {flag} takes a hub name or a folder written by save_pretrained")
    if not path.exists() and (path.is_absolute() or name_or_dir.startswith((".", "~"))):
        raise UserError(f"{name_or_dir}: {what} folder not found; {flag} takes a hub name or a folder "
                        f"written by save_pretrained")


def _from_pretrained(cls, name_or_dir: str, what: str, flag: str, ways_out: str):
    """cls.from_pretrained from a local save_pretrained folder, the Hugging Face cache, or the hub.
    One-line UserErrors naming ways_out when none of those has it, and when the files lack weights
    the model needs (transformers would fill them with random values and only warn)."""
    from transformers.utils import logging as hf_logging
    check_model_path(name_or_dir, what, flag)

    def load(local_files_only):
        # transformers prints unexpected and missing weights as a long table; the missing ones are
        # checked below, and unexpected ones are fine (a CLIPModel's text tower when loading its vision tower).
        # Progress bars only for a download: a local load is quick, and an error stays one line.
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        if local_files_only:
            hf_logging.disable_progress_bar()
        try:
            return cls.from_pretrained(name_or_dir, output_loading_info=True, local_files_only=local_files_only)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()

    local = Path(name_or_dir).is_dir()
    try:
        model, info = load(local_files_only=True)
    except OSError:
        if local:
            raise UserError(f"{name_or_dir}: no {what} model saved there (expected config.json and weights "
                            f"from save_pretrained)") from None
        _check_hub(what, name_or_dir, ways_out)
        try:
            model, info = load(local_files_only=False)
        except OSError as err:
            raise UserError(f"cannot load {what} {name_or_dir!r} ({str(err).splitlines()[0]}); {ways_out}") from None
    except Exception as err:  # files of another model: transformers fails in many ways, each means the same
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"{name_or_dir}: not a {what} model (loading it failed: {reason}); {flag} takes a hub name or a folder "
                        f"written by save_pretrained") from None
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise UserError(f"{name_or_dir}: not a {what} model (it has no weights for {missing[0]} and "
                        f"{len(missing) - 1} more); {flag} takes a hub name or a folder written by save_pretrained")
    return model


def load_gpt2(name_or_dir: str):
    """GPT-2 weights from a local save_pretrained folder, the Hugging Face cache, or the hub."""
    from transformers import GPT2LMHeadModel
    return _from_pretrained(GPT2LMHeadModel, name_or_dir, "GPT-2", "--gpt2", OFFLINE_HINT.format(flag="--gpt2 DIR"))


def load_clip(name_or_dir: str):
    """A CLIP vision tower with its projection (CLIPVisionModelWithProjection), from a hub name such as
    openai/clip-vit-base-patch32 or a save_pretrained folder of a CLIPModel or of the vision tower alone."""
    from transformers import CLIPVisionModelWithProjection
    return _from_pretrained(CLIPVisionModelWithProjection, name_or_dir, "CLIP", "--clip",
                            "pass a local copy (--clip DIR) or use --encoder resnet50")


def load_gpt2_tokenizer(name_or_dir: str):
    """GPT-2's tokenizer from a save_pretrained folder, the Hugging Face cache, or the hub, with its
    end-of-text token as padding (GPT-2 has no pad token; padding is found by the attention mask)."""
    from transformers import AutoTokenizer
    check_model_path(name_or_dir)
    ways_out = OFFLINE_HINT.format(flag="--gpt2 DIR")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_dir, local_files_only=True)
    except OSError:
        tokenizer = None
    # A folder holding only the model's files gives an empty tokenizer, not an error; a byte-level
    # BPE such as GPT-2's has at least its 256 byte tokens.
    if tokenizer is None or len(tokenizer) <= 256:
        if Path(name_or_dir).is_dir():
            raise UserError(f"{name_or_dir}: no GPT-2 tokenizer saved there (expected the tokenizer files that "
                            f"save_pretrained writes); {ways_out}")
        _check_hub("the tokenizer of", name_or_dir, ways_out)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_dir)
        except OSError:
            raise UserError(f"cannot load the tokenizer of {name_or_dir!r}; {ways_out}") from None
    if tokenizer.eos_token is None:
        raise UserError(f"{name_or_dir}: its tokenizer has no end-of-text token, which ends every story; "
                        f"use GPT-2's tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_resnet50_weights(encoder: torch.nn.Module, weights_file=None) -> None:
    """ImageNet weights into a ResNet-50 built by model.build_encoder: from weights_file (a
    state_dict saved with torch.save) or through torchvision's weights API and its cache."""
    from torchvision.models import ResNet50_Weights
    if weights_file is not None:
        try:
            state = load_torch_file(weights_file, "ResNet-50 state_dict")
        except FileNotFoundError:
            raise UserError(f"{weights_file}: encoder weights file not found") from None
    else:
        weights = ResNet50_Weights.IMAGENET1K_V2
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
        if not cached.is_file() and not _host_reachable(weights.url):
            raise UserError("cannot load the ResNet-50 ImageNet weights: not in torchvision's cache and "
                            "download.pytorch.org is not reachable; "
                            + OFFLINE_HINT.format(flag="--encoder-weights FILE"))
        try:
            state = weights.get_state_dict(progress=True, check_hash=True)
        except Exception as err:
            raise UserError(f"cannot download the ResNet-50 ImageNet weights ({err}); "
                            + OFFLINE_HINT.format(flag="--encoder-weights FILE")) from None
    if not isinstance(state, dict):
        raise UserError(f"{weights_file}: expected a ResNet-50 state_dict")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the classifier is dropped
    try:
        encoder.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{weights_file}: not ResNet-50 weights ({str(err).splitlines()[0][:200]})") from None


# ----------------------------------------------------------------------------- tokenizers

def train_tokenizer(texts: list[str], vocab_size: int = 2000):
    """A byte-level BPE (GPT-2's scheme) trained on the given stories: the offline tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tokenizer_from_json(tok.to_str(), EOS)


def tokenizer_from_json(tokenizer_json: str, eos_token: str):
    """Rebuilds a tokenizer from the JSON string stored in a checkpoint (no files, no network)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json),
                                   eos_token=eos_token, pad_token=eos_token)


def tokenizer_to_json(tokenizer) -> str:
    return tokenizer.backend_tokenizer.to_str()


# ----------------------------------------------------------------------------- models

def load_model(ckpt: dict, gpt2=None, encoder_weights=None, clip=None, where="checkpoint"):
    """Rebuilds (model, tokenizer) from a checkpoint loaded by load_checkpoint (where: its path,
    for messages). Weights the checkpoint does not hold (a frozen pretrained encoder or GPT-2, the
    base under LoRA adapters) come from where training took them, or from the gpt2 / encoder_weights
    / clip overrides."""
    from model import StoryConfig, StoryModel
    incompatible = "it was written by an incompatible version of this code; re-train it"
    try:
        config = StoryConfig.from_dict(ckpt["config"])
    except (TypeError, KeyError, ValueError) as err:
        raise UserError(f"{where}: has a config this code cannot build ({err}); {incompatible}") from None
    sources = ckpt.get("sources", {})
    base = None
    if sources.get("decoder") is not None:
        name = gpt2 or sources["decoder"]
        base = load_gpt2(name).state_dict()  # StoryModel loads it before LoRA adapters wrap GPT-2
    try:
        model = StoryModel(config, decoder_weights=base)
    except (TypeError, KeyError, ValueError) as err:
        raise UserError(f"{where}: has a config this code cannot build ({err}); {incompatible}") from None
    except RuntimeError:
        if base is None:
            raise
        raise UserError(f"{name}: this GPT-2 does not have the size {where} was trained with") from None
    if sources.get("encoder") is not None and config.encoder == "clip-vit-b32":
        name = clip or sources["encoder"]
        try:
            model.encoder.clip.load_state_dict(load_clip(name).state_dict())
        except RuntimeError:
            raise UserError(f"{name}: this CLIP does not have the size {where} was trained with") from None
    elif sources.get("encoder") is not None:
        path = encoder_weights or (None if sources["encoder"] == "imagenet" else sources["encoder"])
        load_resnet50_weights(model.encoder, path)
    state = ckpt["model"]
    expected = set(stored_state(model, sources))
    if set(state) != expected:
        raise UserError(f"{where}: its weights do not match its config ({len(expected - set(state))} missing, "
                        f"{len(set(state) - expected)} unexpected tensors); {incompatible}")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), "")
        raise UserError(f"{where}: its weights do not fit its config ({detail[:200]}); {incompatible}") from None
    try:
        tokenizer = tokenizer_from_json(ckpt["tokenizer"], ckpt["eos_token"])
    except Exception as err:  # the tokenizers library raises a bare Exception for bad JSON
        raise UserError(f"{where}: its tokenizer is unreadable ({str(err)[:200]}); re-train it") from None
    return model, tokenizer


def stored_state(model, sources: dict) -> dict:
    """The part of the state_dict a checkpoint must carry: every module without a source to reload
    from (mapper, feature_norm, style, trained or random encoder and GPT-2), and LoRA adapters."""
    return {k: v for k, v in model.state_dict().items()
            if sources.get(k.split(".")[0]) is None or ".lora_" in k}
