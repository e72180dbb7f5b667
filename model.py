"""Image-to-story model: image encoder -> mapper -> language-model prefix (the ClipCap idea).

The encoder is torchvision's ResNet-50, CLIP's vision tower or any timm model; the decoder is any
transformers causal LM (GPT-2 by default, Llama, Qwen2, OPT, ...). Pure torch.nn: no file paths, no
downloads, no printing. Pretrained weights are loaded into these modules by backbones.py; the checkpoint
stores StoryConfig, so a saved model is rebuilt from its checkpoint alone.
"""
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock, ResNet
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModelWithProjection
from transformers.pytorch_utils import Conv1D

# Pooled feature size of each ResNet this file can build; a CLIP's or a timm model's is in encoder_config.
FEATURE_DIMS = {"resnet50": 2048, "resnet-tiny": 512}
ENCODERS = [*FEATURE_DIMS, "clip-vit-b32", "timm:NAME"]
TIMM = "timm:"  # prefix of a timm encoder's name: timm:convnext_tiny
MAPPERS = ["linear", "mlp", "transformer"]
LENGTHS = ["short", "medium", "long"]  # the thirds of the training stories' lengths
IMAGENET_CLASSES = 1000  # what a pretrained encoder's classifier tells apart (tags)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class StoryConfig:
    encoder: str = "resnet50"  # one of ENCODERS
    encoder_config: dict = field(default_factory=dict)  # CLIP: CLIPVisionConfig.to_dict(); timm: {"num_features": N}
    image_size: int = 224  # side of the centre crop the encoder sees
    resize_size: int = 232  # shorter side before the crop (ResNet50_Weights.IMAGENET1K_V2)
    interpolation: str = "bilinear"  # of that resize: torchvision's InterpolationMode value (CLIP: bicubic)
    image_mean: tuple = IMAGENET_MEAN  # per-channel normalisation the encoder was trained with
    image_std: tuple = IMAGENET_STD
    prefix_length: int = 10  # number of prefix embeddings the mapper makes
    feature_norm: bool = False  # LayerNorm the pooled features before the mapper
    mapper: str = "linear"  # one of MAPPERS
    mapper_layers: int = 8  # transformer mapper depth (ClipCap's default)
    decoder: dict = field(default_factory=dict)  # the decoder's transformers config.to_dict() (has its model_type)
    # RMS the prefix vectors are normalised to at the start of training: the decoder's token-embedding RMS,
    # so the prefix lands on the scale of the words it stands in for. None (the default): the mapper's output.
    prefix_scale: float | None = None
    lora: dict | None = None  # peft LoraConfig arguments when the decoder is fine-tuned through LoRA adapters
    styles: list = field(default_factory=list)  # story styles the model was trained with, sorted
    album_slots: int = 1  # most images one story was trained on; above 1 each image's place has a learned embedding
    # Length control: [most tokens of a short story, most of a medium one]; empty: none (LENGTHS).
    length_buckets: list = field(default_factory=list)
    # Tags: how many of the encoder's own ImageNet classes (its pretrained classifier's top ones) are
    # written as words after the prefix, so the decoder reads what the picture shows; 0: none.
    tags: int = 0
    tag_template: str = "Pictured: {tags}.\n"  # the words around the class names; {tags} stands for them
    tag_tokens: int = 32  # the most tokens the tag words take
    # A class after the first is named only if the classifier gives it at least this probability:
    # one sure class reads better than three guesses (docs/backbones.md). 0: always all of them.
    tag_min_prob: float = 0.0
    train_encoder: bool = False
    train_decoder: bool = True  # the whole decoder (False with LoRA: only the adapters train)

    @property
    def feature_dim(self) -> int:
        if self.encoder == "clip-vit-b32":
            return self.encoder_config["projection_dim"]
        if self.encoder.startswith(TIMM):
            return self.encoder_config["num_features"]
        return FEATURE_DIMS[self.encoder]

    @property
    def prefix_tokens(self) -> int:
        """Most positions in front of the story: an image prefix per album slot, then one position for
        the style and one for the length, if the model has them."""
        return (self.album_slots * self.prefix_length + bool(self.styles) + bool(self.length_buckets)
                + self.tag_tokens * bool(self.tags))

    def length_id(self, length: str | None) -> int:
        """LENGTHS index of the asked-for length; a model with length control writes medium ones unasked."""
        if not self.length_buckets:
            if length is None:
                return 0
            raise ValueError("this model was trained without length control (train.py --length-control)")
        if length is None:
            return LENGTHS.index("medium")
        if length not in LENGTHS:
            raise ValueError(f"unknown length {length!r}; use one of {', '.join(LENGTHS)}")
        return LENGTHS.index(length)

    def length_bucket(self, tokens: int) -> int:
        """The LENGTHS index of a story of this many tokens."""
        return sum(tokens > edge for edge in self.length_buckets)

    def style_id(self, style: str | None) -> int:
        """0 for no style (the unconditioned case), else 1 + the style's place in self.styles."""
        if style is None:
            return 0
        if not self.styles:
            raise ValueError("this model was trained without styles (its stories file had no style column)")
        if style not in self.styles:
            raise ValueError(f"unknown style {style!r}; this model knows: {', '.join(self.styles)}")
        return self.styles.index(style) + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StoryConfig":
        return cls(**d)


