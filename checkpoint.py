"""Checkpoints: what one stores, writing it atomically, reading one from anywhere (a file can never
run code, and an absurd config is refused before anything is built), rebuilding the model from it,
and the state a training run resumes from."""
import glob
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import backbones
from model import StoryConfig, StoryModel, decoder_config
from cli import UserError
from settings import TrainSettings
from files import atomic_write, load_torch_file, os_error, temp_file_beside

CHECKPOINT_FORMAT = 1
# Settings that shape the result: a resumed run must use the same ones as the run that saved it.
RESUME_MUST_MATCH = ("preset", "epochs", "batch_size", "grad_accum", "lr", "weight_decay", "warmup", "grad_clip",
                     "prefix_length", "feature_norm", "prefix_norm", "encoder", "clip", "mapper", "mapper_layers",
                     "freeze_decoder", "lora", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets",
                     "train_encoder", "decoder", "encoder_weights", "val_split", "seed", "length_control",
                     "length_buckets", "tags")
# What the settings were called in checkpoints saved before the decoder could be any causal LM,
# and the values of settings that did not exist yet when older checkpoints were saved.
OLD_NAMES = {"decoder": "gpt2", "freeze_decoder": "freeze_gpt2"}
NEWER = {"prefix_norm": False, "length_control": False, "length_buckets": None, "tags": 0}


def to_cpu(obj):
    """obj with every tensor in it (nested in dicts, lists, tuples) moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save_checkpoint(obj: dict, path) -> None:
    """Writes atomically: a temporary file in the same folder, flushed, then renamed over path.
    A run killed at any moment leaves either the old checkpoint or the new one, never half of one."""
    try:
        with atomic_write(path, "wb", what="the checkpoint", fix="choose another --out") as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as err:
        if (cause := os_error(err)) is None:
            raise
        raise UserError(f"{path}: cannot write the checkpoint ({cause.strerror or cause}); "
                        f"free some space or choose another --out; the previous file is unchanged") from None


def load_checkpoint(path) -> dict:
    """Loads a checkpoint written by train.py: a .pt file, a model folder, or a hub name (user/name) whose
    folder is in the Hugging Face cache or is fetched. Neither can run code (see load_torch_file and hub.read_folder)."""
    import hub  # (here, not above: hub.py builds on this file to convert checkpoints)
    if (folder := hub.find_folder(path)) is not None:
        return check_checkpoint(hub.read_folder(folder, where=str(path)), path)
    try:
        ckpt = load_torch_file(path, "checkpoint")
    except FileNotFoundError:
        raise UserError(hub.not_found(path)) from None
    return check_checkpoint(ckpt, path)


def check_checkpoint(ckpt, path) -> dict:
    """ckpt, if it holds what every checkpoint must (a file's, or a folder's read by hub.read_folder)."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a checkpoint written by this repo's train.py (format {CHECKPOINT_FORMAT}; "
                        f"a bare state_dict has no config to rebuild the model from)")
    required = {"config": dict, "model": dict, "tokenizer": str, "eos_token": str}
    wrong = [key for key, kind in required.items() if not isinstance(ckpt.get(key), kind)]
    if not isinstance(ckpt.get("sources", {}), dict):  # optional: no sources means every weight is stored
        wrong.append("sources")
    if wrong:
        raise UserError(f"{path}: incomplete checkpoint ({', '.join(wrong)} missing or malformed); re-train it")
    return ckpt


def stored_state(model, sources: dict, state: dict | None = None) -> dict:
    """The part of the state_dict a checkpoint must carry: every module without a source to reload
    from (mapper, feature_norm, style, prefix_norm, trained or random encoder and decoder), and LoRA adapters.
    state: the model's full state_dict when it was gathered from shards (FSDP), else model.state_dict()."""
    state = model.state_dict() if state is None else state
    return {k: v for k, v in state.items() if sources.get(k.split(".")[0]) is None or ".lora_" in k}


