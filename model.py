"""Image-to-story model: image encoder -> linear mapper -> GPT-2 prefix (the ClipCap idea).

Pure torch.nn: no file paths, no downloads, no printing. Pretrained weights are loaded
into these modules by utils.py; the checkpoint stores StoryConfig, so a saved model is
rebuilt from its checkpoint alone.
"""
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock, ResNet
from transformers import GPT2Config, GPT2LMHeadModel

# Pooled feature size of each encoder this file can build.
FEATURE_DIMS = {"resnet50": 2048, "resnet-tiny": 512}


@dataclass
class StoryConfig:
    encoder: str = "resnet50"  # a key of FEATURE_DIMS
    image_size: int = 224  # side of the centre crop the encoder sees
    resize_size: int = 232  # shorter side before the crop (ResNet50_Weights.IMAGENET1K_V2)
    prefix_length: int = 10  # number of prefix embeddings the mapper makes
    feature_norm: bool = False  # LayerNorm the pooled features before the mapper
    decoder: dict = field(default_factory=dict)  # GPT2Config.to_dict() of the decoder
    train_encoder: bool = False
    train_decoder: bool = True

    @property
    def feature_dim(self) -> int:
        return FEATURE_DIMS[self.encoder]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StoryConfig":
        return cls(**d)


def build_encoder(name: str) -> nn.Module:
    """A torchvision ResNet whose classifier is removed: images (B, 3, H, W) -> (B, feature_dim)."""
    if name == "resnet50":
        net = torchvision.models.resnet50(weights=None)
    elif name == "resnet-tiny":
        # The same ResNet code at toy size (one block per stage) for the offline preset.
        net = ResNet(BasicBlock, [1, 1, 1, 1])
    else:
        raise ValueError(f"unknown encoder {name!r}; choose one of {sorted(FEATURE_DIMS)}")
    net.fc = nn.Identity()  # keep the global-average-pooled features
    return net


class StoryModel(nn.Module):
    def __init__(self, config: StoryConfig):
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config.encoder)
        self.decoder = GPT2LMHeadModel(GPT2Config.from_dict(config.decoder))
        self.decoder.loss_type = "ForCausalLM"  # say it, or transformers warns that it guessed
        n_embd = self.decoder.config.n_embd
        # Random or unusual encoders give features of any scale; a LayerNorm evens them out.
        self.feature_norm = nn.LayerNorm(config.feature_dim) if config.feature_norm else nn.Identity()
        self.mapper = nn.Linear(config.feature_dim, config.prefix_length * n_embd)
        self.encoder.requires_grad_(config.train_encoder)
        self.decoder.requires_grad_(config.train_decoder)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.config.train_encoder:
            self.encoder.eval()  # a frozen encoder keeps its BatchNorm statistics
        if not self.config.train_decoder:
            self.decoder.eval()  # and a frozen decoder applies no dropout
        return self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, feature_dim) pooled features."""
        with torch.set_grad_enabled(self.config.train_encoder and torch.is_grad_enabled()):
            return self.encoder(images)

    def prefix(self, features: torch.Tensor) -> torch.Tensor:
        """(B, feature_dim) -> (B, prefix_length, n_embd) embeddings that start the story."""
        prefix = self.mapper(self.feature_norm(features.to(self.mapper.weight.dtype)))
        return prefix.view(features.shape[0], self.config.prefix_length, -1)

    def forward(self, input_ids, attention_mask, images=None, features=None):
        """Cross-entropy of the story tokens given the image.

        input_ids, attention_mask: (B, T) right-padded stories, each ending with EOS.
        Give either images (B, 3, H, W) or precomputed features (B, feature_dim).
        Returns the transformers output: .loss (mean over story tokens) and .logits.
        """
        if features is None:
            features = self.encode(images)
        prefix = self.prefix(features)  # (B, P, E)
        tokens = self.decoder.get_input_embeddings()(input_ids)  # (B, T, E)
        embeds = torch.cat([prefix, tokens], dim=1)  # (B, P+T, E)
        B, P = prefix.shape[:2]
        prefix_mask = attention_mask.new_ones(B, P)
        mask = torch.cat([prefix_mask, attention_mask], dim=1)  # (B, P+T)
        # Only story tokens are scored: prefix and padding positions get -100. Padding is
        # found by the mask, never by token id (GPT-2's id 0 is "!", and EOS doubles as pad).
        story_labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels = torch.cat([torch.full_like(prefix_mask, -100), story_labels], dim=1)
        return self.decoder(inputs_embeds=embeds, attention_mask=mask, labels=labels)

    @torch.no_grad()
    def generate(self, images=None, features=None, **generate_kwargs) -> torch.Tensor:
        """Story token ids (B * num_return_sequences, T_new) through transformers' generate.

        generate keeps a KV cache, so each new token costs one step, and provides greedy,
        sampling (top-k, top-p, temperature) and beam search from generate_kwargs.
        """
        if features is None:
            features = self.encode(images)
        prefix = self.prefix(features)  # (B, P, E)
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        return self.decoder.generate(inputs_embeds=prefix, attention_mask=mask, **generate_kwargs)
