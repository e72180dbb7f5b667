"""Model folders (hub.py): the tiny model converted to a Hugging Face-style folder and back gives the
same tensors and stories; every script loads a folder and a hub name from the Hugging Face cache; the
model card's YAML header is the hub's; and each bad folder is refused with one line, nothing built."""
import hashlib
import json
import shutil
import struct

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

import backbones
import hub
from conftest import DATA, run_main, write_stories
from checkpoint import load_checkpoint, load_model
from cli import UserError
from storyteller import Storyteller

IMAGES = [DATA / "images" / "day_grass_house.jpg", DATA / "images" / "night_sea_boat.jpg"]


@pytest.fixture(scope="module")
def folder(tiny_checkpoint, tmp_path_factory):
    """tiny_checkpoint converted by `prepare.py convert`, beside a copy of it with an evaluate.py metrics.json
    (so the card shows the metrics) and its metrics log (so it shows the losses)."""
    root = tmp_path_factory.mktemp("folder")
    pt = root / "vlm_model.pt"
    shutil.copy(tiny_checkpoint, pt)
    shutil.copy(tiny_checkpoint.with_name("vlm_model.metrics.jsonl"), root)
    metrics = {"metrics": {"bleu4": 0.125, "cider_d": 1.5}, "settings": {"checkpoint": str(pt), "images": 43,
                                                                        "stories": "data/stories.txt", "strategy": "greedy"}}
    (root / "metrics.json").write_text(json.dumps(metrics))
    done = run_main("prepare.py", "convert", pt, root / "tiny_story", "--dataset", "user/sample-stories")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote the model folder {root / 'tiny_story'} (model.safetensors")
    return root / "tiny_story"


def greedy(checkpoint):
    return Storyteller(checkpoint, device="cpu").tell([str(p) for p in IMAGES], strategy="greedy", max_new_tokens=24)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """The .pt's greedy stories of IMAGES, which every way of loading its folder must tell."""
    return greedy(tiny_checkpoint)


def test_pt_to_folder_to_pt_gives_the_same_tensors_and_stories(tiny_checkpoint, folder, reference, tmp_path):
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                       "tokenizer.json", "tokenizer_config.json", "training.json"]
    back = tmp_path / "back.pt"
    done = run_main("prepare.py", "convert", folder, back)
    assert done.returncode == 0, done.stderr
    original, copy = torch.load(tiny_checkpoint, weights_only=True), torch.load(back, weights_only=True)
    assert list(copy["model"]) == list(original["model"])
    for name, tensor in original["model"].items():  # bit-identical: the same bytes, dtype and shape
        assert copy["model"][name].dtype == tensor.dtype and copy["model"][name].shape == tensor.shape
        assert torch.equal(copy["model"][name].flatten().view(torch.uint8), tensor.flatten().view(torch.uint8)), name
    # JSON has no tuples: the config comes back with lists in their place, which StoryConfig takes alike.
    assert copy["config"] == json.loads(json.dumps(original["config"]))
    assert (copy["tokenizer"], copy["eos_token"], copy["sources"]) == (original["tokenizer"], original["eos_token"],
                                                                      original["sources"])
    assert greedy(folder) == reference and greedy(back) == reference and all(len(s.split()) >= 5 for s in reference)


def test_tied_tensors_are_stored_once_and_come_back_tied(tiny_checkpoint, folder):
    """GPT-2's output layer is its input embedding: safetensors refuses shared memory, so the folder names it."""
    state = torch.load(tiny_checkpoint, weights_only=True)["model"]
    tied = [k for k in state if k.endswith("lm_head.weight")]
    assert tied, "the tiny decoder is stored with its tied output layer"
    declared, metadata = hub.read_header(folder / "model.safetensors", "f")
    assert tied[0] not in declared and tied[0] in json.loads(metadata["aliases"])
    loaded = load_checkpoint(folder)["model"]
    assert loaded[tied[0]] is loaded[json.loads(metadata["aliases"])[tied[0]]]