class CLIPImageEncoder(nn.Module):
    """CLIP's vision tower and projection: images (B, 3, H, W) -> (B, projection_dim) image embeddings,
    the vector CLIP compares with text (ClipCap's mapper input)."""

    def __init__(self, config: dict):
        super().__init__()
        self.clip = CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(config))

    def forward(self, images):
        return self.clip(pixel_values=images).image_embeds


def build_encoder(name: str, encoder_config: dict) -> nn.Module:
    """An image encoder without classifier: images (B, 3, H, W) -> (B, feature_dim)."""
    if name == "clip-vit-b32":
        return CLIPImageEncoder(encoder_config)
    if name.startswith(TIMM):
        import timm  # here: only timm encoders need it
        # num_classes=0 drops the classifier: forward gives the pooled (pre-logits) features.
        return timm.create_model(name.removeprefix(TIMM), pretrained=False, num_classes=0)
    if name == "resnet50":
        net = torchvision.models.resnet50(weights=None)
    elif name == "resnet-tiny":
        # The same ResNet code at toy size (one block per stage) for the offline preset.
        net = ResNet(BasicBlock, [1, 1, 1, 1])
    else:
        raise ValueError(f"unknown encoder {name!r}; choose one of {ENCODERS}")
    net.fc = nn.Identity()  # keep the global-average-pooled features
    return net


