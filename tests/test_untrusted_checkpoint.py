"""A checkpoint is data from anywhere: one whose config would build an absurd model is refused with
one line before anything is built, by every script that loads one (they all go through
load_model, which calls check_config_sane first)."""
import time

import pytest
import torch

from conftest import DATA, run_main
from checkpoint import check_config_sane, load_checkpoint, load_model
from cli import UserError

GOOD = DATA / "images" / "day_grass_house.jpg"


def edited(ckpt, **changes):
    """A copy of ckpt with config keys (and decoder keys, given as decoder_KEY) changed."""
    config = {**ckpt["config"], "decoder": dict(ckpt["config"]["decoder"])}
    for key, value in changes.items():
        if key.startswith("decoder_"):
            config["decoder"][key.removeprefix("decoder_")] = value
        else:
            config[key] = value
    return {**ckpt, "config": config}


CASES = [  # (name, config changes, what the line says)
    ("a billion layers", dict(decoder_n_layer=10 ** 9), "its decoder config has n_layer = 1,000,000,000, above 16,777,216"),
    ("negative width", dict(decoder_n_embd=-8), "its decoder config has hidden_size = -8, outside [1, 65,536]"),
    ("zero vocabulary", dict(decoder_vocab_size=0), "its decoder config has vocab_size = 0, outside [1, 4,194,304]"),
    ("billions of parameters", dict(decoder_n_layer=1000, decoder_n_embd=8192, decoder_n_head=64),
     "its config builds about 1,074 billion parameters, over the limit of 10 billion"),
    ("a huge mapper", dict(prefix_length=4000, mapper="mlp", decoder_n_positions=8192, decoder_n_embd=4096,
                           decoder_n_head=32), "its config builds about 134,252 billion parameters"),
    ("prefix longer than the context", dict(prefix_length=500),
     "its image prefix (500 positions) leaves no room for a story in the decoder's context of 128 positions"),
    ("huge images", dict(image_size=100_000), "its config has image_size = 100000, outside [1, 4,096]"),
    ("a million album slots", dict(album_slots=10 ** 6), "its config has album_slots = 1000000, outside [1, 64]"),
    ("albums longer than the context", dict(album_slots=20),
     "its image prefix (200 positions) leaves no room for a story in the decoder's context of 128 positions"),
    ("bad length buckets", dict(length_buckets=["short", 3]), "its config has length_buckets = ['short', 3], not two token counts"),
    ("unknown decoder type", dict(decoder_model_type="no-such-model"), "its decoder config cannot be read ("),
]
IDS = [c[0] for c in CASES]


@pytest.fixture(scope="module")
def crafted(tiny_checkpoint, tmp_path_factory):
    """Each case saved as a checkpoint file (plain tensors and data: it loads with weights_only=True)."""
    folder = tmp_path_factory.mktemp("crafted")
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    for name, changes, _ in CASES:
        torch.save(edited(ckpt, **changes), folder / f"{name.replace(' ', '_')}.pt")
    return folder


def path_of(crafted, name):
    return crafted / f"{name.replace(' ', '_')}.pt"


@pytest.mark.parametrize("name, changes, expected", CASES, ids=IDS)
def test_load_model_refuses_before_building(name, changes, expected, crafted):
    path = path_of(crafted, name)
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        load_model(load_checkpoint(path), where=str(path))
    # Building any of these would take minutes and gigabytes (or never finish): refused at once.
    assert time.perf_counter() - start < 2
    assert str(err.value).startswith(f"{path}: refused: {expected}")
    assert str(err.value).endswith("nothing was built; use a checkpoint written by this repo's train.py")
    assert "\n" not in str(err.value)


def test_generate_py_exits_2_with_one_line(crafted):
    name = "a billion layers"  # the other cases go through the same load_model, tested above
    path = path_of(crafted, name)
    done = run_main("generate.py", GOOD, "--checkpoint", path, "--device", "cpu")
    # (torch may log warnings of its own while importing; the refusal is the one error line)
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    assert line.startswith(f"error: {path}: refused: {dict((c[0], c[2]) for c in CASES)[name]}")


def test_train_py_resume_exits_2_with_one_line(crafted, tmp_path):
    path = path_of(crafted, "billions of parameters")
    out = tmp_path / "resumed.pt"
    done = run_main("train.py", "--preset", "tiny", "--images", DATA / "images", "--stories", DATA / "stories.txt",
                    "--device", "cpu", "--resume", path, "--out", out)
    errors = done.stderr.splitlines()
    assert done.returncode == 2 and [line for line in errors if line.startswith("error:")] == errors[-1:]
    assert errors[-1].startswith(f"error: {path}: refused: its config builds about 1,074 billion parameters")
    assert not out.exists() and "Traceback" not in done.stderr


def test_every_preset_passes_and_the_same_one_at_the_largest_sizes_is_refused(tiny_checkpoint):
    """The models this repo builds stay inside the limits: the tiny preset's, the default (ResNet-50 +
    GPT-2), the small preset (EfficientNet-Lite0 with tags + SmolLM2-135M-Instruct), CLIP ViT-B/32 with
    ClipCap's transformer mapper, GPT-2 XL and a Llama 3 8B, each config made offline from the published
    sizes. Each one is refused for its size with its decoder at the largest depth and width the check
    allows one by one (1,024 layers, 64,800 wide: a multiple of every head count here): the check reads
    these configs, it does not wave them through."""
    from transformers import CLIPVisionConfig, GPT2Config, LlamaConfig
    from backbones import clip_settings, tag_settings, timm_settings, train_tokenizer
    from model import StoryConfig
    chatml = train_tokenizer(["A small cat sat on a warm mat."] * 3, vocab_size=300)  # more tokens per word than SmolLM2's
    chatml.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                            "{% endfor %}<|im_start|>assistant\n")
    smollm2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                          tie_word_embeddings=True)
    llama3 = LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, vocab_size=128256,
                         max_position_embeddings=131072, num_attention_heads=32, num_key_value_heads=8)
    story = lambda decoder, **fields: StoryConfig(decoder=decoder.to_dict(), **fields).to_dict()
    presets = {
        "tiny": torch.load(tiny_checkpoint, weights_only=True)["config"],
        "gpt2": story(GPT2Config()),
        "small": story(smollm2, **timm_settings("timm:tf_efficientnet_lite0"), **tag_settings(3, chatml)),
        "clip": story(GPT2Config(), **clip_settings(CLIPVisionConfig(projection_dim=512)), mapper="transformer",
                      prefix_length=40),
        "gpt2-xl": story(GPT2Config(n_layer=48, n_embd=1600, n_head=25), mapper="transformer", prefix_length=40),
        "llama3-8b": story(llama3),
    }
    assert presets["small"]["tags"] == 3 and presets["clip"]["encoder_config"]["patch_size"] == 32
    for name, config in presets.items():
        check_config_sane(config, where=name)  # raises UserError if refused
        gpt2 = config["decoder"]["model_type"] == "gpt2"  # GPT-2's own names for depth and width
        largest = {"n_layer" if gpt2 else "num_hidden_layers": 1_024, "n_embd" if gpt2 else "hidden_size": 64_800}
        with pytest.raises(UserError, match=rf"^{name}: refused: its config builds about [\d,]+ billion parameters"):
            check_config_sane({**config, "decoder": {**config["decoder"], **largest}}, where=name)
