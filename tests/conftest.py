"""Shared fixtures: a tiny model trained once on the sample data, offline."""
import importlib
import io
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"

# Nothing in the tests may reach the network: make the libraries fail fast instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if "PYTEST_XDIST_WORKER" in os.environ:
    # The two workers of pytest.ini share the machine's two cores: a thread each, for them and the
    # scripts they start. torch's default, a thread per core in each, made four fight over two
    # (the suite took 310 s instead of 220 s).
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """Hands the files to the workers (--dist loadfile, in this order) so neither waits on the other's
    model: first a file that needs tiny_checkpoint, whose worker trains it (about a minute), then the
    files that don't, which the other worker runs meanwhile, then the rest."""
    needs = [item.path for item in items if "tiny_checkpoint" in item.fixturenames]
    rank = {path: 2 for path in needs} | ({needs[0]: 0} if needs else {})
    items.sort(key=lambda item: rank.get(item.path, 1))  # a stable sort: each file keeps its order


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's package; `playwright install` is not used
NO_CHROMIUM = f"{CHROMIUM} not found: the browser tests need Debian's chromium package (apt-get install -y chromium)"


def need_chromium():
    """Skips a browser test on a machine without Chromium, and says so at the end of the run
    (pytest_terminal_summary); with REQUIRE_CHROMIUM=1, as .ci/run sets it, the test fails instead."""
    if not Path(CHROMIUM).is_file():
        if os.environ.get("REQUIRE_CHROMIUM") == "1":
            pytest.fail(f"{NO_CHROMIUM}; REQUIRE_CHROMIUM=1 asks for the browser tests to run")
        pytest.skip(NO_CHROMIUM)


def pytest_terminal_summary(terminalreporter):
    """A skipped browser test is also one loud line in the summary, not only one among the skips."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if NO_CHROMIUM in str(r.longrepr)]
    if skipped:
        terminalreporter.write_sep("!", f"{len(skipped)} browser test(s) SKIPPED: {NO_CHROMIUM}", red=True, bold=True)


def run_script(*args, cwd=ROOT, env=None, timeout=300):
    """Runs one of the repo's scripts as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_scripts_together(*runs, timeout=300):
    """run_script for several (args, env) at once, each in its own process: their ten seconds of
    imports overlap on the two cores. Returns their CompletedProcesses, in order."""
    procs = [subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env={**os.environ, "PYTHONWARNINGS": "ignore", **env})
             for args, env in runs]
    done = []
    for proc, (args, _) in zip(procs, runs):
        out, err = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return done


def run_main(script, *args):
    """A script's main() in this process, exactly as its __main__ runs it (through cli.run_cli): the
    exit code, stdout and stderr of run_script without the ten seconds a new Python process spends
    importing torch and transformers. run_script stays for what needs a process of its own."""
    from cli import run_cli
    main = importlib.import_module(Path(script).stem).main
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            run_cli(lambda: main([str(a) for a in args]))
        except SystemExit as exit:
            code = exit.code
    return subprocess.CompletedProcess([script, *map(str, args)], code, out.getvalue(), err.getvalue())


def built_once(tmp_path_factory, name, build):
    """build(folder) -> a path inside it, run once per test session. The suite runs on two
    pytest-xdist workers (pytest.ini); the first to ask builds it in a folder both can see while the
    other waits on a lock, instead of training the same model twice."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    folder = tmp_path_factory.getbasetemp().parent / name  # the workers' basetemps share this parent
    with FileLock(f"{folder}.lock"):
        built = folder / ".built"
        if not built.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
            folder.mkdir()
            built.write_text(str(build(folder).relative_to(folder)))
        return folder / built.read_text()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The README's offline quick start: `python train.py --preset tiny` on the sample data."""
    def build(folder):
        import train
        train.main(["--preset", "tiny", "--images", str(DATA / "images"), "--stories", str(DATA / "stories.txt"),
                    "--out", str(folder / "vlm_model.pt"), "--device", "cpu"])
        return folder / "vlm_model.pt"
    return built_once(tmp_path_factory, "tiny", build)


def write_stories(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def tiny_train(root, out, *extra):
    """The tiny preset on root/images + root/stories.txt with a frozen random encoder (its features
    come from the cache after one encoding), nothing held out."""
    import train
    train.main(["--preset", "tiny", "--images", str(root / "images"), "--stories", str(root / "stories.txt"),
                "--no-train-encoder", "--val-split", "0", "--out", str(out), "--device", "cpu", *extra])
    return out


@pytest.fixture(scope="session")
def album_checkpoint(tmp_path_factory):
    """A tiny model trained on 160 synthetic albums of two or three shapes (tests/shapes.py), in
    root/m.pt beside root/train/ and the feature cache: about 16 s, shared by the album tests."""
    from shapes import make_albums
    def build(root):
        make_albums(root / "train", 160, seed=0)
        return tiny_train(root / "train", root / "m.pt", "--epochs", "18")
    return built_once(tmp_path_factory, "albums", build)


@pytest.fixture(scope="session")
def length_checkpoint(tmp_path_factory):
    """A tiny model trained with --length-control on 150 stories of 1, 2 or 3 sentences (tests/shapes.py)."""
    from shapes import make_lengths
    def build(root):
        make_lengths(root / "train", 150, seed=0)
        return tiny_train(root / "train", root / "m.pt", "--epochs", "10", "--length-control")
    return built_once(tmp_path_factory, "lengths", build)