def load_model(ckpt: dict, decoder=None, encoder_weights=None, clip=None, where="checkpoint"):
    """Rebuilds (model, tokenizer) from a checkpoint loaded by load_checkpoint (where: its path,
    for messages). Weights the checkpoint does not hold (a frozen pretrained encoder or decoder, the
    base under LoRA adapters) come from where training took them, or from the decoder / encoder_weights
    / clip overrides. An absurd config is refused first (check_config_sane), before anything is built."""
    check_config_sane(ckpt["config"], where)
    incompatible = "it was written by an incompatible version of this code; re-train it"
    try:
        config = StoryConfig.from_dict(ckpt["config"])
    except (TypeError, KeyError, ValueError) as err:
        raise UserError(f"{where}: has a config this code cannot build ({err}); {incompatible}") from None
    if config.encoder.startswith("timm:"):  # a name this timm does not know would fail deep inside it
        backbones.check_timm_name(config.encoder.removeprefix("timm:"), where)
    sources = ckpt.get("sources", {})
    base = None
    if sources.get("decoder") is not None:
        name = decoder or sources["decoder"]
        try:
            architecture = decoder_config(config.decoder)
        except (TypeError, KeyError, ValueError) as err:
            raise UserError(f"{where}: has a config this code cannot build ({err}); {incompatible}") from None
        try:  # its weights in a model of the checkpoint's own config, built without a random initialisation
            base = backbones.load_decoder(name, config=architecture)
        except UserError:
            backbones.load_decoder(name)  # not a causal LM at all, or not there: that error says so
            raise UserError(f"{name}: this decoder does not have the architecture and size {where} was trained "
                            f"with") from None
    try:
        model = StoryModel(config, decoder=base)
    except (TypeError, KeyError, ValueError) as err:
        raise UserError(f"{where}: has a config this code cannot build ({err}); {incompatible}") from None
    if sources.get("encoder") is not None and config.encoder == "clip-vit-b32":
        name = clip or sources["encoder"]
        try:
            model.encoder.clip.load_state_dict(backbones.load_clip(name).state_dict())
        except RuntimeError:
            raise UserError(f"{name}: this CLIP does not have the size {where} was trained with") from None
    elif sources.get("encoder") is not None:
        # "imagenet" (ResNet-50) and "timm" name the library's own pretrained weights, not a file.
        path = encoder_weights or (None if sources["encoder"] in ("imagenet", "timm") else sources["encoder"])
        backbones.load_encoder_weights(model.encoder, config.encoder, path)
    state = ckpt["model"]
    own = stored_state(model, sources)
    if set(state) != set(own):
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        example = lambda names: f" ({names[0][:60]}, ...)" if names else ""
        raise UserError(f"{where}: its weights do not match its config ({len(missing)} missing{example(missing)}, "
                        f"{len(unexpected)} unexpected tensors{example(unexpected)}); {incompatible}")
    for key, tensor in state.items():  # load_state_dict would quietly cast a tensor of another dtype (and names other shapes)
        if not isinstance(tensor, torch.Tensor) or (tensor.shape == own[key].shape and tensor.dtype != own[key].dtype):
            raise UserError(f"{where}: its weights do not fit its config ({key} is "
                            f"{getattr(tensor, 'dtype', type(tensor).__name__)}, the model's {own[key].dtype}); {incompatible}")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), "")
        raise UserError(f"{where}: its weights do not fit its config ({detail[:200]}); {incompatible}") from None
    try:
        tokenizer = backbones.tokenizer_from_json(ckpt["tokenizer"], ckpt["eos_token"])
    except Exception as err:  # the tokenizers library raises a bare Exception for bad JSON
        raise UserError(f"{where}: its tokenizer is unreadable ({str(err)[:200]}); re-train it") from None
    return model, tokenizer


# ----------------------------------------------------------------------------- resuming a training run

@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    batches: int = 0  # batches trained on in the current epoch


def rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":  # this process's GPU only: a resume may have fewer GPUs in the machine
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def gathered_state(model, optimizer) -> tuple[dict, dict]:
    """(model state_dict, optimizer state_dict) of an FSDP-sharded model, gathered whole onto rank 0's
    CPU one parameter at a time (every rank must call it; the others get empty dicts). The optimizer
    state is keyed by parameter name, not by position, so any number of ranks, or one process without
    FSDP, can load it (restore)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=full), get_optimizer_state_dict(model, optimizer, options=full)


def save_training(path, *, args: TrainSettings, run, model, sources, tokenizer, optimizer, scheduler, scaler, progress,
                  data_id, sharded=False):
    """Writes a checkpoint that generates stories and resumes training (rank 0 writes, atomically), with
    the run's settings as a dict. sharded: the model is FSDP's, and its weights and optimizer state are
    gathered from every rank first."""
    rngs = [rng_state(run.device)]
    if run.world_size > 1:  # every process's random state, so each one's dropout continues exactly
        rngs = [None] * run.world_size
        dist.all_gather_object(rngs, rng_state(run.device))
    state, optimizer_state = gathered_state(model, optimizer) if sharded else (None, optimizer.state_dict())
    if not run.main:
        return
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "config": model.config.to_dict(),
        "sources": sources,
        "model": stored_state(model, sources, state),
        "tokenizer": backbones.tokenizer_to_json(tokenizer),
        "eos_token": tokenizer.eos_token,
        # An instruct decoder's chat template: a model folder's tokenizer files carry it (generation does not need it).
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
        "train": {"args": args.to_dict(), "step": progress.step, "epoch": progress.epoch,
                  "batches": progress.batches, "world_size": run.world_size, "data": data_id, "rng": rngs,
                  "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                  "scaler": scaler.state_dict()},
    }
    save_checkpoint(to_cpu(checkpoint), path)  # loads on a machine without the GPU it was trained on


def load_resume(args: TrainSettings, run) -> dict:
    """The checkpoint to continue from; refused if this run's settings (args) would not continue the
    run that saved it, whose settings it stores as a dict (older checkpoints lack the newer ones: NEWER).
    Another number of processes may continue it when the stories per optimizer step stay the same
    (processes x --batch-size x --grad-accum): 2 processes at --batch-size 4 onto 1 at --batch-size 8."""
    ckpt = load_checkpoint(args.resume)
    state = ckpt.get("train", {})
    if "rng" not in state and not Path(args.resume).is_file():  # a model folder, here or a hub name's
        raise UserError(f"{args.resume}: is a model folder, which holds no optimizer state; resume from the .pt "
                        f"that train.py saved beside it (--out DIR/ writes DIR.pt), or train again without --resume")
    if "rng" not in state:
        raise UserError(f"{args.resume}: holds no training state to resume from; train again without --resume")
    other_world = state["world_size"] != run.world_size
    for key in RESUME_MUST_MATCH:
        if key.startswith("lora_") and not args.lora and not state["args"].get("lora"):
            continue  # LoRA's settings shape nothing without LoRA (and their defaults changed)
        if other_world and key in ("batch_size", "grad_accum"):
            continue  # their product with the processes must match instead (below)
        saved = state["args"].get(key, state["args"].get(OLD_NAMES.get(key), NEWER.get(key)))
        if saved != getattr(args, key):
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{args.resume}: was trained with {flag} {saved}, this run has "
                            f"{getattr(args, key)}; resume with the settings of the run that saved it")
    if other_world:
        saved_size, saved_accum = state["args"]["batch_size"], state["args"]["grad_accum"]
        before = state["world_size"] * saved_size * saved_accum
        now = run.world_size * args.batch_size * args.grad_accum
        if before != now:
            raise UserError(f"{args.resume}: was trained with {before} stories per step ({state['world_size']} "
                            f"process(es) x --batch-size {saved_size} x --grad-accum {saved_accum}), this run has "
                            f"{now}; give --batch-size and --grad-accum that make {before} with {run.world_size} process(es), "
                            f"or resume with torchrun --nproc_per_node={state['world_size']}")
    return ckpt


def restore(ckpt, run, optimizer, scheduler, scaler, *, model, batch_size) -> Progress:
    """Puts a run back where ckpt left it: optimizer (sharded or not), schedule, random state and the
    position in the epoch, counted in this run's batches per process."""
    state = ckpt["train"]
    load_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    if run.rank < len(state["rng"]):  # (a new process of a larger run keeps its fresh seed)
        set_rng_state(state["rng"][run.rank], run.device)
    # Stories of this epoch already trained on, by all processes together, in this run's batches.
    stories = state["batches"] * state["args"]["batch_size"] * state["world_size"]
    if stories % (batch_size * run.world_size):
        raise UserError(f"the checkpoint stopped {stories} stories into an epoch, which {run.world_size} process(es) "
                        f"at --batch-size {batch_size} cannot continue from; resume with the processes that saved it")
    return Progress(state["step"], state["epoch"], stories // (batch_size * run.world_size))


def load_optimizer_state(model, optimizer, saved: dict) -> None:
    """AdamW's state from a checkpoint into this run's optimizer, sharded by FSDP or not. An FSDP run
    saves it keyed by parameter name (gathered_state), any other run by position in the optimizer's
    list; torch's set_optimizer_state_dict takes the names and shards a full state as it loads it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.tensor import DTensor
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    by_position = all(isinstance(key, int) for key in saved["state"])
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    if by_position and not sharded:
        optimizer.load_state_dict(saved)  # a plain run onto a plain run, as before FSDP
        return
    if by_position:  # positions are the order of train.py's list of trained parameters
        saved = {"state": {names[i]: s for i, s in saved["state"].items()},
                 "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))


def check_writable(path):
    """Fails now, not after hours of training, if the checkpoint cannot be written there (a missing
    folder is made); and removes what a killed save left behind (a save writes .NAME.*.tmp, then
    renames it over NAME)."""
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)  # --out runs/today/model.pt makes runs/today
        for leftover in folder.glob(f".{glob.escape(Path(path).name)}.*.tmp"):
            leftover.unlink(missing_ok=True)
        fd, tmp = temp_file_beside(Path(path))  # the file a save writes first
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise UserError(f"{path}: cannot write the checkpoint in {folder} ({err.strerror}); choose another --out") from None


# ----------------------------------------------------------------------------- untrusted configs

# A checkpoint is data from anywhere: its config must not make this code allocate without bound.
# 10 billion parameters is 40 GB of float32 weights, far beyond any model this repo trains; the
# other bounds are each well above every published model's (GPT-2 XL, Llama 3 405B, CLIP ViT-bigG).
MAX_PARAMETERS = 10_000_000_000
MAX_CONFIG_INT = 2 ** 24  # any integer in a decoder or encoder config dict, checked before it is built
SIZE_BOUNDS = {"hidden_size": 65_536, "num_hidden_layers": 1_024, "vocab_size": 4_194_304,
               "max_position_embeddings": MAX_CONFIG_INT, "intermediate_size": 1_048_576}
IMAGE_SIDE_BOUND = 4_096  # image_size and resize_size, in pixels
STORY_BOUNDS = {"prefix_length": 4_096, "mapper_layers": 256, "album_slots": 64, "tags": 20, "tag_tokens": 1_024}


def _first_huge_int(d, trail=""):
    """(key, value) of the first integer in d, nested dicts and lists included, above MAX_CONFIG_INT."""
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else ()
    for key, value in items:
        name = f"{trail}.{key}" if trail else str(key)
        if isinstance(value, (dict, list)):
            if (found := _first_huge_int(value, name)) is not None:
                return found
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CONFIG_INT:
            return name, value
    return None


def _transformer_sizes(config, where, what) -> dict:
    """The sizes of a transformers config, read through its generic names (GPT-2's n_embd, n_layer
    and n_positions map to them); each must be a positive integer within SIZE_BOUNDS."""
    sizes = {}
    for name, bound in SIZE_BOUNDS.items():
        value = getattr(config, name, None)
        if name == "intermediate_size" and value is None:  # GPT-2's n_inner: None means 4 x hidden
            value = getattr(config, "n_inner", None) or 4 * sizes.get("hidden_size", 0)
        if value is None and name in ("vocab_size", "max_position_embeddings"):
            continue  # a vision tower has neither
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= bound:
            raise UserError(f"{where}: refused: its {what} has {name} = {value!r}, outside [1, {bound:,}]; "
                            f"nothing was built; use a checkpoint written by this repo's train.py")
        sizes[name] = value
    return sizes


def _transformer_parameters(s: dict) -> int:
    """An upper estimate of a transformer's parameters: embeddings and an untied output layer, and per
    layer the attention (4 h^2) and a gated MLP (3 h i)."""
    h = s["hidden_size"]
    embeddings = (2 * s.get("vocab_size", 0) + s.get("max_position_embeddings", 0)) * h
    return embeddings + s["num_hidden_layers"] * (4 * h * h + 3 * h * s["intermediate_size"])


def check_config_sane(config: dict, where="checkpoint") -> None:
    """Refuses, with one line, a checkpoint config that would build an absurd model: a size that is
    negative, zero or enormous, a prefix that leaves no room in the decoder's context, or more than
    MAX_PARAMETERS parameters in all. Runs before anything is built: plain integers are checked before a
    transformers config is made from them, and the sizes before the parameter count is estimated."""
    from transformers import AutoConfig

    def refuse(what):
        raise UserError(f"{where}: refused: {what}; nothing was built; use a checkpoint written by this repo's train.py")

    def integer(key, low, high):
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high):
            refuse(f"its config has {key} = {value!r}, outside [{low}, {high:,}]")
        return value or 0

    for key in ("image_size", "resize_size"):
        integer(key, 1, IMAGE_SIDE_BOUND)
    prefix_length = integer("prefix_length", 1, STORY_BOUNDS["prefix_length"])
    mapper_layers = integer("mapper_layers", 0, STORY_BOUNDS["mapper_layers"])
    album_slots = integer("album_slots", 1, STORY_BOUNDS["album_slots"]) or 1
    integer("tags", 0, STORY_BOUNDS["tags"])
    tag_tokens = integer("tag_tokens", 0, STORY_BOUNDS["tag_tokens"])
    if not isinstance(config.get("tag_template", ""), str) or len(config.get("tag_template", "")) > 10_000:
        refuse("its config has a tag_template that is not a short text")
    min_prob = config.get("tag_min_prob", 0.0)
    if isinstance(min_prob, bool) or not isinstance(min_prob, (int, float)) or not 0 <= min_prob <= 1:
        refuse(f"its config has tag_min_prob = {str(min_prob)[:40]}, not a probability")
    buckets = config.get("length_buckets") or []  # (absent from checkpoints older than length control)
    if not isinstance(buckets, list) or (buckets and (len(buckets) != 2 or not all(
            isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= MAX_CONFIG_INT for b in buckets))):
        refuse(f"its config has length_buckets = {str(buckets)[:40]}, not two token counts")
    styles = config.get("styles") or []
    if not isinstance(styles, list) or len(styles) > 100_000:
        refuse(f"its config lists {len(styles) if isinstance(styles, list) else 'malformed'} styles")
    sized = {}
    for key, what in (("decoder", "decoder"), ("encoder_config", "encoder")):
        d = config.get(key) or {}
        if not isinstance(d, dict):
            refuse(f"its {what} config is not a dict")
        if (huge := _first_huge_int(d)) is not None:
            refuse(f"its {what} config has {huge[0]} = {huge[1]:,}, above {MAX_CONFIG_INT:,}")
        if key == "encoder_config" and "hidden_size" not in d:
            continue  # a ResNet's size is fixed by its name; only a CLIP-style tower has a config
        try:
            built = AutoConfig.for_model(**d) if "model_type" in d else None
        except Exception as err:  # unknown model_type, wrong types: transformers raises several kinds
            reason = (str(err).strip().split(". ")[0].splitlines() or [type(err).__name__])[0][:150]
            refuse(f"its {what} config cannot be read ({reason})")
        if built is not None:
            sized[what] = _transformer_sizes(built, where, f"{what} config")
    decoder = sized.get("decoder")
    if decoder is None:
        refuse("its config has no decoder config with a model_type")
    prefix_tokens = album_slots * prefix_length + bool(styles) + bool(buckets) + tag_tokens * bool(config.get("tags"))
    if prefix_tokens >= decoder.get("max_position_embeddings", math.inf):
        refuse(f"its image prefix ({prefix_tokens} positions) leaves no room for a story in the decoder's "
               f"context of {decoder['max_position_embeddings']} positions")
    # The mapper (model.build_mapper): features -> prefix_length x hidden, with an MLP's hidden layer or a
    # transformer's layers; a ResNet-50 (25 million) stands for an encoder without a config.
    h, out = decoder["hidden_size"], prefix_length * decoder["hidden_size"]
    encoder = config.get("encoder_config") or {}
    features = encoder.get("projection_dim") or encoder.get("num_features") or 2_048
    mapper = features * out + {"mlp": out * out // 2, "transformer": mapper_layers * 8 * h * h}.get(config.get("mapper"), 0)
    total = sum(map(_transformer_parameters, sized.values())) + mapper + 25_000_000
    if total > MAX_PARAMETERS:
        refuse(f"its config builds about {total / 1e9:,.0f} billion parameters, over the limit of "
               f"{MAX_PARAMETERS / 1e9:,.0f} billion")


