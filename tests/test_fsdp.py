"""FSDP (--fsdp): 2 CPU processes with gloo shard a tiny Llama decoder and train exactly as one
process does, each holding half of it; the checkpoint is the usual single file, it resumes onto 1 or
2 processes, and LoRA stores only what it trains. The ranks are forked (tests/ranks.py)."""
import copy
import io
import itertools
import json
import os
import shutil
import signal
from contextlib import redirect_stdout

import pytest
import timm
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

import backbones
import generate
import ranks
import train
import training
from conftest import DATA, run_main, write_stories
from distributed import Run, shard
from model import StoryConfig, StoryModel
from ranks import run_ranks, start_ranks, train_ranks, wait_ranks
from test_backbones import llama_style_tokenizer

STORIES = [line for line in (DATA / "stories.txt").read_text().splitlines() if line and not line.startswith("#")][:8]
# Adam turns float noise (another order of the same sums, across shards) into ~5e-6 after a few
# steps; a wrong gradient moves a weight by about the learning rate, 1e-3.
ATOL = 5e-5


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama folder (tied embeddings, as SmolLM2's) with its tokenizer, timm's test_efficientnet
    weights, and 8 stories of 4 sample images: 2 steps per epoch at 4 stories per step."""
    root = tmp_path_factory.mktemp("fsdp")
    tokenizer = llama_style_tokenizer([line.split("\t")[1] for line in STORIES])
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=96, vocab_size=len(tokenizer) + 8,
                         bos_token_id=0, eos_token_id=1, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    torch.save(timm.create_model("test_efficientnet").state_dict(), root / "effnet.pth")
    write_stories(root / "stories.txt", STORIES)
    return root


def args(root, out, *extra):
    """A frozen timm encoder (features from the cache), the Llama fine-tuned, no dropout anywhere: the
    same stories train the same way in one process or two."""
    return ["--stories", root / "stories.txt", "--images", DATA / "images", "--decoder", root / "llama",
            "--encoder", "timm:test_efficientnet", "--encoder-weights", root / "effnet.pth", "--epochs", "2",
            "--val-split", "0", "--lr", "1e-3", "--device", "cpu", "--feature-cache", root / "cache",
            "--tags", "0", "--out", out, *extra]  # (a frozen ImageNet classifier would be stored too)


def losses(checkpoint):
    path = checkpoint.with_suffix(".metrics.jsonl")
    return [r["train_loss"] for r in map(json.loads, path.read_text().splitlines()) if "train_loss" in r]


def weights(checkpoint):
    return torch.load(checkpoint, weights_only=True)["model"]


def assert_same_weights(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=ATOL, msg=key)


@pytest.fixture(scope="module")
def uninterrupted(llama):
    """(one process at --batch-size 4, 2 FSDP processes at --batch-size 2): the same 4 steps. The one
    process is given --fsdp too: it says it has no one to shard with, and trains as without it."""
    out = io.StringIO()
    with redirect_stdout(out):
        train.main(list(map(str, args(llama, llama / "one.pt", "--batch-size", "4", "--fsdp"))))
    assert "note: --fsdp shards the model across torchrun's processes; this run has one" in out.getvalue()
    assert "FSDP:" not in out.getvalue()
    log = train_ranks(args(llama, llama / "fsdp.pt", "--batch-size", "2", "--fsdp"), 2, llama / "logs-fsdp")
    assert "on cpu x 2 processes (FSDP: each holds 1/2 of them)" in log
    return llama / "one.pt", llama / "fsdp.pt"


def test_fsdp_trains_like_one_process_and_saves_the_usual_checkpoint(uninterrupted, capsys):
    one, fsdp = uninterrupted
    torch.testing.assert_close(losses(fsdp), losses(one), rtol=0, atol=1e-5)
    assert len(losses(one)) == 4
    assert_same_weights(weights(fsdp), weights(one))  # gathered whole from both shards
    ckpt = torch.load(fsdp, weights_only=True)
    assert ckpt["train"]["world_size"] == 2 and not any(".lora_" in k for k in ckpt["model"])

    stories = []
    for checkpoint in (fsdp, one):
        assert generate.main([str(DATA / "images" / "photo_cat.jpg"), "--checkpoint", str(checkpoint), "--strategy",
                              "greedy", "--max-new-tokens", "12", "--json", "--device", "cpu"]) == 0
        stories.append(json.loads(capsys.readouterr().out)["story"])
    assert stories[0] == stories[1] and stories[0]


def shard_sizes(root, out, rank):
    """One FSDP rank: the local numbers of the trained parameters and of AdamW's state after a step."""
    dist.init_process_group("gloo")
    settings = train.parse_args(list(map(str, args(root, "unused.pt", "--lora", "--lora-targets", "q_proj,v_proj"))))
    model, _ = backbones.build_model(settings, backbones.load_tokenizer(settings.decoder))
    shard(model, Run(torch.device("cpu"), rank, 2), "float32")
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-3)
    loss = model(input_ids=torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 5, dtype=torch.long),
                 features=torch.randn(2, model.config.feature_dim)).loss
    loss.backward()
    optimizer.step()
    local = lambda tensors: sum(t.to_local().numel() for t in tensors)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    state = [t for s in optimizer.state.values() for k, t in s.items() if k != "step"]
    sizes = dict(trained=local(trained), trained_total=sum(p.numel() for p in trained), frozen=local(frozen),
                 frozen_total=sum(p.numel() for p in frozen), state=local(state),
                 grads=local([p.grad for p in trained]),
                 units=sorted(type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)))
    (out / f"sizes{rank}.json").write_text(json.dumps(sizes))
    dist.destroy_process_group()


