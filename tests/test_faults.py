"""Faults during training: Ctrl-C, kills, a loss that blows up, a full disk, running out of memory.
Each one ends with a clear message, and the last good checkpoint stays readable."""
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

import dataset
import backbones
import train
from conftest import DATA, ROOT, write_stories
from model import StoryModel
from checkpoint import check_writable, load_checkpoint, load_model, save_checkpoint
from cli import UserError
from training import MetricsLog

STORIES = [line for line in (DATA / "stories.txt").read_text().splitlines() if not line.startswith("#")]


def tiny_args(stories, out, *extra):
    return ["--preset", "tiny", "--images", str(DATA / "images"), "--stories", str(stories), "--batch-size", "2",
            "--val-split", "0", "--out", str(out), "--device", "cpu", *extra]


def start_training(args, stall=None, marker=None):
    """train.py in a process of its own, as a user starts it; or with its second checkpoint ("save") or
    second step ("step") stalled, marker created when it stalls (tests/stalled_train.py)."""
    script = ["train.py"] if stall is None else ["tests/stalled_train.py", stall, str(marker)]
    return subprocess.Popen([sys.executable, *script, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, process, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline
        time.sleep(0.005)


def finish(process, timeout=120):
    """The process's stderr once it has exited; killed, and the test failed, if it does not within timeout."""
    try:
        return process.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"still running {timeout} s later:\n{process.communicate()[1]}")


def test_ctrl_c_saves_a_checkpoint_that_resumes_to_the_same_weights(tmp_path):
    stories = write_stories(tmp_path / "s.txt", STORIES[:6])  # 3 steps per epoch
    out = tmp_path / "m.pt"
    args = tiny_args(stories, out, "--epochs", "2", "--save-every", "1")
    process = start_training(args)
    wait_for(out.exists, process)  # the first periodic save: training is under way
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)

    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and f"--resume {out}" in stderr
    stopped = torch.load(out, weights_only=True)["train"]["step"]
    assert 1 <= stopped < 6, stderr

    # Resuming with other settings is refused; with the same ones it ends where an uninterrupted run ends.
    with pytest.raises(UserError, match="--lr"):
        train.main(args + ["--lr", "0.01", "--resume", str(out)])
    train.main(args + ["--resume", str(out)])
    train.main(tiny_args(stories, tmp_path / "whole.pt", "--epochs", "2"))
    resumed = torch.load(out, weights_only=True)
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)
    assert resumed["train"]["step"] == whole["train"]["step"] == 6
    for key in whole["model"]:
        torch.testing.assert_close(resumed["model"][key], whole["model"][key], rtol=0, atol=1e-6)


def test_a_run_killed_while_saving_leaves_the_last_checkpoint_readable(tmp_path):
    stories = write_stories(tmp_path / "s.txt", STORIES[:4])
    out, stalled = tmp_path / "m.pt", tmp_path / "stalled"
    process = start_training(tiny_args(stories, out, "--epochs", "2", "--save-every", "1"), "save", stalled)
    wait_for(stalled.exists, process)  # step 1's checkpoint is saved, step 2's is half-written
    before = out.read_bytes()
    process.kill()
    process.communicate()

    assert out.read_bytes() == before
    ckpt = load_checkpoint(out)
    model, _ = load_model(ckpt)
    assert ckpt["train"]["step"] == 1
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt["model"].items())
    [half] = tmp_path.glob(".m.pt.*.tmp")  # the kill landed mid-write
    assert 0 < half.stat().st_size < len(before)
    check_writable(out)  # the next run clears the half-written file away
    assert [p.name for p in tmp_path.glob(".m.pt*")] == []


def test_sigterm_saves_and_stops_as_ctrl_c_does(tmp_path):
    """A cluster's pre-emption (or torchrun's shutdown) sends SIGTERM: the step finishes, the run
    saves a checkpoint that resumes, and says how to continue."""
    stories = write_stories(tmp_path / "s.txt", STORIES[:4])
    out = tmp_path / "m.pt"
    process = start_training(tiny_args(stories, out, "--epochs", "50", "--save-every", "1"))
    wait_for(out.exists, process)
    process.send_signal(signal.SIGTERM)
    stderr = finish(process)

    assert process.returncode == 130, stderr
    assert "SIGTERM: saving a checkpoint after this step" in stderr and "Traceback" not in stderr
    stopped = int(stderr.split("stopped at step ")[1].split()[0])
    assert f"--resume {out}" in stderr and load_checkpoint(out)["train"]["step"] == stopped < 100


