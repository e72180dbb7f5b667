"""Shared fixtures: a tiny model trained once on the sample data, offline."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"

# Nothing in the tests may reach the network: make the libraries fail fast instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def run_script(*args, cwd=ROOT, env=None, timeout=300):
    """Runs one of the repo's scripts as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The README's offline quick start: `python train.py --preset tiny` on the sample data."""
    import train
    out = tmp_path_factory.mktemp("tiny") / "vlm_model.pt"
    train.main(["--preset", "tiny", "--images", str(DATA / "images"), "--stories", str(DATA / "stories.txt"),
                "--out", str(out), "--device", "cpu"])
    return out


def write_stories(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path
