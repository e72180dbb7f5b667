"""The CLIP encoder, ClipCap's transformer mapper and LoRA fine-tuning, offline: a tiny CLIP and a
tiny GPT-2 are saved here with save_pretrained and loaded by the real loading code."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig, GPT2Config, GPT2LMHeadModel

import checkpoint
import dataset
import train
from conftest import DATA, run_main, write_stories
from model import StoryConfig
from backbones import clip_settings, load_clip, load_decoder, train_tokenizer
from checkpoint import load_checkpoint, load_model
from cli import UserError
from storyteller import Storyteller

PHOTO = DATA / "images" / "day_grass_house.jpg"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny CLIPModel folder laid out like openai/clip-vit-base-patch32 (text tower included), and a tiny GPT-2."""
    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, projection_dim=24)
    clip = CLIPModel(CLIPConfig(text_config=dict(tower, vocab_size=100), projection_dim=24,
                                vision_config=dict(tower, image_size=32, patch_size=8)))
    clip.save_pretrained(root / "clip")
    stories = [line for line in (DATA / "stories.txt").read_text().splitlines() if not line.startswith("#")][:6]
    tokenizer = train_tokenizer([s.split("\t")[1] for s in stories], vocab_size=300)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=len(tokenizer),
                               bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)).save_pretrained(root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")
    return root, write_stories(root / "stories.txt", stories)


def probe_logits(model):
    """The model's logits, in eval mode, for a fixed story start and a fixed random image."""
    ids, mask = torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long)
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # draws nothing from torch's state
    training = model.training
    with torch.no_grad():
        logits = model.eval()(ids, mask, images=images).logits
    model.train(training)
    return logits


@pytest.fixture(scope="module")
def clip_lora_checkpoint(pretrained):
    """CLIP -> transformer mapper -> GPT-2 with LoRA adapters, a few steps of training; the trained
    model's probe_logits beside it, in trained_logits.pt, noted as train.py saves it."""
    root, stories = pretrained
    out = root / "m.pt"
    save = checkpoint.save_training

    def save_and_note(path, *, model, **kwargs):
        torch.save(probe_logits(model), root / "trained_logits.pt")
        return save(path, model=model, **kwargs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint, "save_training", save_and_note)
        train.main(["--gpt2", str(root / "gpt2"), "--encoder", "clip-vit-b32", "--clip", str(root / "clip"),
                    "--mapper", "transformer", "--mapper-layers", "1", "--lora", "--lora-targets", "c_attn,c_fc",
                    "--lr", "1e-2", "--stories", str(stories), "--images", str(DATA / "images"),
                    "--epochs", "2", "--batch-size", "3", "--val-split", "0", "--out", str(out), "--device", "cpu"])
    return out