def test_a_second_ctrl_c_stops_at_once_and_the_last_checkpoint_stays(tmp_path):
    stories = write_stories(tmp_path / "s.txt", STORIES[:4])
    out, stalled = tmp_path / "m.pt", tmp_path / "stalled"
    process = start_training(tiny_args(stories, out, "--epochs", "2", "--save-every", "1"), "step", stalled)
    wait_for(stalled.exists, process)  # step 1 is saved; step 2 hangs (for ten minutes)
    before = out.read_bytes()
    process.send_signal(signal.SIGINT)
    time.sleep(1.5)  # repeats within a second are torchrun forwarding the first one
    process.send_signal(signal.SIGINT)
    stderr = finish(process, timeout=60)  # at once: the stalled step never finishes

    assert process.returncode == 130, stderr
    assert "SIGINT: saving a checkpoint after this step (Ctrl-C again to stop at once)" in stderr
    assert stderr.rstrip().endswith("interrupted") and "Traceback" not in stderr and "stopped at step" not in stderr
    assert out.read_bytes() == before and load_checkpoint(out)["train"]["step"] == 1


def test_a_non_finite_loss_stops_at_its_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    stories = write_stories(tmp_path / "s.txt", STORIES[:4])  # 2 steps per epoch
    out = tmp_path / "m.pt"
    forward, calls = StoryModel.forward, []

    def blows_up_at_the_third_step(self, *args, **kwargs):
        calls.append(1)
        output = forward(self, *args, **kwargs)
        if len(calls) == 3:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(StoryModel, "forward", blows_up_at_the_third_step)
    with pytest.raises(UserError, match=rf"loss became nan at step 3; stopped without saving \({out} holds step 2\)"):
        train.main(tiny_args(stories, out, "--epochs", "2", "--save-every", "1", "--no-train-encoder"))
    assert load_checkpoint(out)["train"]["step"] == 2


def test_out_of_memory_suggests_a_smaller_batch_with_gradient_accumulation(tmp_path, monkeypatch):
    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(StoryModel, "forward", out_of_memory)
    stories = write_stories(tmp_path / "s.txt", STORIES[:2])
    with pytest.raises(UserError, match="out of memory .* try --batch-size 1 --grad-accum 2 "):
        train.main(tiny_args(stories, tmp_path / "m.pt", "--epochs", "1"))
    assert not (tmp_path / "m.pt").exists()


def test_a_full_disk_fails_clearly_and_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint({"weights": torch.zeros(10)}, path)
    before = path.read_bytes()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limits[1]))  # the disk is full after 100 kB
    try:
        with pytest.raises(UserError, match="cannot write the checkpoint .*the previous file is unchanged"):
            save_checkpoint({"weights": torch.zeros(1_000_000)}, path)
        with pytest.raises(UserError, match="cannot write the feature cache .*--no-feature-cache"):
            dataset.FeatureCache(tmp_path / "cache", "setup", 50_000).save("image", torch.zeros(50_000))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["cache", "m.pt"]
    assert list((tmp_path / "cache").rglob("*")) == [tmp_path / "cache" / "setup"]  # nothing half-written


def test_an_unwritable_out_folder_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(backbones, "build_model", lambda *a: pytest.fail("trained before checking --out"))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write the checkpoint in .*choose another --out"):
        train.main(tiny_args(write_stories(tmp_path / "s.txt", STORIES[:2]), blocker / "m.pt"))


def test_out_in_a_new_folder_is_made(tmp_path):
    out = tmp_path / "runs" / "today" / "m.pt"
    check_writable(out)
    assert out.parent.is_dir() and list(out.parent.iterdir()) == []  # the probe file is gone


def test_a_saved_checkpoint_has_the_permissions_of_a_normally_written_file(tmp_path):
    save_checkpoint({"x": torch.zeros(1)}, tmp_path / "m.pt")
    (tmp_path / "plain").write_bytes(b"")
    assert (tmp_path / "m.pt").stat().st_mode == (tmp_path / "plain").stat().st_mode  # not mkstemp's 0600


def test_a_resumed_runs_log_drops_the_steps_it_trains_again(tmp_path):
    """Killed at step 6 after saving at step 4: steps 5-6 are trained again, and logged once."""
    import json
    path = tmp_path / "m.metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train_loss": 1.0}) + "\n" for s in range(1, 7)) + '{"step": 7, "tr')
    log = MetricsLog(path, resume_step=4)
    log.write(5, train_loss=0.5)
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_a_new_run_replaces_the_previous_log_only_when_it_replaces_the_checkpoint(tmp_path):
    import json
    path = tmp_path / "m.metrics.jsonl"
    path.write_text('{"step": 1, "train_loss": 9.0}\n')
    failed = MetricsLog(path)  # a new run that dies before its first save
    failed.write(1, train_loss=1.0)
    failed.close()
    assert path.read_text() == '{"step": 1, "train_loss": 9.0}\n'
    saved = MetricsLog(path)
    saved.write(1, train_loss=2.0)
    saved.saved()
    saved.write(2, train_loss=1.5)  # still written after the rename
    saved.close()
    assert [json.loads(line)["train_loss"] for line in path.read_text().splitlines()] == [2.0, 1.5]
    assert not (tmp_path / ".m.metrics.jsonl.new").exists()
