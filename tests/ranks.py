"""torchrun's processes for a test, forked from the test's own process: each rank gets the
environment torchrun gives it (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and runs a function,
so a 2-process run costs its training time, not the ten seconds each new Python spends importing
torch and transformers (tests/test_scale.py runs real torchrun once, to prove the launcher works)."""
import multiprocessing
import os
import signal
import socket
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(target, rank, world_size, port, log):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    code = 1
    with open(log, "w") as f, redirect_stdout(f), redirect_stderr(f):
        try:
            import torch
            torch.set_num_threads(1)  # two ranks share the test's core
            code = target(rank) or 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        except BaseException:
            traceback.print_exc()
        f.flush()
    os._exit(code)  # not pytest's exit handlers: this is a forked copy of the test process


def start_ranks(target, world_size, logs_dir):
    """Forks world_size processes, rank r running target(r); returns them (multiprocessing.Process)."""
    port = free_port()
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_rank, args=(target, rank, world_size, port, logs_dir / f"rank{rank}.log"))
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    return procs


def wait_ranks(procs, logs_dir, timeout=180):
    """Waits for the ranks; returns their exit codes and rank 0's output."""
    deadline = time.time() + timeout
    for proc in procs:
        proc.join(max(1, deadline - time.time()))
        if proc.is_alive():
            for p in procs:
                p.kill()
            raise AssertionError(f"ranks still running after {timeout}s:\n" + (logs_dir / "rank0.log").read_text())
    return [proc.exitcode for proc in procs], (logs_dir / "rank0.log").read_text()


def run_ranks(target, world_size, logs_dir, timeout=180):
    """start_ranks and wait_ranks; fails with every rank's output if one exits with an error."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    codes, out = wait_ranks(start_ranks(target, world_size, logs_dir), logs_dir, timeout)
    if any(codes):
        logs = "\n".join(f"--- rank {r} (exit {c})\n" + (logs_dir / f"rank{r}.log").read_text()
                         for r, c in enumerate(codes))
        raise AssertionError(f"a rank failed:\n{logs}")
    return out


def train(argv):
    """A rank's target: train.py ARGV, as its __main__ runs it (exit code 2 for a UserError)."""
    import train
    from cli import run_cli
    return lambda rank: run_cli(lambda: train.main(list(map(str, argv))))


def train_ranks(argv, world_size, logs_dir, timeout=180):
    """`torchrun --nproc_per_node=world_size train.py ARGV`, as forked ranks; returns rank 0's output."""
    return run_ranks(train(argv), world_size, logs_dir, timeout)


def wait_for(condition, procs, timeout=120):
    """Polls condition() while every rank is still running."""
    deadline = time.time() + timeout
    while not condition():
        assert all(proc.is_alive() for proc in procs), "a rank ended first"
        assert time.time() < deadline
        time.sleep(0.005)


def stop_ranks(procs, sig=signal.SIGTERM):
    """What torchrun does on its own shutdown: the signal to every rank."""
    for proc in procs:
        os.kill(proc.pid, sig)