def test_a_folder_loads_through_generate_app_and_evaluate(folder, reference, tmp_path):
    import app
    stories = reference
    done = run_main("generate.py", *IMAGES, "--checkpoint", folder, "--strategy", "greedy", "--max-new-tokens", "24",
                    "--json", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["story"] for line in done.stdout.splitlines()] == stories
    from PIL import Image
    assert app.WebStoryteller(folder, "cpu").stories(Image.open(IMAGES[1]).convert("RGB"), strategy="greedy",
                                                     max_new_tokens=24) == [stories[1]]
    refs = tmp_path / "refs.txt"
    refs.write_text("".join(f"{p.name}\tA story about it.\n" for p in IMAGES))
    out = tmp_path / "metrics.json"
    done = run_main("evaluate.py", "--checkpoint", folder, "--images", DATA / "images", "--stories", refs,
                    "--strategy", "greedy", "--max-new-tokens", "24", "--rank-images", "0", "--device", "cpu", "--out", out)
    assert done.returncode == 0, done.stderr
    assert [json.loads(out.read_text())["stories"][p.name][0] for p in IMAGES] == stories


def fake_hub_cache(root, repo, folder):
    """The layout huggingface_hub writes: blobs named by their hash, a snapshot of links to them, refs/main."""
    base = root / f"models--{repo.replace('/', '--')}"
    revision = hashlib.sha1(repo.encode()).hexdigest()
    (base / "blobs").mkdir(parents=True)
    (base / "snapshots" / revision).mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(revision)
    for path in folder.iterdir():
        blob = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copy(path, base / "blobs" / blob)
        (base / "snapshots" / revision / path.name).symlink_to(f"../../blobs/{blob}")


def test_a_hub_name_resolves_from_the_cache_offline_and_an_uncached_one_is_one_line(folder, reference, tmp_path, monkeypatch):
    from huggingface_hub import constants
    fake_hub_cache(tmp_path / "hub", "user/tiny-story", folder)
    # HF_HUB_CACHE and HF_HUB_OFFLINE as a user sets them; huggingface_hub read them when this process
    # imported it, into the constants that snapshot_download reads at each call.
    for key, value in (("HF_HUB_CACHE", str(tmp_path / "hub")), ("HF_HUB_OFFLINE", True)):
        monkeypatch.setenv(key, str(int(value)) if value is True else value)
        monkeypatch.setattr(constants, key, value)
    common = ["--strategy", "greedy", "--max-new-tokens", "24", "--json", "--device", "cpu"]
    cached = run_main("generate.py", *IMAGES, "--checkpoint", "user/tiny-story", *common)
    assert cached.returncode == 0, cached.stderr
    assert [json.loads(line)["story"] for line in cached.stdout.splitlines()] == reference
    missing = run_main("generate.py", IMAGES[0], "--checkpoint", "user/other", *common)
    errors = [line for line in missing.stderr.splitlines() if line.startswith("error:")]
    assert missing.returncode == 2 and missing.stdout == "" and "Traceback" not in missing.stderr
    assert errors == ["error: cannot load the model 'user/other': not in the Hugging Face cache and the hub is not "
                      "reachable; nor is it a file or folder here; check the name, or fetch it where the hub is reachable (hf download user/other "
                      "--local-dir DIR) and pass --checkpoint DIR"]