def test_each_process_holds_half_of_the_weights_gradients_and_adam_state(llama, tmp_path):
    """LoRA on the Llama: the trained adapters and mapper, their gradients and AdamW's two moments,
    and the frozen base weights too, are each split between the two ranks."""
    run_ranks(lambda rank: shard_sizes(llama, tmp_path, rank), 2, tmp_path)
    ranks = [json.loads((tmp_path / f"sizes{r}.json").read_text()) for r in range(2)]
    for what in ("trained", "frozen"):
        total = ranks[0][f"{what}_total"]
        assert sum(r[what] for r in ranks) == total  # the shards cover each parameter exactly once
        for r in ranks:
            # Half, up to the rows of a parameter whose first dimension is odd (rank 0 takes the extra row).
            assert abs(r[what] - total / 2) < 0.05 * total, (what, r)
    # Each block is a unit of its own, gathered only for its own forward and backward: the whole decoder is never whole.
    assert ranks[0]["units"] == ["FSDPEfficientNet", "FSDPLlamaDecoderLayer", "FSDPLlamaDecoderLayer", "FSDPStoryModel"]
    for r in ranks:
        assert r["grads"] == r["trained"] and r["state"] == 2 * r["trained"]  # exp_avg and exp_avg_sq, local only


def test_a_stopped_fsdp_run_resumes_onto_one_or_two_processes_with_the_same_curve(uninterrupted, llama, tmp_path,
                                                                                   monkeypatch):
    """SIGTERM (a cluster's pre-emption) in step 3 of 4: the FSDP ranks finish the step, save together
    and stop; the checkpoint continues on 2 processes with FSDP, or on 1 process with the same 4 stories
    per step in two batches of 2, along the same curve."""
    one, _ = uninterrupted
    steps = itertools.count(1)
    optimizer_step = training.optimizer_step

    def step_then_sigterm(*a, **kw):  # (each forked rank counts its own steps)
        optimizer_step(*a, **kw)
        if next(steps) == 2:  # the loop has asked the processes about stopping for step 2 already
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(training, "optimizer_step", step_then_sigterm)
    stopped = tmp_path / "stopped.pt"
    codes, log = wait_ranks(start_ranks(ranks.train(args(llama, stopped, "--batch-size", "2", "--fsdp")), 2, tmp_path),
                            tmp_path)
    monkeypatch.undo()
    assert codes == [130, 130], log
    assert "stopped at step 3 of 4 and saved" in log and "torchrun --nproc_per_node=2 train.py" in log
    state = torch.load(stopped, weights_only=True)["train"]
    assert (state["step"], state["epoch"], state["batches"]) == (3, 1, 1)  # mid-epoch: one batch of 2 per process

    for copy, processes, batch in (("on2.pt", 2, ["--batch-size", "2"]), ("on1.pt", 1, ["--batch-size", "2", "--grad-accum", "2"])):
        shutil.copy(stopped, tmp_path / copy)
        shutil.copy(stopped.with_suffix(".metrics.jsonl"), (tmp_path / copy).with_suffix(".metrics.jsonl"))
        resume = args(llama, tmp_path / copy, *batch, "--fsdp", "--resume", tmp_path / copy)
        if processes == 2:
            train_ranks(resume, 2, tmp_path / "logs-on2")
        else:
            train.main(list(map(str, resume)))
        torch.testing.assert_close(losses(tmp_path / copy), losses(one), rtol=0, atol=1e-5)
        assert_same_weights(weights(tmp_path / copy), weights(one))

    # Another number of stories per step would be another run: refused, naming the numbers.
    result = run_main("train.py", *args(llama, tmp_path / "on1.pt", "--batch-size", "2", "--resume", stopped))
    assert result.returncode == 2 and "was trained with 4 stories per step (2 process(es) x --batch-size 2" in result.stderr


