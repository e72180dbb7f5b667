"""The processes of a training run: one, or torchrun's (nccl between GPUs, gloo between CPU
processes), each with its device and rank; the turns they take together (stop, non-finite loss);
and Ctrl-C or SIGTERM, which saves a resumable checkpoint before the run stops."""
import itertools
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from cli import UserError, pick_device


@dataclass
class Run:
    """Where this process trains: its device and, under torchrun, its rank among world_size processes."""
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        """The process that logs and saves."""
        return self.rank == 0

    def log(self, *args, **kwargs):
        if self.main:
            print(*args, **kwargs, flush=True)


@contextmanager
def start_run(device_name: str, out_of_memory=None):
    """One process, or one of torchrun's (it sets RANK, WORLD_SIZE, LOCAL_RANK): nccl between GPUs,
    gloo between CPU processes. Out-of-memory anywhere inside becomes the UserError out_of_memory(run)
    returns, advice instead of a traceback."""
    device = pick_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        local_rank = int(os.environ["LOCAL_RANK"])  # (the rank comes from the process group)
        if device.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise UserError(f"torchrun started more processes per machine than its {torch.cuda.device_count()} "
                                f"GPU(s); use --nproc_per_node={torch.cuda.device_count()}")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        elif device.type != "cpu":
            raise UserError(f"torchrun trains on CUDA (nccl) or on CPU (gloo), not on {device.type}; pass --device cpu")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    run = Run(device, dist.get_rank() if world_size > 1 else 0, world_size)
    try:
        yield run
    except torch.OutOfMemoryError:
        if out_of_memory is None:
            raise
        raise out_of_memory(run) from None
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def agree(run, loss, stop_requested) -> tuple[bool, bool]:
    """(loss finite everywhere, some process asked to stop): every process takes the same turn."""
    flags = torch.tensor([float(not torch.isfinite(loss)), float(stop_requested)], device=run.device)
    if run.world_size > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return not flags[0].item(), bool(flags[1].item())


class EpochSampler(DistributedSampler):
    """Shuffles each epoch with seed + epoch (the same order in every process, each taking its share),
    and can start part-way into an epoch: a resumed run skips what it already trained on."""
    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self):
        return super().__len__() - self.skip


def ignore_ctrl_c(worker_id):
    """Data-loader workers leave Ctrl-C to the training process, which saves before it stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (a cluster's pre-emption, torchrun's shutdown) lets the current step
    finish; the loop then saves a resumable checkpoint and stops. A second Ctrl-C stops at once: the
    checkpoint on disk stays whole because every save is atomic. (Repeats within a second are one
    request: torchrun forwards the Ctrl-C its workers already got from the terminal.)"""

    def __init__(self, run):
        self.run, self.requested, self.previous = run, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only there can Python take signals
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.requested is not None:
            if time.monotonic() - self.requested > 1:
                raise KeyboardInterrupt
            return
        self.requested = time.monotonic()
        if self.run.main:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step "
                  f"(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)




# ----------------------------------------------------------------------------- FSDP: sharding the model

def decoder_blocks(decoder) -> list:
    """The decoder's transformer blocks, found as transformers finds them for its own sharding and
    device maps: the modules whose class the model names in _no_split_modules (GPT2Block,
    LlamaDecoderLayer, ...). Under LoRA the peft wrapper hides them one level down."""
    base = decoder.get_base_model() if hasattr(decoder, "get_base_model") else decoder
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [module for module in base.modules() if type(module).__name__ in names]


def shard(model, run, dtype_name: str) -> None:
    """FSDP2 (torch's fully_shard), in place: each decoder block is a unit of its own, then the
    encoder, then the whole model takes what is left (embeddings, mapper, style, ...). Every rank
    keeps 1/world_size of each parameter, of its gradient and of the AdamW state made afterwards;
    a unit's full weights exist only while its forward or backward runs. The model is still on the
    CPU: fully_shard moves each unit to run.device as it shards it, so the whole model is never on
    one GPU. The optimizer must be made after this, from the sharded parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    blocks = decoder_blocks(model.decoder)
    if not blocks:
        raise UserError(f"--fsdp: cannot find the transformer blocks of this {model.decoder.config.model_type} "
                        f"decoder to shard (its class names none in _no_split_modules); train without --fsdp")
    mesh = init_device_mesh(run.device.type, (run.world_size,))
    policy = MixedPrecisionPolicy()  # float32 everywhere, the default
    if run.device.type == "cuda" and dtype_name == "bfloat16":
        # FSDP's mixed precision: bfloat16 copies of the weights for compute, float32 master weights,
        # gradients reduced in float32 (autocast is off under --fsdp on CUDA: this does its job).
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # The encoder is a unit of its own, so a frozen encoder whose features come from the cache is
    # never gathered at all.
    fully_shard(model.encoder, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
