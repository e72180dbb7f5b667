"""The real (non-tiny) loading code, offline: a GPT-2 folder saved by save_pretrained and a
ResNet-50 state_dict file, both made here; and a clear stop when weights cannot be had."""
import pytest
import torch
import torchvision
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import DATA, run_main, run_scripts_together, write_stories
from backbones import load_tokenizer, train_tokenizer
from cli import UserError


def test_train_and_generate_from_local_gpt2_and_resnet50_files(tmp_path):
    stories = [line for line in (DATA / "stories.txt").read_text().splitlines() if not line.startswith("#")][:4]
    tokenizer = train_tokenizer([s.split("\t")[1] for s in stories], vocab_size=300)
    gpt2_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=len(tokenizer))).save_pretrained(gpt2_dir)
    tokenizer.pad_token = None  # as GPT-2's own tokenizer: end-of-text but no pad token
    tokenizer.save_pretrained(gpt2_dir)
    resnet = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), resnet)

    out = tmp_path / "m.pt"
    result = run_main("train.py", "--gpt2", gpt2_dir, "--encoder-weights", resnet, "--freeze-gpt2",
                      "--stories", write_stories(tmp_path / "s.txt", stories), "--images", DATA / "images",
                      "--epochs", "1", "--batch-size", "2", "--out", out, "--val-split", "0")
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(out, weights_only=True)
    # Frozen pretrained parts are reloaded from where they came from, not copied into the checkpoint.
    assert ckpt["sources"] == {"encoder": str(resnet), "decoder": str(gpt2_dir)}
    # The mapper trained; the tags' classifier is ResNet-50's own fc, stored as it is (the gpt2 preset tags).
    assert {k.split(".")[0] for k in ckpt["model"]} == {"mapper", "tagger"}
    assert torch.equal(ckpt["model"]["tagger.weight"], torch.load(resnet, weights_only=True)["fc.weight"])
    assert ckpt["config"]["image_size"] == 224 and ckpt["config"]["encoder"] == "resnet50"

    result = run_main("generate.py", DATA / "images" / "day_grass_house.jpg", "--checkpoint", out,
                      "--strategy", "greedy", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Generated Story:\n")


def test_missing_weights_offline_or_an_unreachable_hub_stop_at_once_with_the_ways_out(tmp_path):
    """`python train.py` (GPT-2 and ResNet-50 from the hub) with empty caches, in two processes at once:
    marked offline; and not marked offline, but the hub's name does not resolve (one line, not a
    minute of retries)."""
    offline = {"HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_OFFLINE": "1"}
    unreachable = {"HF_HOME": str(tmp_path / "hf2"), "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
                   "HF_ENDPOINT": "https://hub.invalid"}
    out = tmp_path / "m.pt"
    result, unreached = run_scripts_together((["train.py", "--out", out], offline),
                                             (["train.py", "--out", tmp_path / "m2.pt"], unreachable), timeout=120)
    assert result.returncode == 2
    assert "--decoder DIR" in result.stderr and "--preset tiny" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
    result = unreached
    assert result.returncode == 2 and "Retrying" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: cannot load the tokenizer of 'gpt2': not in the Hugging Face cache and the hub is not reachable; "
        "pass a local copy (--decoder DIR) or train offline with --preset tiny"]


def test_a_gpt2_folder_without_tokenizer_files_is_named(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UserError, match=r"gpt2: no tokenizer saved there .*--decoder DIR"):
        load_tokenizer(str(tmp_path / "gpt2"))


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused_before_training(tmp_path):
    import train
    stories = [line for line in (DATA / "stories.txt").read_text().splitlines() if not line.startswith("#")][:2]
    gpt2_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=100)).save_pretrained(gpt2_dir)
    train_tokenizer([s.split("\t")[1] for s in stories], vocab_size=300).save_pretrained(gpt2_dir)
    with pytest.raises(UserError, match=r"gpt2: its tokenizer has \d+ tokens, more than the model's 100"):
        train.main(["--gpt2", str(gpt2_dir), "--stories", str(write_stories(tmp_path / "s.txt", stories)),
                    "--images", str(DATA / "images"), "--out", str(tmp_path / "m.pt")])
    assert not (tmp_path / "m.pt").exists()
