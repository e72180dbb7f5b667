"""The training loop's numbers, each against a run that must give the same ones: 2 DDP processes
against one with their two batches in one, --grad-accum against one big batch, a resumed run against
an uninterrupted one, the learning rates against the warm-up/cosine formula; gradient clipping,
bfloat16 autocast, and SIGTERM / Ctrl-C as docs/resuming.md tells them. On the tiny Llama of
tests/test_fsdp.py (no dropout: one process and two draw the same numbers)."""
import dataclasses
import io
import math
import os
import shutil
import signal
import time
from contextlib import redirect_stderr

import pytest
import torch

import train
import training
from checkpoint import load_checkpoint
from ranks import train_ranks
from settings import TrainSettings
from test_fsdp import args as fsdp_args, assert_same_weights, llama, losses, weights  # noqa: F401 (llama: a fixture)

WARMUP = "0.25"  # of 4 steps: one step of warm-up, then three of cosine decay


def args(root, out, *extra):
    return fsdp_args(root, out, "--warmup", WARMUP, *extra)


def lrs(checkpoint):
    import json
    path = checkpoint.with_suffix(".metrics.jsonl")
    return [r["lr"] for r in map(json.loads, path.read_text().splitlines()) if "lr" in r]


def train_here(*argv):
    return train.main(list(map(str, argv)))


@pytest.fixture(scope="module")
def big_batch(llama):
    """One process, 4 stories per step, 4 steps: what the others must equal."""
    train_here(*args(llama, llama / "big.pt", "--batch-size", "4"))
    return llama / "big.pt"


@pytest.fixture(scope="module")
def accumulated(llama):
    """One process, 2 batches of 2 stories per step (--grad-accum 2)."""
    train_here(*args(llama, llama / "accum.pt", "--batch-size", "2", "--grad-accum", "2"))
    return llama / "accum.pt"


def test_two_ddp_processes_at_batch_2_train_like_one_at_batch_4(big_batch, llama, tmp_path):
    """Stories of different lengths: each process's loss counts by its share of both processes' tokens."""
    train_ranks(args(llama, tmp_path / "ddp.pt", "--batch-size", "2"), 2, tmp_path)
    assert torch.load(tmp_path / "ddp.pt", weights_only=True)["train"]["world_size"] == 2
    torch.testing.assert_close(losses(tmp_path / "ddp.pt"), losses(big_batch), rtol=0, atol=1e-5)
    assert_same_weights(weights(tmp_path / "ddp.pt"), weights(big_batch))


def test_grad_accum_2_trains_like_a_batch_twice_the_size(big_batch, accumulated):
    assert len(losses(accumulated)) == 4  # optimizer steps, not batches
    torch.testing.assert_close(losses(accumulated), losses(big_batch), rtol=0, atol=1e-5)
    torch.testing.assert_close(lrs(accumulated), lrs(big_batch), rtol=0, atol=0)
    assert_same_weights(weights(accumulated), weights(big_batch))


def test_the_learning_rates_are_warm_up_then_cosine(accumulated):
    """transformers' schedule as train.py counts its steps: int(warmup x steps) steps from 0 up to --lr,
    then half a cosine down to 0, over the optimizer steps (not the batches)."""
    peak, total = 1e-3, 4
    warm = int(float(WARMUP) * total)
    expected = [peak * s / warm if s < warm else peak * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
                for s in range(total)]
    assert warm == 1
    torch.testing.assert_close(lrs(accumulated), expected, rtol=1e-9, atol=0)


def test_a_run_stopped_mid_epoch_with_grad_accum_resumes_to_the_uninterrupted_weights(accumulated, llama, tmp_path,
                                                                                      monkeypatch, capsys):
    """SIGTERM during step 2: step 3 is finished, saved, and the run stops (exit code 130) with the command
    that continues; that command ends on the uninterrupted run's curve and weights."""
    steps, optimizer_step = [], training.optimizer_step

    def step_then_sigterm(*a, **kw):
        optimizer_step(*a, **kw)
        steps.append(1)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(training, "optimizer_step", step_then_sigterm)
    out = tmp_path / "m.pt"
    run = args(llama, out, "--batch-size", "2", "--grad-accum", "2")
    assert train_here(*run) == 130
    err = capsys.readouterr().err
    assert "SIGTERM: saving a checkpoint after this step (Ctrl-C again to stop at once)" in err
    assert f"stopped at step 3 of 4 and saved {out}; to continue:" in err and f"--resume {out}" in err
    state = load_checkpoint(out)["train"]
    assert (state["step"], state["epoch"], state["batches"]) == (3, 1, 2)  # mid-epoch, 2 micro-batches in
    monkeypatch.undo()
    sharded = tmp_path / "sharded.pt"
    for suffix in (".pt", ".metrics.jsonl"):
        shutil.copy(out.with_suffix(suffix), sharded.with_suffix(suffix))

    train_here(*run, "--resume", out)
    torch.testing.assert_close(losses(out), losses(accumulated), rtol=0, atol=0)
    assert_same_weights(weights(out), weights(accumulated))

    # The same checkpoint continues under FSDP on 2 processes at --batch-size 2: its AdamW state, saved by
    # position in the optimizer's list, is matched to the parameters' names and sharded.
    train_ranks(args(llama, sharded, "--batch-size", "2", "--fsdp", "--resume", sharded), 2, tmp_path / "logs")
    torch.testing.assert_close(losses(sharded), losses(accumulated), rtol=0, atol=1e-5)
    assert_same_weights(weights(sharded), weights(accumulated))


