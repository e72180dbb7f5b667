"""--quantize int8: the decoder's logits stay close to float32's, every decoding strategy runs, and
where it cannot work it says so in one line."""
import copy
import json
import warnings

import pytest
import torch
from PIL import Image
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import app
import evaluate
import generate
import quantize
from conftest import DATA, run_main
from test_cli import THINGS
from test_evaluate import sample_stories

QuantizedLinear = torch.ao.nn.quantized.dynamic.Linear


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=100,
                                      bos_token_id=0, eos_token_id=0))


def tiny_llama(tied):
    # Odd sizes on purpose: int8 kernels often want multiples of 8 or 16.
    return LlamaForCausalLM(LlamaConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=99,
                                        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0))


def lora_gpt2():
    from peft import LoraConfig, get_peft_model
    with warnings.catch_warnings():  # as model.py: peft calls a name transformers deprecated
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; trained adapters are not
            torch.nn.init.normal_(p, std=0.2)
    return model


@pytest.mark.parametrize("build", [tiny_gpt2, lambda: tiny_llama(tied=False), lambda: tiny_llama(tied=True), lora_gpt2],
                         ids=["gpt2", "llama", "llama-tied", "gpt2-lora"])
def test_int8_logits_stay_close_to_float32(build):
    torch.manual_seed(0)
    decoder = build().eval()
    reference = copy.deepcopy(decoder)
    embedding = decoder.get_input_embeddings().weight.detach().clone()
    ids = torch.randint(0, 99, (3, 12))
    embeds = torch.randn(3, 5, embedding.shape[1])  # an image prefix is embeddings, not tokens
    with torch.no_grad():
        expected = reference(ids).logits
        expected_prefixed = reference(inputs_embeds=embeds).logits
        decoder = quantize.quantize_decoder(decoder, "int8")
        logits, prefixed = decoder(ids).logits, decoder(inputs_embeds=embeds).logits

    from transformers.pytorch_utils import Conv1D
    assert not any(isinstance(m, (torch.nn.Linear, Conv1D)) for m in decoder.modules())  # every one became int8
    assert sum(isinstance(m, QuantizedLinear) for m in decoder.modules()) >= 2 * 4 + 1  # 2 layers' attention, MLP, head
    assert isinstance(decoder.get_output_embeddings(), QuantizedLinear)  # the LM head too
    # The input embedding, shared with the head or not, is float and unchanged: the prefix lives there.
    assert torch.equal(decoder.get_input_embeddings().weight, embedding)
    for got, want in ((logits, expected), (prefixed, expected_prefixed)):
        # One int8 scale per activation tensor: about 1% of the largest logit off, 4% with large adapters.
        assert (got - want).abs().max() < 0.05 * want.abs().max()
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_every_strategy_runs_with_int8(tiny_checkpoint, capsys):
    image = str(DATA / "images" / "night_sea_boat.jpg")
    common = [image, "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--quantize", "int8", "--json"]
    for flags, stories in ([["--strategy", "greedy"], 1], [["--strategy", "beam"], 1], [["--seed", "0"], 1],
                           [["--seed", "0", "--num-stories", "3"], 3],
                           [["--strategy", "beam", "--num-beams", "3", "--num-stories", "2"], 2]):
        assert generate.main(common + flags) == 0
        records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert len(records) == stories and all(len(r["story"].split()) >= 5 for r in records), (flags, records)
        if stories > 1:
            assert len({r["story"] for r in records}) == stories  # several stories, not one repeated


def test_int8_stories_still_follow_the_picture(tiny_checkpoint):
    """As test_cli's test of the float32 model: greedy int8 stories name what each drawn scene shows."""
    images = sorted(p for p in (DATA / "images").glob("*.jpg") if any(t in p.stem for t in THINGS))
    result = run_main("generate.py", *images, "--checkpoint", tiny_checkpoint, "--strategy", "greedy", "--json",
                      "--quantize", "int8", "--device", "cpu")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    stories = {r["image"]: r["story"] for r in map(json.loads, result.stdout.splitlines())}
    right = sum(THINGS[[t in p for t in THINGS].index(True)] in stories[p] for p in stories)
    assert len(stories) == len(images) and right >= 0.8 * len(images), stories


def test_app_and_evaluate_take_int8_too(tiny_checkpoint, tmp_path, capsys):
    image = DATA / "images" / "night_sea_boat.jpg"
    [story] = app.WebStoryteller(tiny_checkpoint, "cpu", quantize_method="int8").stories(Image.open(image).convert("RGB"), strategy="greedy")
    generate.main([str(image), "--checkpoint", str(tiny_checkpoint), "--strategy", "greedy", "--json", "--device", "cpu",
                   "--quantize", "int8"])
    assert story == json.loads(capsys.readouterr().out)["story"]  # the page and the script decode alike

    stories, losses = sample_stories(tmp_path, 3), {}
    for method in ("none", "int8"):
        out = tmp_path / f"{method}.json"
        evaluate.main(["--checkpoint", str(tiny_checkpoint), "--images", str(DATA / "images"), "--stories", str(stories),
                       "--out", str(out), "--rank-images", "0", "--clip", str(tmp_path / "no-clip"), "--device", "cpu",
                       "--strategy", "greedy", "--quantize", method])
        losses[method] = json.loads(out.read_text())["metrics"]["reference_loss"]
    assert losses["int8"] == pytest.approx(losses["none"], rel=0.02) and losses["int8"] != losses["none"]


def test_where_int8_cannot_work_it_says_so(tiny_checkpoint):
    result = run_main("generate.py", DATA / "images" / "photo_cat.jpg", "--checkpoint", tiny_checkpoint,
                      "--quantize", "int8", "--dtype", "bfloat16", "--device", "cpu")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == ["error: --quantize int8 makes int8 weights from float32 ones, and the "
                                          "model is bfloat16; leave out --dtype"]
    # Not on a GPU (none here: a decoder on the meta device stands in for one), and left as it was.
    with torch.device("meta"):
        decoder = tiny_gpt2()
    with pytest.raises(quantize.UserError, match="--quantize int8 is for generating on the CPU, and the model is on meta"):
        quantize.quantize_decoder(decoder, "int8")
    assert type(decoder.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
