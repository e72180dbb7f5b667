"""A training run's settings: what train.py's flags and its preset decide, made once at the top of
the script (train.parse_args) and read by the library functions that build, save and resume the model
(backbones.build_model and lora_config, checkpoint.save_training and load_resume). Each flag's meaning
is its help text in train.py; a checkpoint stores these as a dict (its train["args"])."""
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TrainSettings:
    # The data and the checkpoint.
    images: str
    stories: str
    out: str
    preset: str  # gpt2, small or tiny: the defaults below came from it where no flag was given
    # The optimisation.
    epochs: int
    batch_size: int  # per process
    grad_accum: int
    lr: float
    weight_decay: float
    warmup: float
    grad_clip: float
    seed: int
    val_split: float
    # The model.
    prefix_length: int
    feature_norm: bool
    prefix_norm: bool
    length_control: bool
    length_buckets: list | None
    tags: int
    tag_min_prob: float  # with tags: a class after the first is named only this sure
    tag_stories: str | None  # with tags: more stories, about the tags (prepare.py stories --tags)
    tags_asked: bool  # --tags was given on the command line (else tags is the preset's default, or 0)
    encoder: str
    clip: str
    mapper: str
    mapper_layers: int
    freeze_decoder: bool
    lora: bool
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: list | None
    train_encoder: bool
    decoder: str | None
    encoder_weights: str | None
    image_size: int
    resize_size: int
    # Where and how it runs.
    device: str
    max_image_pixels: int | None
    dtype: str
    num_workers: int
    feature_cache: str | None
    no_feature_cache: bool
    fsdp: bool
    gradient_checkpointing: bool
    save_every: int
    resume: str | None
    # The tiny preset's random GPT-2 (None for the pretrained presets, whose decoder has its own sizes).
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    n_positions: int | None = None
    vocab_size: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)