class TransformerMapper(nn.Module):
    """ClipCap's transformer mapper: the features become prefix_length tokens, learned constant
    queries are appended, a small transformer mixes them, and the query positions are the prefix."""

    def __init__(self, feature_dim: int, prefix_length: int, n_embd: int, n_head: int, num_layers: int):
        super().__init__()
        self.prefix_length = prefix_length
        self.linear = nn.Linear(feature_dim, prefix_length * n_embd)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, n_embd))
        # ClipCap's layer: pre-norm, ReLU MLP of twice the width, no dropout.
        layer = nn.TransformerEncoderLayer(n_embd, n_head, dim_feedforward=2 * n_embd, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

    def forward(self, features):
        x = self.linear(features).view(features.shape[0], self.prefix_length, -1)  # (B, P, E)
        queries = self.prefix_const.expand(features.shape[0], -1, -1)  # (B, P, E)
        return self.transformer(torch.cat([x, queries], dim=1))[:, self.prefix_length:]  # (B, P, E)


def decoder_config(d: dict):
    """The transformers config of any causal LM from its to_dict() (GPT2Config, LlamaConfig, ...)."""
    d = dict(d)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def decoder_sizes(config) -> tuple[int, int, int]:
    """(hidden size, attention heads, context length) of any causal LM's config: the one place that
    reads them. transformers maps the standard names onto each model's own (GPT-2's n_embd, n_head,
    n_positions). A config that states no context length (some rotary models) gets 2048."""
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_ctx", None) or 2048
    return config.hidden_size, config.num_attention_heads, context


def build_mapper(config: "StoryConfig", n_embd: int, n_head: int) -> nn.Module:
    """features (B, feature_dim) -> prefix_length * n_embd numbers per image (prefix() shapes them):
    a linear layer, or one of ClipCap's two mappers, an MLP or a transformer."""
    out = config.prefix_length * n_embd
    if config.mapper == "linear":
        return nn.Linear(config.feature_dim, out)
    if config.mapper == "mlp":
        return nn.Sequential(nn.Linear(config.feature_dim, out // 2), nn.Tanh(), nn.Linear(out // 2, out))
    if config.mapper == "transformer":
        return TransformerMapper(config.feature_dim, config.prefix_length, n_embd, n_head, config.mapper_layers)
    raise ValueError(f"unknown mapper {config.mapper!r}; choose one of {MAPPERS}")


class StoryModel(nn.Module):
    def __init__(self, config: StoryConfig, decoder: nn.Module | None = None):
        """decoder: a pretrained causal LM of config.decoder's architecture, used as it is (LoRA
        adapters wrap it; peft renames the layers it wraps); None builds a randomly initialised one."""
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config.encoder, config.encoder_config)
        if decoder is None:
            # float32 whatever dtype the config was saved in (from_config would follow it); --dtype casts later.
            decoder = AutoModelForCausalLM.from_config(decoder_config(config.decoder), dtype=torch.float32)
        decoder.loss_type = "ForCausalLM"  # say it, or transformers warns that it guessed
        decoder.requires_grad_(config.train_decoder)
        if config.lora:
            from peft import LoraConfig, get_peft_model  # here: importing peft takes seconds, and only LoRA needs it
            lora = dict(config.lora)
            # GPT-2's layers are transformers' Conv1D, whose weight is stored (in, out): fan_in_fan_out says so.
            lora.setdefault("fan_in_fan_out", any(isinstance(module, Conv1D) for name, module in decoder.named_modules()
                                                  if name.rsplit(".", 1)[-1] in lora["target_modules"]))
            with warnings.catch_warnings():  # peft calls a transformers name deprecated in v5; nothing to act on
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                decoder = get_peft_model(decoder, LoraConfig(**lora))  # only the adapters train
        self.decoder = decoder
        n_embd, n_head, _ = decoder_sizes(decoder.config)
        # Random or unusual encoders give features of any scale; a LayerNorm evens them out.
        self.feature_norm = nn.LayerNorm(config.feature_dim) if config.feature_norm else nn.Identity()
        self.mapper = build_mapper(config, n_embd, n_head)
        # Style control: one learned embedding per style, appended to the prefix; row 0 is "no style".
        # It trains with the mapper, so it works with a frozen or LoRA-tuned decoder and any tokenizer.
        self.style = nn.Embedding(len(config.styles) + 1, n_embd) if config.styles else None
        # Albums: each image's prefix gets the embedding of its place in the album, so the decoder
        # knows which picture comes first. Length control: one embedding per LENGTHS bucket, after the style.
        # nn.Embedding's N(0, 1) start, as the style's: on tests/test_albums.py's synthetic albums a small
        # start (std 0.02) named 61% of the colours in their place after 25 epochs, this one 100%.
        self.slot = nn.Embedding(config.album_slots, n_embd) if config.album_slots > 1 else None
        self.length = nn.Embedding(len(LENGTHS), n_embd) if config.length_buckets else None
        # The pretrained encoder's ImageNet classifier, frozen: it names what the picture shows.
        self.tagger = nn.Linear(config.feature_dim, IMAGENET_CLASSES).requires_grad_(False) if config.tags else None
        # Opt-in (--prefix-norm): an RMSNorm whose gain starts at the token embeddings' RMS puts every
        # prefix vector (and the style's) on the scale of the words from step one. The plain linear
        # mapper already starts within 2x of it and trained better (docs/backbones.md).
        self.prefix_norm = None
        if config.prefix_scale is not None:
            self.prefix_norm = nn.RMSNorm(n_embd, eps=1e-6)
            nn.init.constant_(self.prefix_norm.weight, config.prefix_scale)
        self.encoder.requires_grad_(config.train_encoder)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.config.train_encoder:
            self.encoder.eval()  # a frozen encoder keeps its BatchNorm statistics
        if not self.config.train_decoder and not self.config.lora:
            self.decoder.eval()  # and a frozen decoder applies no dropout (LoRA's adapters do)
        return self

    def encode(self, images: torch.Tensor, album_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, feature_dim) pooled features; an album batch
        (B, S, 3, H, W) with album_mask (B, S) -> (B, S, feature_dim), encoding only the real images."""
        with torch.set_grad_enabled(self.config.train_encoder and torch.is_grad_enabled()):
            if images.dim() == 4:
                return self.encoder(images)
            real = self.encoder(images[album_mask])  # (images in the batch, feature_dim)
            features = real.new_zeros(*album_mask.shape, real.shape[-1])
            features[album_mask] = real
            return features

    @torch.no_grad()
    def tag_classes(self, features: torch.Tensor, whole: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, feature_dim) -> the classifier's probabilities (B, tags) of its likeliest ImageNet classes
        and their class ids (B, tags), best first. whole: features of another view of the same
        pictures (B, feature_dim), whose probabilities are averaged in."""
        views = [features] if whole is None else [features, whole]
        probs = torch.stack([self.tagger(v.to(self.tagger.weight.dtype)).float().softmax(-1) for v in views]).mean(0)
        return probs.topk(self.config.tags, dim=-1)

    def prefix(self, features, style_ids=None, length_ids=None, album_mask=None, prompt_ids=None, prompt_mask=None):
        """Embeddings that start the story and their attention mask: (B, positions, n_embd), (B, positions).

        features: (B, feature_dim) of one image each, or (B, S, feature_dim) of albums of up to S
        images, in order, with album_mask (B, S) True for the real ones (first) and False for padding.
        Each image's prefix_length embeddings (plus its album-place embedding), shorter albums padded
        on the left so the story always starts right after the last picture; then the style (style_ids
        (B,): StoryConfig.style_id, None = none) and the length (length_ids (B,): StoryConfig.length_id);
        last the tag words, prompt_ids (B, L) left-padded with prompt_mask (B, L), for a model with tags."""
        if features.dim() == 2:
            features = features[:, None]  # (B, 1, D): an album of one
        B, S = features.shape[:2]
        if S > self.config.album_slots:
            raise ValueError(f"an album of {S} images; this model was trained on at most {self.config.album_slots}")
        if album_mask is None:
            album_mask = torch.ones(B, S, dtype=torch.bool, device=features.device)
        prefix = self.mapper(self.feature_norm(features.to(next(self.mapper.parameters()).dtype)))
        prefix = prefix.view(B, S, self.config.prefix_length, -1)  # (B, S, P, E)
        if self.slot is not None:
            prefix = prefix + self.slot.weight[:S, None].to(prefix.dtype)  # image k gets slot k
        if not album_mask.all():
            # Move each album's padding slots to the front: slot j shows image j - (S - n).
            pad = S - album_mask.sum(1, keepdim=True)  # (B, 1)
            order = (torch.arange(S, device=pad.device) - pad) % S  # (B, S)
            prefix = prefix.gather(1, order[:, :, None, None].expand_as(prefix))
            album_mask = torch.arange(S, device=pad.device) >= pad  # (B, S)
        prefix = prefix.flatten(1, 2)  # (B, S*P, E)
        mask = album_mask.repeat_interleave(self.config.prefix_length, dim=1).long()  # (B, S*P)
        extras = []
        if self.style is not None:
            extras.append(self.style(style_ids if style_ids is not None else mask.new_zeros(B)))
        if self.length is not None:
            ids = length_ids if length_ids is not None else mask.new_full((B,), self.config.length_id(None))
            extras.append(self.length(ids))
        if extras:
            prefix = torch.cat([prefix, torch.stack(extras, dim=1).to(prefix.dtype)], dim=1)  # (B, S*P + extras, E)
            mask = torch.cat([mask, mask.new_ones(B, len(extras))], dim=1)
        if self.prefix_norm is not None:
            prefix = self.prefix_norm(prefix)
        if prompt_ids is not None:  # words, so after the prefix norm: they are on the embeddings' scale already
            words = self.decoder.get_input_embeddings()(prompt_ids).to(prefix.dtype)  # (B, L, E)
            prefix, mask = torch.cat([prefix, words], dim=1), torch.cat([mask, prompt_mask.long()], dim=1)
        return prefix, mask

    def forward(self, input_ids, attention_mask, images=None, features=None, style_ids=None, length_ids=None,
                album_mask=None, prompt_ids=None, prompt_mask=None):
        """Cross-entropy of the story tokens given the image or album (and style and length).

        input_ids, attention_mask: (B, T) right-padded stories, each ending with EOS.
        Give either images (B, 3, H, W) or precomputed features (B, feature_dim); for albums
        (B, S, 3, H, W) or (B, S, feature_dim) with album_mask (B, S) (see prefix).
        style_ids, length_ids: (B,) each story's style (0 = none) and length bucket, for a model that has them;
        prompt_ids, prompt_mask: the tag words (see prefix). Returns the transformers output: .loss (mean over story tokens) and .logits.
        """
        if features is None:
            features = self.encode(images, album_mask)
        prefix, prefix_mask = self.prefix(features, style_ids, length_ids, album_mask, prompt_ids, prompt_mask)  # (B, P, E), (B, P)
        tokens = self.decoder.get_input_embeddings()(input_ids)  # (B, T, E)
        embeds = torch.cat([prefix, tokens], dim=1)  # (B, P+T, E)
        mask = torch.cat([prefix_mask, attention_mask], dim=1)  # (B, P+T)
        # Only story tokens are scored: prefix and padding positions get -100. Padding is
        # found by the mask, never by token id (GPT-2's id 0 is "!", and EOS doubles as pad).
        story_labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels = torch.cat([torch.full_like(prefix_mask, -100), story_labels], dim=1)
        return self.decoder(inputs_embeds=embeds, attention_mask=mask, labels=labels,
                            position_ids=positions(prefix_mask, mask))

    @torch.no_grad()
    def generate(self, images=None, features=None, style_ids=None, length_ids=None, album_mask=None,
                 prompt_ids=None, prompt_mask=None, **generate_kwargs) -> torch.Tensor:
        """Story token ids (B * num_return_sequences, T_new) through transformers' generate.

        generate keeps a KV cache, so each new token costs one step, and provides greedy,
        sampling (top-k, top-p, temperature) and beam search from generate_kwargs. It numbers
        positions by the attention mask, as forward does, so a padded album reads as an unpadded one.
        """
        if features is None:
            features = self.encode(images, album_mask)
        prefix, mask = self.prefix(features, style_ids, length_ids, album_mask, prompt_ids, prompt_mask)  # (B, P, E), (B, P)
        return self.decoder.generate(inputs_embeds=prefix, attention_mask=mask, **generate_kwargs)


def positions(prefix_mask, mask) -> torch.Tensor | None:
    """Position ids that skip padding (as transformers' generate numbers them), where the prefix has
    padding: the first real position is 0, whatever an album's length. None (the decoder's own
    0, 1, 2, ...) where it has none, which is the same for every real token."""
    if bool(prefix_mask.all()):
        return None
    return (mask.cumsum(1) - 1).clamp(min=0)
