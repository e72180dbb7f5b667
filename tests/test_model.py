"""The model itself: what the loss scores, that generate keeps its word, that checkpoints round-trip."""
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config

from model import StoryConfig, StoryModel
from backbones import tokenizer_to_json, train_tokenizer
from checkpoint import CHECKPOINT_FORMAT, load_checkpoint, load_model, save_checkpoint, stored_state

EOS_ID = 49


def tiny_config(**overrides):
    decoder = GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=40, vocab_size=50,
                         bos_token_id=EOS_ID, eos_token_id=EOS_ID)
    return StoryConfig(encoder="resnet-tiny", image_size=32, resize_size=32, prefix_length=3,
                       decoder=decoder.to_dict(), **overrides)


def test_loss_scores_every_story_token_and_nothing_else():
    torch.manual_seed(0)
    model = StoryModel(tiny_config()).eval()
    # Token id 0 is a real token (GPT-2's "!"); the second story is padded with EOS after its own EOS.
    ids = torch.tensor([[0, 5, 7, EOS_ID], [3, 0, EOS_ID, EOS_ID]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    features = torch.randn(2, 512)
    out = model(ids, mask, features=features)

    P = model.config.prefix_length
    terms = [F.cross_entropy(out.logits[b, P - 1 + t], ids[b, t])  # position P-1+t predicts story token t
             for b in range(2) for t in range(4) if mask[b, t]]
    assert len(terms) == 7
    torch.testing.assert_close(out.loss, torch.stack(terms).mean())

    # Whatever id sits in a padded position, the loss is the same: padding is found by the mask.
    padded = ids.clone()
    padded[1, 3] = 0
    torch.testing.assert_close(model(padded, mask, features=features).loss, out.loss)


def test_the_image_changes_the_story_logits():
    torch.manual_seed(0)
    model = StoryModel(tiny_config()).eval()
    ids, mask = torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long)
    a = model(ids, mask, images=torch.randn(1, 3, 32, 32)).logits
    b = model(ids, mask, images=torch.randn(1, 3, 32, 32)).logits
    assert not torch.allclose(a, b)


def test_generate_equals_a_full_recompute_greedy_loop():
    """transformers' generate (KV cache) picks the same tokens as re-running the whole sequence."""
    torch.manual_seed(1)
    model = StoryModel(tiny_config()).eval()
    features = torch.randn(3, 512)
    fast = model.generate(features=features, max_new_tokens=8, do_sample=False, min_new_tokens=8,
                          eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    embeds, _ = model.prefix(features)
    slow = []
    with torch.no_grad():
        for _ in range(8):
            logits = model.decoder(inputs_embeds=embeds).logits[:, -1]
            logits[:, EOS_ID] = -float("inf")  # min_new_tokens does the same
            nxt = logits.argmax(-1)
            slow.append(nxt)
            embeds = torch.cat([embeds, model.decoder.get_input_embeddings()(nxt)[:, None]], dim=1)
    assert torch.equal(fast, torch.stack(slow, dim=1))


def test_frozen_parts_get_no_gradient_and_stay_in_eval_mode():
    model = StoryModel(tiny_config(train_encoder=False, train_decoder=False)).train()
    assert not model.encoder.training and not model.decoder.training
    ids, mask = torch.tensor([[1, 2, EOS_ID]]), torch.ones(1, 3, dtype=torch.long)
    model(ids, mask, images=torch.randn(2, 3, 32, 32)[:1]).loss.backward()
    assert model.mapper.weight.grad is not None
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is None for p in model.decoder.parameters())


LORA = dict(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")


@pytest.mark.parametrize("variant", [dict(), dict(mapper="mlp", styles=["a", "b"]),
                                     dict(mapper="transformer", mapper_layers=2, lora=LORA, train_decoder=False)])
def test_checkpoint_round_trip_gives_the_same_logits(tmp_path, variant):
    torch.manual_seed(0)
    config = tiny_config(feature_norm=True, **variant)
    model = StoryModel(config).eval()
    if config.lora:  # LoRA's B starts at zero; make the adapters count
        torch.nn.init.normal_(model.decoder.base_model.model.transformer.h[0].attn.c_attn.lora_B.default.weight)
    tokenizer = train_tokenizer(["a red house on a hill", "a boat at sea"], vocab_size=60)
    sources = {"encoder": None, "decoder": None}
    ckpt = {"format": CHECKPOINT_FORMAT, "config": config.to_dict(), "sources": sources,
            "model": stored_state(model, sources), "tokenizer": tokenizer_to_json(tokenizer),
            "eos_token": tokenizer.eos_token}
    path = tmp_path / "m.pt"
    save_checkpoint(ckpt, path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left behind

    loaded, loaded_tok = load_model(load_checkpoint(path))
    loaded.eval()
    images = torch.randn(2, 3, 32, 32)
    ids, mask = torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.ones(2, 3, dtype=torch.long)
    styles = torch.tensor([1, 2]) if config.styles else None
    expected = model(ids, mask, images=images, style_ids=styles).logits
    torch.testing.assert_close(loaded(ids, mask, images=images, style_ids=styles).logits, expected)
    assert loaded_tok("a red house")["input_ids"] == tokenizer("a red house")["input_ids"]


def test_a_style_changes_the_story_logits_and_takes_one_prefix_position():
    torch.manual_seed(0)
    model = StoryModel(tiny_config(styles=["grand", "noir"])).eval()
    ids, mask, features = torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long), torch.randn(1, 512)
    logits = [model(ids, mask, features=features, style_ids=torch.tensor([s])).logits for s in range(3)]
    assert logits[0].shape[1] == model.config.prefix_length + 1 + 3
    assert not torch.allclose(logits[0], logits[1]) and not torch.allclose(logits[1], logits[2])
    torch.testing.assert_close(model(ids, mask, features=features).logits, logits[0])  # no style = style 0


def test_lora_trains_only_the_adapters():
    """train.py's optimizer over the trainable parameters, with weight decay: GPT-2's own weights stay
    bit for bit, the adapters move and change the output."""
    torch.manual_seed(0)
    model = StoryModel(tiny_config(lora=LORA, train_decoder=False)).train()
    base = {k: v.clone() for k, v in model.decoder.state_dict().items() if "lora_" not in k}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    ids, mask, features = torch.tensor([[1, 2, EOS_ID]]), torch.ones(1, 3, dtype=torch.long), torch.randn(1, 512)
    for _ in range(3):
        optimizer.zero_grad()
        model(ids, mask, features=features).loss.backward()
        optimizer.step()
    after = model.decoder.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())
    model.eval()
    with torch.no_grad():
        adapted = model(ids, mask, features=features).logits
        with model.decoder.disable_adapter():
            plain = model(ids, mask, features=features).logits
    assert not torch.allclose(adapted, plain)