def test_a_second_ctrl_c_stops_at_once_and_one_repeated_within_a_second_does_not(llama, tmp_path, monkeypatch):
    """docs/resuming.md: a second Ctrl-C stops at once (no save; the last checkpoint stays whole); the
    repeat torchrun forwards within a second of the first is the same request, which saves and stops."""
    def ctrl_c_twice_in_step_2(pause):
        steps, optimizer_step = [], training.optimizer_step

        def step(*a, **kw):
            optimizer_step(*a, **kw)
            steps.append(1)
            if len(steps) == 2:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(pause)  # (the handler runs here: Python takes signals between bytecodes)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)

        monkeypatch.setattr(training, "optimizer_step", step)

    out = tmp_path / "m.pt"
    ours = signal.getsignal(signal.SIGINT)
    ctrl_c_twice_in_step_2(pause=1.2)
    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(KeyboardInterrupt):  # run_cli makes it exit code 130
        train_here(*args(llama, out, "--batch-size", "2", "--save-every", "1"))
    assert "SIGINT: saving a checkpoint after this step" in err.getvalue() and "stopped at step" not in err.getvalue()
    assert load_checkpoint(out)["train"]["step"] == 1  # step 2's update happened, but only step 1 was saved
    assert signal.getsignal(signal.SIGINT) is ours  # the process's own handler is back

    ctrl_c_twice_in_step_2(pause=0.05)
    try:
        code = train_here(*args(llama, out, "--batch-size", "2", "--save-every", "0"))
    except KeyboardInterrupt:  # (caught: let loose it would stop the whole pytest session)
        pytest.fail("a repeat within a second stopped the run at once")
    assert code == 130
    assert load_checkpoint(out)["train"]["step"] == 3  # the step under way when asked, then the one started


def test_gradient_clipping_caps_the_norm_and_leaves_a_small_gradient_alone():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.SGD(params, lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    seen = []  # the gradient's norm when the optimizer steps
    optimizer.step = lambda: seen.append(torch.cat([p.grad.flatten() for p in params]).norm().item())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for scale in (100.0, 0.01):
        for p in params:
            p.grad = torch.ones_like(p) * scale
        norm = math.sqrt(19) * scale
        training.optimizer_step(optimizer, scheduler, scaler, params, grad_clip=1.0)
        assert params[0].grad is None  # and zeroed for the next step
        assert seen[-1] == pytest.approx(min(norm, 1.0), rel=1e-6)


def test_bfloat16_autocast_trains_within_a_small_tolerance_of_float32(big_batch, llama, tmp_path):
    train_here(*args(llama, tmp_path / "bf16.pt", "--batch-size", "4", "--dtype", "bfloat16"))
    ours, full = losses(tmp_path / "bf16.pt"), losses(big_batch)
    assert len(ours) == len(full) == 4
    differences = [abs(a - b) for a, b in zip(ours, full)]
    # bfloat16 keeps 8 bits of mantissa: a loss of ~6 moves by a few hundredths; a wrong cast would move it by far more.
    assert max(differences) < 0.05, differences
    assert max(differences) > 0, "the same losses: autocast did not run in bfloat16"


def test_the_settings_are_one_frozen_object_that_the_checkpoint_stores(big_batch, llama):
    """train.parse_args turns the flags and the preset into settings once; library functions read those."""
    settings = train.parse_args(list(map(str, args(llama, llama / "big.pt", "--batch-size", "4"))))
    assert isinstance(settings, TrainSettings) and settings.lr == 1e-3 and settings.image_size == 224
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.lr = 0.1
    assert load_checkpoint(big_batch)["train"]["args"] == settings.to_dict()
    tiny = train.parse_args(["--preset", "tiny"])  # the preset's sizes are settings too
    assert (tiny.n_layer, tiny.n_head, tiny.n_embd, tiny.n_positions, tiny.vocab_size) == (2, 4, 128, 128, 2000)
