"""Measures the memory figures of docs/torchrun.md (not a test): per-process memory of weights,
gradients and AdamW state for one process, 2 DDP processes and 2 FSDP processes (CPU, gloo), and the
activation memory --gradient-checkpointing saves. A random decoder of SmolLM2-135M's shape, so
nothing is downloaded; the frozen toy encoder's features are given directly.

    python tests/fsdp_memory.py                 # both tables, about 10 minutes on 2 CPU cores, 7 GB of memory
    python tests/fsdp_memory.py --activations   # the second table only
"""
import gc
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import torch
from transformers import LlamaConfig

import training
from distributed import Run, shard
from model import StoryConfig, StoryModel
from ranks import run_ranks

# SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config.json), shorter context.
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)


def rss() -> int:
    """This process's resident memory now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(checkpointing=False):
    torch.manual_seed(0)
    model = StoryModel(StoryConfig(encoder="resnet-tiny", decoder=LlamaConfig(**SMOLLM2_135M).to_dict()))
    if checkpointing:
        training.checkpoint_activations(model.decoder)
    return model.train()


def batch(size, tokens):
    return dict(input_ids=torch.randint(0, 49152, (size, tokens)), attention_mask=torch.ones(size, tokens, dtype=torch.long),
                features=torch.randn(size, 512))


def per_process(rank, world_size, how, out):
    """One process's memory after two optimizer steps (gradients still held): weights, gradients, Adam."""
    torch.set_num_threads(1)
    if world_size > 1:
        torch.distributed.init_process_group("gloo")
    gc.collect()
    start = rss()
    model = build()
    if how == "fsdp":
        shard(model, Run(torch.device("cpu"), rank, world_size), "float32")
    elif how == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    gc.collect()
    weights = rss() - start
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        model(**batch(2, 32)).loss.backward()
        optimizer.step()
    gc.collect()
    held = rss() - start
    local = lambda p: p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    result = dict(how=how, world_size=world_size, rank=rank, weights_mb=weights / 2**20, held_mb=held / 2**20,
                  trained=sum(p.numel() for p in trained), local_trained=sum(local(p) for p in trained),
                  local_all=sum(local(p) for p in model.parameters()),
                  peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10)
    Path(out, f"{how}{world_size}-{rank}.json").write_text(json.dumps(result))
    if world_size > 1:
        torch.distributed.destroy_process_group()


def activations(checkpointing, size, tokens, out):
    """Activation bytes kept for the backward pass (torch's saved-tensor hooks, each storage once, the
    weights left out), and how far the process's peak memory rises above the built model."""
    torch.set_num_threads(1)
    model = build(checkpointing)
    kept = {}  # storage address -> bytes: a tensor saved by several operations counts once
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # saved too, but no extra memory

    def keep(t):
        if t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    gc.collect()
    start = rss()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = model(**batch(size, tokens)).loss
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 2**10 - start
    Path(out, f"act{int(checkpointing)}.json").write_text(json.dumps(dict(
        checkpointing=checkpointing, saved_mb=sum(kept.values()) / 2**20, peak_above_start_mb=peak / 2**20)))


def main():
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        # glibc keeps freed memory in its heap once a large block has been freed (its mmap threshold
        # grows), so a shard's freed full-size weights and a block's freed gradients would still count
        # as resident. A fixed threshold maps every large tensor on its own and gives it back when freed,
        # so the resident size is what the live tensors take (as torch.cuda.memory_allocated counts on a GPU).
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    out = Path(tempfile.mkdtemp())
    if sys.argv[1:] != ["--activations"]:
        per_process_table(out)
    activations_table(out)


def per_process_table(out):
    n = sum(p.numel() for p in build().decoder.parameters())
    print(f"decoder: {n / 1e6:.1f}M parameters (SmolLM2-135M's shape); 16 bytes each = {16 * n / 2**20:.0f} MiB "
          f"of weights, gradients and AdamW state in float32\n")
    print("| run | per process: trained parameters held | weights (RSS) | weights + gradients + AdamW (RSS) | "
          "formula 16 B x N / shards | peak RSS |")
    print("|---|---|---|---|---|---|")
    for how, world in (("one", 1), ("ddp", 2), ("fsdp", 2)):
        run_ranks(lambda rank: per_process(rank, world, how, out), world, out / f"logs-{how}", timeout=1200)
        for rank in range(world):
            r = json.loads((out / f"{how}{world}-{rank}.json").read_text())
            shards = world if how == "fsdp" else 1
            print(f"| {how} x {world}, rank {rank} | {r['local_trained'] / 1e6:.1f}M of {r['trained'] / 1e6:.1f}M | "
                  f"{r['weights_mb']:.0f} MiB | {r['held_mb']:.0f} MiB | {16 * r['trained'] / shards / 2**20:.0f} MiB | "
                  f"{r['peak_mb']:.0f} MiB |")


def activations_table(out):
    print("\n| batch 4 x 512 tokens | kept for backward | peak RSS above the model |")
    print("|---|---|---|")
    for checkpointing in (False, True):
        run_ranks(lambda rank: activations(checkpointing, 4, 512, out), 1, out / f"logs-act{checkpointing}",
                  timeout=1200)
        r = json.loads((out / f"act{int(checkpointing)}.json").read_text())
        print(f"| {'--gradient-checkpointing' if checkpointing else 'without'} | {r['saved_mb']:.0f} MiB | "
              f"{r['peak_above_start_mb']:.0f} MiB |")


if __name__ == "__main__":
    main()
