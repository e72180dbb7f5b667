"""Command-line plumbing shared by the scripts: one-line errors, devices, argument types."""
import argparse
import math
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    try:
        device = torch.device(value) if value != "auto" else None
    except RuntimeError:
        device = False
    if device is False or (device is not None and device.type not in ("cpu", "cuda", "mps")):
        raise argparse.ArgumentTypeError(f"unknown device {value!r}; use auto, cpu, cuda, cuda:N or mps")
    return value


def checked_number(kind, value, ok, allowed):
    """An argparse type: value converted by kind and checked by ok, or refused naming the allowed range."""
    try:
        x = kind(value)
    except ValueError:
        x = None
    if x is None or not ok(x):
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}")
    return x


def positive_int(value):
    return checked_number(int, value, lambda n: n >= 1, "a positive integer")


def non_negative_int(value):
    return checked_number(int, value, lambda n: n >= 0, "0 or more")


def positive_float(value):
    return checked_number(float, value, lambda x: x > 0 and math.isfinite(x), "a positive number")


def non_negative_float(value):
    return checked_number(float, value, lambda x: x >= 0 and math.isfinite(x), "0 or more")


def fraction(value):
    return checked_number(float, value, lambda x: 0 <= x < 1, "in [0, 1)")


def top_p_value(value):
    return checked_number(float, value, lambda x: 0 < x <= 1, "in (0, 1]")