def test_clip_preprocessing_matches_clip_image_processor():
    """The torchvision transform built from StoryConfig alone gives CLIPImageProcessor's pixels."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8))
    config = StoryConfig(**clip_settings(CLIPVisionConfig(image_size=32)))
    ours = dataset.image_transform(config)(image)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 32, 32)
    torch.testing.assert_close(ours, theirs, atol=0.016, rtol=0)  # at most one 8-bit level apart after rounding


def test_checkpoint_holds_only_the_mapper_and_the_adapters(pretrained, clip_lora_checkpoint):
    root, _ = pretrained
    ckpt = torch.load(clip_lora_checkpoint, weights_only=True)
    # The frozen CLIP and the base GPT-2 are reloaded from where they came from.
    assert ckpt["sources"] == {"encoder": str(root / "clip"), "decoder": str(root / "gpt2")}
    assert ckpt["config"]["encoder"] == "clip-vit-b32" and ckpt["config"]["mapper"] == "transformer"
    assert ckpt["config"]["lora"]["target_modules"] == ["c_attn", "c_fc"]
    decoder_keys = [k for k in ckpt["model"] if k.startswith("decoder.")]
    assert {k.split(".")[0] for k in ckpt["model"]} == {"mapper", "decoder"}
    assert decoder_keys and all(".lora_A." in k or ".lora_B." in k for k in decoder_keys)
    assert len(decoder_keys) == 4  # A and B for c_attn and c_fc of the one layer


def test_lora_keeps_the_base_weights_and_its_adapters_change_the_story(pretrained, clip_lora_checkpoint):
    root, _ = pretrained
    model, _ = load_model(load_checkpoint(clip_lora_checkpoint))
    model.eval()
    base = GPT2LMHeadModel.from_pretrained(root / "gpt2").state_dict()
    loaded = model.decoder.get_base_model().state_dict()
    for name, tensor in base.items():  # c_attn.weight became c_attn.base_layer.weight under peft
        key = name if name in loaded else name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(loaded[key], tensor), name
    clip = CLIPModel.from_pretrained(root / "clip").visual_projection.weight
    assert torch.equal(model.encoder.clip.visual_projection.weight, clip)

    ids, mask = torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        adapted = model(ids, mask, images=images).logits
        with model.decoder.disable_adapter():
            plain = model(ids, mask, images=images).logits
    assert (adapted - plain).abs().max() > 1e-2


def test_generate_rebuilds_clip_mapper_and_adapters_without_flags(clip_lora_checkpoint):
    teller = Storyteller(clip_lora_checkpoint, "cpu")  # what generate.py loads
    trained = torch.load(clip_lora_checkpoint.parent / "trained_logits.pt", weights_only=True)
    torch.testing.assert_close(probe_logits(teller.model), trained, rtol=0, atol=1e-6)
    result = run_main("generate.py", PHOTO, "--checkpoint", clip_lora_checkpoint, "--strategy", "greedy",
                      "--max-new-tokens", "8", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["story"] == teller.tell(PHOTO, strategy="greedy", max_new_tokens=8)


def test_generate_reloads_clip_and_the_decoder_from_elsewhere(pretrained, clip_lora_checkpoint, tmp_path):
    """The folders training took CLIP and GPT-2 from are gone (another machine): --clip and --decoder
    name where they are now, and the story is the one the checkpoint tells where they were."""
    root, _ = pretrained
    ckpt = torch.load(clip_lora_checkpoint, weights_only=True)
    moved = tmp_path / "moved.pt"
    torch.save({**ckpt, "sources": {"encoder": str(tmp_path / "gone" / "clip"), "decoder": str(tmp_path / "gone" / "gpt2")}},
               moved)
    story = lambda *flags: run_main("generate.py", PHOTO, "--checkpoint", *flags, "--strategy", "greedy",
                                    "--max-new-tokens", "8", "--json", "--device", "cpu")
    lost = story(moved)
    assert lost.returncode == 2 and str(tmp_path / "gone") in lost.stderr and "Traceback" not in lost.stderr
    found = story(moved, "--clip", root / "clip", "--decoder", root / "gpt2")
    assert found.returncode == 0, found.stderr
    assert found.stdout == story(clip_lora_checkpoint).stdout


def test_a_clip_that_cannot_be_had_offline_stops_with_the_ways_out():
    with pytest.raises(UserError, match=r"--clip DIR.*--encoder resnet50"):
        train.main(["--preset", "tiny", "--encoder", "clip-vit-b32", "--clip", "nobody/no-such-clip",
                    "--images", str(DATA / "images"), "--stories", str(DATA / "stories.txt")])


def test_a_folder_of_another_model_is_refused_not_filled_with_random_weights(pretrained):
    root, _ = pretrained
    with pytest.raises(UserError, match=r"gpt2: not a CLIP model \(it has no weights for .*--clip takes"):
        load_clip(str(root / "gpt2"))
    with pytest.raises(UserError, match=r"clip: not a causal LM model .*--decoder takes"):
        load_decoder(str(root / "clip"))