def card_header(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_the_model_card_is_the_hubs_with_losses_metrics_and_samples(folder):
    card = (folder / "README.md").read_text()
    training = json.loads((folder / "training.json").read_text())
    assert card_header(card) == {"library_name": "pytorch", "pipeline_tag": "image-to-text",
                                 "datasets": ["user/sample-stories"], "tags": ["image-to-story", "clipcap"]}
    assert "initialised at random" in card  # the tiny preset has no base model
    assert training["command"].startswith("python train.py --preset tiny --images ") and training["command"] in card
    assert training["epochs"] == 40 and training["data"] == {"stories": 86, "images": 43, "file": "stories.txt"}
    assert f"- train loss (mean over the last epoch): {training['train_loss']:.4f}" in card
    assert f"- validation loss (last epoch): {training['val_loss']:.4f}" in card and 0 < training["val_loss"] < 5
    assert "- data: 86 stories of 43 images" in card and "| bleu4 | 0.125 |" in card and "| cider_d | 1.5 |" in card
    samples = [line for line in card.splitlines() if line.startswith("- `")]
    assert [s.split("`")[1] for s in samples] == ["day_grass_house.jpg", "day_grass_tree.jpg", "day_grass_balloon.jpg"]
    assert samples[0].removeprefix("- `day_grass_house.jpg`: ") == greedy_story(folder, "day_grass_house.jpg")


def greedy_story(checkpoint, name):
    return Storyteller(checkpoint, device="cpu").tell(str(DATA / "images" / name), strategy="greedy")


def test_the_card_names_the_small_presets_base_models_and_their_licence():
    config = {"encoder": "timm:tf_efficientnet_lite0", "mapper": "linear", "prefix_length": 10,
              "decoder": {"model_type": "llama"}}
    sources = {"encoder": "/home/me/repo/weights/tf_efficientnet_lite0.pth",
               "decoder": "/home/me/repo/weights/smollm2-135m-instruct"}
    card = hub.model_card(config, sources, {"args": {"preset": "small"}, "epochs": 10}, [], datasets=["user/photos"])
    assert card_header(card) == {"library_name": "pytorch", "pipeline_tag": "image-to-text", "license": "apache-2.0",
                                 "base_model": ["HuggingFaceTB/SmolLM2-135M-Instruct", "timm/tf_efficientnet_lite0.in1k"],
                                 "datasets": ["user/photos"], "tags": ["image-to-story", "clipcap"]}
    gpt2 = hub.model_card({**config, "encoder": "resnet50"}, {"encoder": "imagenet", "decoder": None},
                          {"args": {"preset": "gpt2", "decoder": "gpt2"}}, [])
    header = card_header(gpt2)  # a fine-tuned GPT-2 (MIT) on torchvision's ResNet-50 (BSD-3-Clause)
    assert header["base_model"] == ["openai-community/gpt2", "timm/resnet50.tv2_in1k"] and header["license"] == "other"


def test_chat_template_goes_with_the_tokenizer_files_and_a_rewrite_replaces_the_folder_whole(tiny_checkpoint, tmp_path):
    ckpt = load_checkpoint(tiny_checkpoint)
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    (tmp_path / ".chat.killed.tmp").mkdir()  # what a write killed before its rename leaves
    hub.write_folder(tmp_path / "chat", {**ckpt, "chat_template": template}, {}, "card\n")
    assert (tmp_path / "chat" / "chat_template.jinja").read_text() == template
    assert load_checkpoint(tmp_path / "chat")["chat_template"] == template
    hub.write_folder(tmp_path / "chat", {**ckpt, "chat_template": None}, {}, "second card\n")
    assert (tmp_path / "chat" / "README.md").read_text() == "second card\n"
    assert not (tmp_path / "chat" / "chat_template.jinja").exists()  # the earlier folder's files went with it
    assert [p.name for p in tmp_path.iterdir()] == ["chat"]  # no temporary folder left


def test_an_older_checkpoint_takes_the_chat_template_of_its_frozen_decoders_tokenizer(tiny_checkpoint, tmp_path):
    ckpt = load_checkpoint(tiny_checkpoint)
    tokenizer = backbones.tokenizer_from_json(ckpt["tokenizer"], ckpt["eos_token"])
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(tmp_path / "decoder")  # where a frozen decoder came from
    older = {k: v for k, v in ckpt.items() if k != "chat_template"}
    assert hub.chat_template({**older, "sources": {"decoder": str(tmp_path / "decoder")}}) == tokenizer.chat_template
    assert hub.chat_template({**older, "sources": {"decoder": str(tmp_path / "gone")}}) is None
    assert hub.chat_template({**older, "chat_template": "its own"}) == "its own"


def test_train_py_writes_the_folder_and_resume_takes_only_the_pt(tmp_path):
    out = tmp_path / "runs" / "mine"
    stories = write_stories(tmp_path / "stories.txt", [f"{p.name}\tA story about it." for p in IMAGES])
    base = ["--preset", "tiny", "--images", DATA / "images", "--stories", stories, "--epochs", "1", "--val-split", "0",
            "--device", "cpu"]
    done = run_main("train.py", *base, "--out", f"{out}/")
    assert done.returncode == 0, done.stderr
    assert f"wrote the model folder {out} (" in done.stdout + done.stderr
    assert (out / "model.safetensors").is_file() and (out.parent / "mine.pt").is_file()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary file or folder left
    stories = [greedy(out.parent / "mine.pt"), greedy(out)]
    assert stories[0] == stories[1]
    resumed = run_main("train.py", *base, "--out", f"{out}/", "--resume", out)
    assert resumed.returncode == 2 and resumed.stderr.splitlines()[-1] == (
        f"error: {out}: is a model folder, which holds no optimizer state; resume from the .pt that train.py saved "
        f"beside it (--out DIR/ writes DIR.pt), or train again without --resume")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "keep.jpg").write_bytes(b"mine")
    refused = run_main("train.py", *base, "--out", tmp_path / "photos")
    assert refused.returncode == 2 and [line for line in refused.stderr.splitlines() if "error:" in line] == [
        f"error: {tmp_path / 'photos'}: is a folder of other files, not a model folder; choose a new folder name"]
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["keep.jpg"] and not (tmp_path / "photos.pt").exists()


