"""Every bad input of train.py and generate.py (and app.py's own), as tables: exit code 2, one
line `error: ...` naming the file (and line) and what to do, no traceback, and no file created
or changed.

The scripts run in this process through run_cli, exactly as their `__main__` does, so the
table stays fast; an exception other than the clear error fails the test like a traceback would.
"""
import json
import os
import shutil
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import generate
import train
from conftest import DATA, write_stories
from backbones import load_resnet50_weights
from checkpoint import load_checkpoint
from cli import UserError, run_cli

GOOD = DATA / "images" / "day_grass_house.jpg"  # 320x240 = 76800 pixels
PIXEL_LIMIT = "100000"  # over GOOD, under big.png
PREVIOUS = b"the previous checkpoint, which must survive"

STORIES = {
    "good.txt": b"good.jpg\tA red house stood in the meadow.\n",
    "empty.txt": b"",
    "latin1.txt": "good.jpg\tCaf\u00e9 au lait.\n".encode("latin-1"),
    "utf16.txt": "good.jpg\tA story.\n".encode("utf-16"),
    "notab.txt": b"# a comment\ngood.jpg   A story after spaces, not a tab\n",
    "noimage.txt": b"\tA story without its image.\n",
    "nostory.txt": b"good.jpg\t  \n",
    "dotdot.txt": b"../secret.jpg\tClimbs out of the folder.\n",
    "absolute.txt": b"/etc/passwd\tAn absolute path.\n",
    "folder.txt": b"folder.jpg\tA folder, not a picture.\n",
    "missing.txt": b"good.jpg\tFine.\nmissing.jpg\tNo such file.\n",
    "zero.txt": b"empty.jpg\tA zero-byte file.\n",
    "text.txt": b"text.jpg\tA text file named .jpg.\n",
    "cut.txt": b"cut.jpg\tHalf a JPEG.\n",
    "bomb.txt": b"good.jpg\tFine.\nbig.png\tToo many pixels.\n",
    "album_gap.txt": b"good.jpg||good.jpg\tAn album with an empty name.\n",
    "album_escape.txt": b"good.jpg|x/../../secret.jpg\tAn album that climbs out.\n",
    "album_missing.txt": b"good.jpg|missing.jpg\tThe second picture is gone.\n",
    "csv.txt": b"".join(b"good.jpg,story %d\n" % i for i in range(50)),  # a CSV: a problem on every line
}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A user's folder: images good and broken, a stories file per case, a previous checkpoint."""
    root = tmp_path_factory.mktemp("bad_input")
    images = root / "images"
    images.mkdir()
    shutil.copy(GOOD, images / "good.jpg")
    (images / "empty.jpg").write_bytes(b"")
    (images / "text.jpg").write_text("this is not a picture\n")
    (images / "cut.jpg").write_bytes(GOOD.read_bytes()[: GOOD.stat().st_size // 2])
    Image.new("RGB", (400, 400), (9, 9, 9)).save(images / "big.png")  # 160000 pixels
    (images / "folder.jpg").mkdir()
    for name, data in STORIES.items():
        (root / name).write_bytes(data)
    (root / "out.pt").write_bytes(PREVIOUS)
    return root


@pytest.fixture(autouse=True)
def pixel_limit():
    """--max-image-pixels sets a Pillow global; each run here starts from Pillow's default."""
    before = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = before


def snapshot(folder):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def run(main, argv, capsys):
    """One command-line run in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: main([str(a) for a in argv]))
    out, err = capsys.readouterr()
    return stop.value.code, out, err


def check_refused(main, argv, expected, ws, capsys, lines=1):
    """Exit 2, the expected words (one or several pieces) on the last line, `lines` lines of errors,
    no traceback, nothing written."""
    before = snapshot(ws)
    code, out, err = run(main, argv, capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2, err
    for piece in [expected] if isinstance(expected, str) else expected:
        assert piece.format(ws=ws) in errors[-1], err
    assert len(errors) == lines and "Traceback" not in err, err
    assert snapshot(ws) == before and (ws / "out.pt").read_bytes() == PREVIOUS  # nothing new, nothing changed
    return out, err


# ----------------------------------------------------------------------------- train.py

TRAIN_CASES = [
    # stories file
    ("stories missing", ["--stories", "{ws}/nope.txt"], "{ws}/nope.txt: stories file not found; pass --stories FILE"),
    ("stories is a folder", ["--stories", "{ws}/images"], "{ws}/images: is a folder; pass --stories FILE"),
    ("stories empty", ["--stories", "{ws}/empty.txt"], "{ws}/empty.txt: no stories found; add lines of image_name<TAB>story"),
    ("not UTF-8", ["--stories", "{ws}/latin1.txt"], "{ws}/latin1.txt:1: not UTF-8 text; save the file as UTF-8"),
    ("UTF-16", ["--stories", "{ws}/utf16.txt"], "{ws}/utf16.txt: UTF-16 text; save the stories file as UTF-8"),
    ("binary stories", ["--stories", "{ws}/images/good.jpg"], "{ws}/images/good.jpg: a binary file, not text"),
    ("no tab", ["--stories", "{ws}/notab.txt"], "{ws}/notab.txt:2: expected image_name<TAB>story[<TAB>style], found 1"),
    ("empty image name", ["--stories", "{ws}/noimage.txt"], "{ws}/noimage.txt:1: empty image name"),
    ("empty story", ["--stories", "{ws}/nostory.txt"], "{ws}/nostory.txt:1: empty story for good.jpg"),
    ("name with ..", ["--stories", "{ws}/dotdot.txt"], "{ws}/dotdot.txt:1: image name '../secret.jpg' contains '..'; give a path inside the images folder"),
    ("absolute name", ["--stories", "{ws}/absolute.txt"], "{ws}/absolute.txt:1: image name '/etc/passwd' is an absolute path"),
    ("album with an empty name", ["--stories", "{ws}/album_gap.txt"],
     "{ws}/album_gap.txt:1: empty image name in the album 'good.jpg||good.jpg'"),
    ("album name with ..", ["--stories", "{ws}/album_escape.txt"],
     "{ws}/album_escape.txt:1: image name 'x/../../secret.jpg' contains '..'"),
    ("album image missing", ["--stories", "{ws}/album_missing.txt"], "{ws}/album_missing.txt:1: {ws}/images/missing.jpg: image not found"),
    ("name is a folder", ["--stories", "{ws}/folder.txt"], "{ws}/folder.txt:1: {ws}/images/folder.jpg: is a directory, not an image"),
    # images
    ("images folder missing", ["--images", "{ws}/nope", "--stories", "{ws}/good.txt"], "{ws}/nope: images folder not found; pass --images DIR"),
    ("images is a file", ["--images", "{ws}/good.txt"], "{ws}/good.txt: is a file, not a folder; pass --images DIR"),
    ("image missing", ["--stories", "{ws}/missing.txt"], "{ws}/missing.txt:2: {ws}/images/missing.jpg: image not found"),
    ("zero-byte image", ["--stories", "{ws}/zero.txt"], "{ws}/zero.txt:1: {ws}/images/empty.jpg: empty file (0 bytes)"),
    ("text named .jpg", ["--stories", "{ws}/text.txt"], "{ws}/text.txt:1: {ws}/images/text.jpg: not an image Pillow can read"),
    ("truncated JPEG", ["--stories", "{ws}/cut.txt"], "{ws}/cut.txt:1: {ws}/images/cut.jpg: truncated image file (the end is missing)"),
    ("decompression bomb", ["--stories", "{ws}/bomb.txt", "--max-image-pixels", PIXEL_LIMIT],
     "{ws}/bomb.txt:2: {ws}/images/big.png: 160000 pixels, over the limit of 100000 that guards against "
     "decompression bombs; if you trust the file, raise it with --max-image-pixels 160000 (0 = no limit)"),
    # flags
    ("negative epochs", ["--epochs", "-1"], "argument --epochs: must be a positive integer, got -1"),
    ("epochs not a number", ["--epochs", "ten"], "argument --epochs: must be a positive integer, got ten"),
    ("zero batch size", ["--batch-size", "0"], "argument --batch-size: must be a positive integer, got 0"),
    ("nan learning rate", ["--lr", "nan"], "argument --lr: must be a positive number, got nan"),
    ("negative weight decay", ["--weight-decay", "-0.1"], "argument --weight-decay: must be 0 or more, got -0.1"),
    ("val split 1", ["--val-split", "1"], "argument --val-split: must be in [0, 1), got 1"),
    ("prefix length 0", ["--prefix-length", "0"], "argument --prefix-length: must be a positive integer, got 0"),
    ("prefix fills the context", ["--prefix-length", "127"],
     "--prefix-length 127 leaves no room for a story in the decoder's 128 positions; use at most 126"),
    ("negative pixel limit", ["--max-image-pixels", "-1"], "argument --max-image-pixels: must be 0 or more, got -1"),
    ("unknown device", ["--device", "tpu"], "argument --device: unknown device 'tpu'; use auto, cpu, cuda, cuda:N or mps"),
    ("unknown preset", ["--preset", "huge"], ("argument --preset: invalid choice: 'huge' (choose from", "gpt2", "tiny")),
    ("GPT-2 folder missing", ["--preset", "gpt2", "--gpt2", "{ws}/no-gpt2"], "{ws}/no-gpt2: decoder folder not found"),
]
if not torch.cuda.is_available():
    TRAIN_CASES.append(("no CUDA here", ["--device", "cuda"], "--device cuda: CUDA is not available on this machine"))


@pytest.mark.parametrize("case, args, expected", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_refuses(case, args, expected, ws, capsys):
    base = ["--preset", "tiny", "--images", ws / "images", "--stories", ws / "good.txt", "--out", ws / "out.pt",
            "--epochs", "1", "--device", "cpu"]
    check_refused(train.main, base + [a.format(ws=ws) for a in args], expected, ws, capsys)


def test_a_file_with_a_problem_on_every_line_shows_the_first_twenty(ws, capsys):
    _, err = check_refused(train.main, ["--preset", "tiny", "--images", ws / "images", "--stories", ws / "csv.txt",
                                        "--out", ws / "out.pt"], "50 problems found", ws, capsys, lines=22)
    assert f"{ws}/csv.txt:20: expected image_name<TAB>story" in err and "csv.txt:21:" not in err
    assert "error: ... and 30 more" in err


# ----------------------------------------------------------------------------- generate.py

@pytest.fixture(scope="module")
def checkpoints(ws, tiny_checkpoint):
    """Files given as --checkpoint that are not a usable checkpoint."""
    folder = ws / "checkpoints"
    folder.mkdir()
    (folder / "folder.pt").mkdir()
    (folder / "empty.pt").write_bytes(b"")
    (folder / "text.pt").write_text("not a checkpoint\n")
    with zipfile.ZipFile(folder / "random.zip", "w") as z:
        z.writestr("notes.txt", "a zip, but not from torch.save")
    data = tiny_checkpoint.read_bytes()
    (folder / "half.pt").write_bytes(data[: len(data) // 2])
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    torch.save(ckpt["model"], folder / "state_dict.pt")  # weights without a config
    small = {**ckpt, "model": {}, "train": {}}
    torch.save({**small, "config": {**ckpt["config"], "layers": 12}}, folder / "unknown_key.pt")
    torch.save({**small, "config": {**ckpt["config"], "encoder": "vit"}}, folder / "unknown_encoder.pt")
    torch.save(small, folder / "no_tensors.pt")
    torch.save({**small, "model": {k: torch.zeros(1) for k in ckpt["model"]}}, folder / "wrong_shapes.pt")
    torch.save({**small, "tokenizer": 3}, folder / "no_tokenizer.pt")
    return folder


GENERATE_CHECKPOINT_CASES = [
    ("missing", "nope.pt", "nope.pt: checkpoint not found; train one with `python train.py`"),
    ("an empty folder", "folder.pt", "folder.pt: not a model folder (config.json, model.safetensors, tokenizer.json missing)"),
    ("empty file", "empty.pt", "empty.pt: empty file (0 bytes), not a checkpoint; copy it again"),
    ("a text file", "text.pt", "text.pt: not a checkpoint (torch.load cannot read this file)"),
    ("a random zip", "random.zip", "random.zip: not a checkpoint (torch.load cannot read this zip archive)"),
    ("cut in half", "half.pt", "half.pt: truncated or corrupt (the end of the file is missing); copy it again or re-train"),
    ("a bare state_dict", "state_dict.pt", "state_dict.pt: not a checkpoint written by this repo's train.py"),
    ("unknown config key", "unknown_key.pt", "unknown_key.pt: has a config this code cannot build (StoryConfig.__init__() got an unexpected keyword argument 'layers')"),
    ("unknown encoder", "unknown_encoder.pt", "unknown_encoder.pt: has a config this code cannot build (unknown encoder 'vit'"),
    ("tensors missing", "no_tensors.pt", "no_tensors.pt: its weights do not match its config ("),
    ("tensors of other shapes", "wrong_shapes.pt", "wrong_shapes.pt: its weights do not fit its config (size mismatch for"),
    ("tokenizer missing", "no_tokenizer.pt", "no_tokenizer.pt: incomplete checkpoint (tokenizer missing or malformed)"),
]


@pytest.mark.parametrize("case, name, expected", GENERATE_CHECKPOINT_CASES, ids=[c[0] for c in GENERATE_CHECKPOINT_CASES])
def test_generate_refuses_checkpoint(case, name, expected, checkpoints, ws, capsys):
    out, _ = check_refused(generate.main, [GOOD, "--checkpoint", checkpoints / name, "--device", "cpu"],
                           f"error: {checkpoints / name}" + expected[len(name):], ws, capsys)
    assert out == ""


GENERATE_FLAG_CASES = [
    ("top-p 0", ["--top-p", "0"], "argument --top-p: must be in (0, 1], got 0"),
    ("top-p above 1", ["--top-p", "1.5"], "argument --top-p: must be in (0, 1], got 1.5"),
    ("zero temperature", ["--temperature", "0"], "argument --temperature: must be a positive number, got 0"),
    ("negative top-k", ["--top-k", "-1"], "argument --top-k: must be 0 or more, got -1"),
    ("no new tokens", ["--max-new-tokens", "0"], "argument --max-new-tokens: must be a positive integer, got 0"),
    ("unknown strategy", ["--strategy", "nucleus"], ("argument --strategy: invalid choice: 'nucleus' (choose from", "greedy", "sample", "beam")),
    ("unknown device", ["--device", "gpu"], "argument --device: unknown device 'gpu'"),
    ("negative pixel limit", ["--max-image-pixels", "-5"], "argument --max-image-pixels: must be 0 or more, got -5"),
]


@pytest.mark.parametrize("case, args, expected", GENERATE_FLAG_CASES, ids=[c[0] for c in GENERATE_FLAG_CASES])
def test_generate_refuses_flag(case, args, expected, ws, capsys):
    check_refused(generate.main, [GOOD, "--checkpoint", ws / "out.pt", *args], expected, ws, capsys)


GENERATE_IMAGE_CASES = [  # (image, why it is refused); all given to one run, between two good images
    ("missing.jpg", "image not found"),
    ("folder.jpg", "is a directory, not an image"),
    ("empty.jpg", "empty file (0 bytes); copy it again or remove it"),
    ("text.jpg", "not an image Pillow can read (JPEG, PNG, GIF, WebP, TIFF, BMP ...); convert it to JPEG or PNG, "
                 "or remove it"),
    ("cut.jpg", "truncated image file (the end is missing); copy it again or remove it"),
    ("big.png", "160000 pixels, over the limit of 100000 that guards against decompression bombs; "
                "if you trust the file, raise it with --max-image-pixels 160000 (0 = no limit)"),
]


def test_generate_names_each_bad_image_and_still_writes_the_good_ones(tiny_checkpoint, ws, capsys):
    good = ws / "images" / "good.jpg"
    bad = [ws / "images" / name for name, _ in GENERATE_IMAGE_CASES]
    before = snapshot(ws)
    code, out, err = run(generate.main, [good, *bad, good, "--checkpoint", tiny_checkpoint, "--strategy", "greedy",
                                         "--max-new-tokens", "4", "--json", "--device", "cpu",
                                         "--max-image-pixels", PIXEL_LIMIT], capsys)
    assert code == 2
    assert err.splitlines() == [f"error: {path}: {why}" for path, (_, why) in zip(bad, GENERATE_IMAGE_CASES)]
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in records] == [str(good)] * 2 and all(r["story"] for r in records)
    assert snapshot(ws) == before


# ----------------------------------------------------------------------------- app.py

APP_FLAG_CASES = [
    ("port 0", ["--port", "0"], "argument --port: must be in [1, 65535], got 0"),
    ("unknown device", ["--device", "tpu"], "argument --device: unknown device 'tpu'"),
]


@pytest.mark.parametrize("case, args, expected", APP_FLAG_CASES, ids=[c[0] for c in APP_FLAG_CASES])
def test_app_refuses_flag(case, args, expected, ws, capsys):
    import app  # imports gradio: only when these run
    check_refused(app.parse_args, args, expected, ws, capsys)


@pytest.mark.parametrize("case, name, expected", GENERATE_CHECKPOINT_CASES[:7], ids=[c[0] for c in GENERATE_CHECKPOINT_CASES[:7]])
def test_app_names_a_bad_checkpoint(case, name, expected, checkpoints):
    import app  # the page shows this line instead of the model (app.main)
    with pytest.raises(UserError) as err:
        app.WebStoryteller(checkpoints / name, "cpu")
    assert str(err.value).startswith(f"{checkpoints / name}" + expected[len(name):])


# ----------------------------------------------------------------------------- unusual but valid

def unusual_images(folder):
    """The images users really have that must just work: (name, image file)."""
    folder.mkdir()
    Image.new("RGB", (1, 1), (200, 30, 30)).save(folder / "one_pixel.png")
    frames = [Image.new("RGB", (40, 30), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)).save(folder / "grey16.png")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (40, 30), (0, 128, 0)).save(folder / "exif_rotated.jpg", exif=exif)
    return sorted(folder.iterdir())


def test_unusual_images_train_and_generate_and_long_stories_are_cut_with_one_warning(tmp_path, tiny_checkpoint, capsys):
    images = unusual_images(tmp_path / "images")
    assert {Image.open(p).mode for p in images} >= {"CMYK", "I;16", "P"}  # really the unusual modes
    long_story = " ".join(f"w{i}" for i in range(300))  # well past the tiny model's 118 tokens
    lines = [f"{p.name}\tA short story about {p.stem}." for p in images] + [f"{p.name}\t{long_story}" for p in images]
    (tmp_path / "stories.txt").write_text("\n".join(lines) + "\n")
    code, out, err = run(train.main, ["--preset", "tiny", "--images", tmp_path / "images", "--stories", tmp_path / "stories.txt",
                                      "--out", tmp_path / "m.pt", "--epochs", "1", "--val-split", "0.4", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "4 stories held out for validation" in out  # so the count below includes the validation split
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {tmp_path / 'stories.txt'}: 5 of 10 stories are longer than the 118 tokens "
                        f"the model has room for and were cut (lines 6, 7, 8, 9, 10)"], err
    assert (tmp_path / "m.pt").is_file()

    code, out, err = run(generate.main, [*images, "--checkpoint", tiny_checkpoint, "--strategy", "greedy",
                                         "--max-new-tokens", "4", "--json", "--device", "cpu"], capsys)
    assert code == 0 and err == "", err
    assert [json.loads(line)["image"] for line in out.splitlines()] == [str(p) for p in images]


# ----------------------------------------------------------------------------- hostile files

class RunsCode:
    """Pickles as a call to os.system: what a hostile checkpoint carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_never_runs(tmp_path, tiny_checkpoint, capsys):
    marker = tmp_path / "code_ran"
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    evil = tmp_path / "evil.pt"  # a checkpoint like train.py's, with code where the training state goes
    torch.save({**ckpt, "model": {}, "train": RunsCode(marker)}, evil)
    legacy = tmp_path / "evil_legacy.pt"  # the pre-zip torch.save format, a bare pickle
    torch.save({"format": 1, "payload": RunsCode(marker)}, legacy, _use_new_zipfile_serialization=False)
    for path in (evil, legacy):  # the payload is live: an unsafe load runs it
        torch.load(path, weights_only=False)
        assert marker.exists()
        marker.unlink()

    code, out, err = run(generate.main, [GOOD, "--checkpoint", evil, "--device", "cpu"], capsys)
    assert code == 2 and out == ""
    assert err == (f"error: {evil}: refused: it holds pickled Python objects ({os.system.__module__}.system) beyond "
                   f"tensors and plain data; loading those can run code, so nothing in it was loaded or run; use a "
                   f"checkpoint from a source you trust\n")
    # the same for a checkpoint in the old format, and for train.py --encoder-weights
    for load in (load_checkpoint, lambda p: load_resnet50_weights(torch.nn.Module(), p)):
        for path in (evil, legacy):
            with pytest.raises(UserError, match="refused: it holds pickled Python objects"):
                load(path)
    assert not marker.exists()


def test_resume_is_refused_when_it_would_not_continue_the_same_run(tiny_checkpoint, tmp_path, monkeypatch):
    """With tiny_checkpoint's own settings, a resume is still refused, before any model is built, when
    the run had other processes, the file holds no training state, or the stories changed."""
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: pytest.fail("built the model to resume"))
    saved = torch.load(tiny_checkpoint, weights_only=True)
    two_processes = tmp_path / "two.pt"
    torch.save({**saved, "train": {**saved["train"], "world_size": 2}}, two_processes)
    no_state = tmp_path / "no_state.pt"
    torch.save({k: v for k, v in saved.items() if k != "train"}, no_state)
    stories_lines = [line for line in (DATA / "stories.txt").read_text().splitlines() if not line.startswith("#")]
    fewer = write_stories(tmp_path / "fewer.txt", stories_lines[1:])  # one story less
    for resume, stories, message in [
        (two_processes, DATA / "stories.txt", "was trained with 32 stories per step (2 process(es) x --batch-size 16 "
                                              "x --grad-accum 1), this run has 16; give --batch-size and --grad-accum "
                                              "that make 32 with 1 process(es), or resume with torchrun --nproc_per_node=2"),
        (no_state, DATA / "stories.txt", "holds no training state to resume from; train again without --resume"),
        (tiny_checkpoint, fewer, f"the stories changed since {tiny_checkpoint} was saved; resume with the same "
                                 f"data, or train again without --resume")]:
        with pytest.raises(UserError) as refused:
            train.main(["--preset", "tiny", "--images", str(DATA / "images"), "--stories", str(stories),
                        "--device", "cpu", "--out", str(tmp_path / "m.pt"), "--resume", str(resume)])
        assert str(refused.value) == f"{stories if resume == tiny_checkpoint else resume}: {message}"
    assert not (tmp_path / "m.pt").exists()
