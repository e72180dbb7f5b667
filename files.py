"""Reading and writing files safely: atomic writes (a killed run leaves the old file or the new one,
never half of one) and torch.load of files from anywhere without running code."""
import os
import re
import tempfile
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from cli import UserError


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


@contextmanager
def atomic_write(path, mode: str = "w", what: str = "here", fix: str = "choose another path"):
    """A file (text, or bytes with mode "wb") that appears at path only when the with-block ends
    without an error: a failed or interrupted run leaves the previous file (or none), never half of one.
    It is on the disk, not only in the OS's cache, before it replaces the previous one."""
    path = Path(path)
    try:
        fd, tmp = temp_file_beside(path)
    except OSError as err:
        raise UserError(f"{path}: cannot write {what} ({err.strerror}); {fix}") from None
    try:
        text = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
        with os.fdopen(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