# ----------------------------------------------------------------------------- bad folders

def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def edit_config(path, change):
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def edit_tensors(path, change):
    """model.safetensors with its tensors changed by change(dict of tensors)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(path, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    change(tensors)
    save_file(tensors, path, metadata=metadata)  # (its aliases: the tied output layer)


def lying_offsets(path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    begin, end = header["mapper.bias"]["data_offsets"]
    header["mapper.bias"]["data_offsets"] = [begin + 10 ** 9, end + 10 ** 9]  # its size is right, its place is not
    path.write_bytes(safetensors_bytes(header, data[8 + n:]))


def first_mapper(tensors):
    return next(k for k in tensors if k.startswith("mapper"))


BAD_FOLDERS = [  # (case, how the good folder is spoiled, the line after "{folder}: ")
    ("weights missing", lambda f: (f / "model.safetensors").unlink(),
     "not a model folder (model.safetensors missing); a model folder is written by `train.py --out DIR/` or "
     "`prepare.py convert FILE.pt DIR/`"),
    ("config missing", lambda f: (f / "config.json").unlink(), "not a model folder (config.json missing)"),
    ("tokenizer missing", lambda f: (f / "tokenizer.json").unlink(), "not a model folder (tokenizer.json missing)"),
    ("config not JSON", lambda f: (f / "config.json").write_text("{'story_config': "), "config.json is not JSON ("),
    ("config of another format", lambda f: edit_config(f / "config.json", lambda c: c.update(format_version=7)),
     "its config.json is not a model folder's of this repo (format_version 1)"),
    ("an absurd model", lambda f: edit_config(f / "config.json", lambda c: c["story_config"]["decoder"].update(n_layer=10 ** 9)),
     "refused: its decoder config has n_layer = 1,000,000,000, above 16,777,216; nothing was built"),
    ("a tensor renamed", lambda f: edit_tensors(f / "model.safetensors", lambda t: t.update(renamed=t.pop(first_mapper(t)))),
     "its weights do not match its config (1 missing (mapper."),
    ("an extra tensor", lambda f: edit_tensors(f / "model.safetensors", lambda t: t.update(extra=torch.zeros(2))),
     "its weights do not match its config (0 missing, 1 unexpected tensors (extra, ...))"),
    ("a wrong shape", lambda f: edit_tensors(f / "model.safetensors", lambda t: t.update({first_mapper(t): torch.zeros(3)})),
     "its weights do not fit its config (size mismatch for mapper."),
    ("a wrong dtype", lambda f: edit_tensors(f / "model.safetensors", lambda t: t.update({first_mapper(t): t[first_mapper(t)].half()})),
     "its weights do not fit its config (mapper.bias is torch.float16, the model's torch.float32)"),
    ("lying offsets", lambda f: lying_offsets(f / "model.safetensors"), "refused: model.safetensors gives mapper.bias offsets ["),
    ("a huge header", lambda f: (f / "model.safetensors").write_bytes(struct.pack("<Q", 2 ** 40) + b"{}" * 100),
     "refused: model.safetensors claims a header of 1,099,511,627,776 bytes in a file of 208 (the limit is 16,777,216)"),
    ("a header not JSON", lambda f: (f / "model.safetensors").write_bytes(struct.pack("<Q", 4) + b"{{{{"),
     "refused: model.safetensors has a header that is not JSON"),
]


@pytest.fixture(scope="module")
def bad_folders(folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_folders")
    for case, spoil, _ in BAD_FOLDERS:
        shutil.copytree(folder, root / case.replace(" ", "_"))
        spoil(root / case.replace(" ", "_"))
    return root


def snapshot(root):
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.mark.parametrize("case, spoil, expected", BAD_FOLDERS, ids=[c[0] for c in BAD_FOLDERS])
def test_generate_refuses_a_bad_folder_with_one_line(case, spoil, expected, bad_folders, tmp_path):
    path = bad_folders / case.replace(" ", "_")
    before = snapshot(bad_folders)
    done = run_main("generate.py", IMAGES[0], "--checkpoint", path, "--device", "cpu")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr, done.stderr
    assert len(errors) == 1 and errors[0].startswith(f"error: {path}: {expected}"), errors
    assert snapshot(bad_folders) == before


@pytest.mark.parametrize("name", ["../user/name", "/no/such/model", "user/../../etc", "user/name/../../x", "user//x"])
def test_a_hub_name_with_path_tricks_is_one_line_and_never_asked_for(name, monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("asked the hub"))
    with pytest.raises(UserError) as err:
        load_checkpoint(name)
    assert str(err.value) == (f"{name}: no such checkpoint file or model folder, and not a hub name (user/name: letters, "
                              f"digits, '-', '_' and '.', without '..' or a leading '/'); pass a .pt file, a model "
                              f"folder or user/name")


def test_convert_refuses_a_bad_folder_and_writes_nothing(bad_folders, tmp_path):
    done = run_main("prepare.py", "convert", bad_folders / "a_wrong_dtype", tmp_path / "out.pt")
    assert done.returncode == 2 and "its weights do not fit its config" in done.stderr
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- fuzzing the safetensors header

GOOD_TENSORS = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64),
                "c": torch.zeros(0, 4, dtype=torch.float16)}


def good_file():
    from safetensors.torch import save
    return save(GOOD_TENSORS, metadata={"aliases": "{}"})


ENTRY = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "I64", "F16", "BF16", "U8", "X9", 3]),
    "shape": st.lists(st.integers(-2, 5) | st.sampled_from([2 ** 62, True]), max_size=3) | st.just("2x3"),
    "data_offsets": st.lists(st.integers(-8, 60) | st.sampled_from([2 ** 63, 1.5]), min_size=0, max_size=3),
})


@st.composite
def headers(draw):
    """A real small safetensors file, its header's entries replaced, added or dropped, its size field
    maybe lying, its bytes maybe cut short."""
    data = good_file()
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    for name in draw(st.lists(st.sampled_from(["a", "b", "c", "d", "__metadata__"]), max_size=3)):
        header[name] = draw(ENTRY | st.just(None) | st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))
    raw = json.dumps(header).encode() if draw(st.booleans()) else draw(st.binary(max_size=40))
    size = draw(st.sampled_from([len(raw), len(raw) + 1, max(len(raw) - 1, 0), 2 ** 40, 2 ** 64 - 1, 0]))
    blob = struct.pack("<Q", size) + raw + body
    return blob[:draw(st.integers(0, len(blob)))] if draw(st.booleans()) else blob


@settings(max_examples=200, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(blob=headers() | st.binary(max_size=64))
def test_any_safetensors_header_gives_its_tensors_or_one_line(blob, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "fuzz.safetensors"
    path.write_bytes(blob)
    try:
        tensors = hub.read_tensors(path, "fuzzed")
    except UserError as err:
        assert str(err).startswith("fuzzed: ") and "\n" not in str(err)
        return
    declared, _ = hub.read_header(path, "fuzzed")
    assert {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()} == {k: v[:2] for k, v in declared.items()}


def test_the_real_header_reads_back_exactly(tmp_path):
    path = tmp_path / "good.safetensors"
    path.write_bytes(good_file())
    tensors = hub.read_tensors(path, "good")
    assert set(tensors) == set(GOOD_TENSORS) and all(torch.equal(tensors[k], GOOD_TENSORS[k]) for k in GOOD_TENSORS)
