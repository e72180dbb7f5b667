"""train.py with one moment of the run stalled, so that a test can stop it exactly there (not a test):

    python tests/stalled_train.py save MARKER ARGS...   # the second checkpoint stalls half-written
    python tests/stalled_train.py step MARKER ARGS...   # the second optimizer step stalls

MARKER is created when the run stalls; it then waits (up to 10 minutes) for the test's signal."""
import io
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402  (the repo's root is on the path only now)
import training  # noqa: E402
from cli import run_cli  # noqa: E402

what, marker, args = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
calls = []


def stall():
    marker.touch()
    time.sleep(600)


def stalled_save(real_save):
    def save(obj, f, *rest, **kwargs):
        if isinstance(obj, dict) and "train" in obj:  # a checkpoint, not a feature or anything else
            calls.append(obj)
            if len(calls) == 2:
                whole = io.BytesIO()
                real_save(obj, whole, *rest, **kwargs)
                f.write(whole.getvalue()[:whole.tell() // 2])
                f.flush()
                stall()
        return real_save(obj, f, *rest, **kwargs)
    return save


def stalled_step(real_step):
    def step(*rest, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            stall()
        return real_step(*rest, **kwargs)
    return step


if what == "save":
    torch.save = stalled_save(torch.save)
else:
    training.forward_backward = stalled_step(training.forward_backward)
run_cli(lambda: train.main(args))