def test_lora_with_fsdp_stores_only_the_adapters_and_the_mapper(llama, tmp_path):
    """With --gradient-checkpointing too: the same adapters as one process without either."""
    lora = ("--lora", "--lora-dropout", "0")
    train.main(list(map(str, args(llama, tmp_path / "one.pt", "--batch-size", "4", *lora))))
    train_ranks(args(llama, tmp_path / "fsdp.pt", "--batch-size", "2", "--fsdp", "--gradient-checkpointing", *lora), 2,
                tmp_path / "logs")
    ckpt = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    assert ckpt["sources"]["decoder"] == str(llama / "llama")  # the frozen base is reloaded from its folder
    assert ckpt["model"] and all(".lora_" in key or key.startswith("mapper.") for key in ckpt["model"])
    assert any(key.startswith("mapper.") for key in ckpt["model"]) and any(".lora_" in key for key in ckpt["model"])
    assert_same_weights(ckpt["model"], weights(tmp_path / "one.pt"))


def test_fsdp_refuses_what_it_cannot_shard_in_one_line(llama, tmp_path, monkeypatch):
    result = run_main("train.py", *args(llama, tmp_path / "m.pt", "--fsdp", "--device", "mps"))
    assert result.returncode == 2 and "--fsdp shards a model across torchrun's CUDA or CPU processes" in result.stderr
    result = run_main("train.py", *args(llama, tmp_path / "m.pt", "--fsdp", "--dtype", "float16"))
    assert result.returncode == 2 and "use --dtype bfloat16" in result.stderr

    # A decoder that names no blocks (an old remote-code model; the forked ranks inherit this patch).
    monkeypatch.setattr(LlamaPreTrainedModel, "_no_split_modules", None)
    codes, log = wait_ranks(start_ranks(ranks.train(args(llama, tmp_path / "m.pt", "--fsdp")), 2, tmp_path), tmp_path)
    assert codes == [2, 2] and "error: --fsdp: cannot find the transformer blocks of this llama decoder" in log
    assert not (tmp_path / "m.pt").exists()


def test_gradient_checkpointing_keeps_less_for_backward_and_gives_the_same_loss_and_gradients():
    """The decoder's activations are recomputed, not kept: the same numbers, fewer bytes saved for the
    backward pass (the activation memory, counted by torch's saved-tensor hooks)."""
    torch.manual_seed(0)
    decoder = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=96, vocab_size=50)
    batch = dict(input_ids=torch.randint(0, 50, (3, 40)), attention_mask=torch.ones(3, 40, dtype=torch.long),
                 features=torch.randn(3, 512))

    def run(model):
        saved = []

        def keep(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {k: p.grad for k, p in model.named_parameters()}, sum(saved)

    plain = StoryModel(StoryConfig(encoder="resnet-tiny", decoder=decoder.to_dict(), prefix_length=2)).train()
    checkpointed = copy.deepcopy(plain)
    training.checkpoint_activations(checkpointed.decoder)
    loss, grads, kept = run(plain)
    loss_c, grads_c, kept_c = run(checkpointed)
    torch.testing.assert_close(loss_c, loss, rtol=0, atol=0)
    for key, grad in grads.items():
        torch.testing.assert_close(grads_c[key], grad, rtol=1e-6, atol=1e-7, msg=key)
    assert kept_c < 0.5 * kept, (kept_c, kept)
