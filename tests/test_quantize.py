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

QuantizedLinear = quantize.Int8Linear


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


def plant_outliers(decoder, channels=(3, 7), gain=60.0):
    """A real LM's trait in a random decoder: a few hidden channels far larger than the rest, in what
    every layer norm hands the attention and the MLP (and the LM head), as SmolLM2's are."""
    with torch.no_grad():
        for name, module in decoder.named_modules():
            if name.endswith(("layernorm", "ln_1", "ln_2", "ln_f", "norm")) and hasattr(module, "weight"):
                module.weight[list(channels)] *= gain
    return decoder


def calibration(decoder):
    torch.manual_seed(1)
    return torch.randint(0, 99, (1, 40))


def int8_error(decoder, quantize_fn):
    """The largest logit difference of quantize_fn(copy of decoder) from float32, over the largest
    logit, on token ids and on a prefix of embeddings; and the share of positions whose argmax agrees."""
    torch.manual_seed(0)
    ids = torch.randint(0, 99, (3, 12))
    embeds = torch.randn(3, 5, decoder.get_input_embeddings().weight.shape[1])  # an image prefix is embeddings
    with torch.no_grad():
        want = [decoder(ids).logits, decoder(inputs_embeds=embeds).logits]
        quantized = quantize_fn(copy.deepcopy(decoder))
        got = [quantized(ids).logits, quantized(inputs_embeds=embeds).logits]
        one_row = quantized(ids[:1, :1]).logits  # a single row takes the other kernel
    error = max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want))
    agree = min((g.argmax(-1) == w.argmax(-1)).float().mean().item() for g, w in zip(got, want))
    one_row_error = ((one_row - want[0][:1, :1]).abs().max() / want[0][:1, :1].abs().max()).item()
    return quantized, error, agree, one_row_error


@pytest.mark.parametrize("build", [tiny_gpt2, lambda: tiny_llama(tied=False), lambda: tiny_llama(tied=True), lora_gpt2],
                         ids=["gpt2", "llama", "llama-tied", "gpt2-lora"])
def test_int8_logits_stay_close_to_float32(build):
    torch.manual_seed(0)
    decoder = build().eval()
    embedding = decoder.get_input_embeddings().weight.detach().clone()
    decoder, error, agree, one_row_error = int8_error(decoder, lambda d: quantize.quantize_decoder(d, "int8", calibration(d)))

    from transformers.pytorch_utils import Conv1D
    assert not any(isinstance(m, (torch.nn.Linear, Conv1D)) for m in decoder.modules())  # every one became int8
    assert sum(isinstance(m, QuantizedLinear) for m in decoder.modules()) >= 2 * 4 + 1  # 2 layers' attention, MLP, head
    assert isinstance(decoder.get_output_embeddings(), QuantizedLinear)  # the LM head too
    # The input embedding, shared with the head or not, is float and unchanged: the prefix lives there.
    assert torch.equal(decoder.get_input_embeddings().weight, embedding)
    assert error < 0.03 and one_row_error < 0.03 and agree >= 0.9


@pytest.mark.parametrize("build, smoothing_shows", [(tiny_gpt2, True), (lambda: tiny_llama(tied=True), False)],
                         ids=["gpt2", "llama-tied"])
def test_int8_keeps_outlier_channels_that_one_scale_per_tensor_loses(build, smoothing_shows):
    """A scale per token and SmoothQuant's smoothing keep a decoder with outlier channels within 5% of
    float32 and its argmax; one scale per activation tensor (torch.ao's dynamic quantization, this
    project's int8 before) is several times further off on the same decoder and changes the argmax."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    torch.manual_seed(0)
    decoder = plant_outliers(build().eval())

    def per_tensor(d):
        quantize.conv1d_to_linear(d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return quantize_dynamic(d, {torch.nn.Linear: per_channel_dynamic_qconfig})

    _, before, before_agree, _ = int8_error(decoder, per_tensor)
    _, unsmoothed, _, _ = int8_error(decoder, lambda d: quantize.quantize_decoder(d, "int8"))
    _, error, agree, one_row_error = int8_error(decoder, lambda d: quantize.quantize_decoder(d, "int8", calibration(d)))
    assert error < 0.05 and one_row_error < 0.05 and agree >= 0.9, (error, one_row_error, agree)
    assert before > 3 * error and before_agree < agree, (before, before_agree, error, agree)
    if smoothing_shows:  # in the tiny Llama the scale per token does most of it
        assert unsmoothed > 2 * error, (unsmoothed, error)


def test_int8_linear_kernels_agree():
    """One row (fbgemm's dynamic linear) and many rows (torch._int_mm, a scale per row) give the same
    numbers to int8's rounding, so a story decoded alone or in a batch reads the same layer."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(40, 24)
    x = torch.randn(6, 40)
    x[:, 5] *= 30
    layer = quantize.Int8Linear(linear, x.abs().amax(0))
    together = layer(x)
    alone = torch.cat([layer(row[None]) for row in x])
    want = linear(x)
    assert ((together - want).abs().max() / want.abs().max()) < 0.01
    assert ((alone - together).abs().max() / want.abs().max()) < 0.01
    assert not torch.equal(alone, together)  # two kernels indeed (fbgemm rounds its inputs to 7 bits)


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
    web = app.WebStoryteller(tiny_checkpoint, "cpu", quantize_method="int8")
    layers = [m for m in web.model.decoder.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all(not torch.all(m.inv_smooth == 1) for m in layers)  # calibrated: SmoothQuant's smoothing is on
    [story] = web.stories(Image.open(image).convert("RGB"), strategy="greedy")
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
