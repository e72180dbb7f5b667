"""The one way stories are written: a checkpoint loaded once, images encoded, stories decoded with
transformers' generate and formatted. generate.py, app.py and evaluate.py use it; so can you:

    from storyteller import Storyteller
    teller = Storyteller("vlm_model.pt")
    print(teller.tell("data/images/photo_rocket.jpg"))
    for piece in teller.stream("data/images/photo_rocket.jpg"):  # the same story, a word at a time
        print(piece, end="", flush=True)
"""
import functools
import json
import re
import warnings

import torch
from PIL import Image, ImageOps
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

import dataset
from checkpoint import load_checkpoint, load_model
from cli import DTYPES, UserError, non_negative_float, non_negative_int, pick_device, positive_float, positive_int, top_p_value
from metrics import tag_words
from model import LENGTHS, decoder_sizes
from quantize import METHODS as QUANTIZE_METHODS, calibration_ids, quantize_decoder
from streaming import StopFlag, StoryStreamer, in_background

# The prefix is embeddings, not tokens, so n-gram blocking and the repetition penalty can only look
# at the story itself: as intended.
warnings.filterwarnings("ignore", message="Passing `(no_repeat_ngram_size|repetition_penalty)` with `inputs_embeds`")

# For a model with tags: how much the words of a picture's tags are favoured until its story says
# one (MentionTags). Measured on photos the model never saw: docs/backbones.md.
TAG_BIAS = 0.0
# After this many new tokens a story ends at its next sentence end, so that --max-new-tokens is a limit
# it seldom meets mid-sentence: the small preset's stories ended mid-sentence 43 and 47 times in 100
# without it, 2 and 0 times with it, a little shorter (docs/backbones.md).
END_AFTER = 48
# A story wants some surprise but stays on topic: top-k sampling, a little cooler than 1.
DEFAULTS = dict(strategy="sample", top_k=50, top_p=1.0, temperature=0.8, num_beams=4,
                repetition_penalty=1.0, no_repeat_ngram_size=3, max_new_tokens=80, num_stories=1, tag_bias=TAG_BIAS,
                end_after=END_AFTER)
STRATEGIES = ["sample", "beam", "greedy"]


# ----------------------------------------------------------------------------- the command line's decoding flags

def add_decoding_args(p):
    """The decoding flags of generate.py and evaluate.py, so both decode the same way."""
    p.add_argument("--strategy", choices=STRATEGIES, default=DEFAULTS["strategy"],
                   help="greedy: most likely words; sample: top-k/top-p sampling; beam: beam search (default: %(default)s)")
    p.add_argument("--top-k", type=non_negative_int, default=DEFAULTS["top_k"], help="sample from the k most likely tokens; 0 = all (default: %(default)s)")
    p.add_argument("--top-p", type=top_p_value, default=DEFAULTS["top_p"], help="nucleus sampling mass in (0, 1] (default: %(default)s)")
    p.add_argument("--temperature", type=positive_float, default=DEFAULTS["temperature"], help="sampling temperature (default: %(default)s)")
    p.add_argument("--num-beams", type=positive_int, default=DEFAULTS["num_beams"], help="beams for --strategy beam (default: %(default)s)")
    p.add_argument("--repetition-penalty", type=positive_float, default=DEFAULTS["repetition_penalty"],
                   help="above 1 discourages repeating tokens (default: %(default)s)")
    p.add_argument("--no-repeat-ngram-size", type=non_negative_int, default=DEFAULTS["no_repeat_ngram_size"],
                   help="never repeat an n-gram of this size; 0 = off (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=positive_int, default=DEFAULTS["max_new_tokens"], help="story length limit in tokens (default: %(default)s)")
    p.add_argument("--end-after", type=non_negative_int, default=DEFAULTS["end_after"],
                   help="after this many tokens, end the story at its next sentence end (not with beam search); "
                        "0 = only --max-new-tokens and the end token stop it (default: %(default)s)")
    p.add_argument("--num-stories", type=positive_int, default=DEFAULTS["num_stories"], help="stories per image, with sample or beam (default: %(default)s)")
    p.add_argument("--seed", type=int, help="random seed: the same seed gives the same stories")
    p.add_argument("--tag-bias", type=non_negative_float, default=DEFAULTS["tag_bias"],
                   help="for a model with tags: added to the logits of the tag words' first tokens until the story "
                        "says one of them, so it tells of what the picture shows; 0 = off (default: %(default)s)")
    p.add_argument("--length", choices=LENGTHS,
                   help="story length, for a model trained with --length-control (default: medium); "
                        "--max-new-tokens stays the hard limit")


def add_quantize_arg(p):
    """--quantize, shared by generate.py, app.py and evaluate.py."""
    p.add_argument("--quantize", choices=["none", *QUANTIZE_METHODS], default="none",
                   help="int8: the decoder's weights and activations become int8 when the model loads (SmoothQuant, "
                        "a scale per token), CPU only: 2.4x float32's tokens/s on the small preset, loss 1.019x, about "
                        "1.3 s more to load; docs/quantization.md (default: %(default)s)")


def check_decoding_args(p, args):
    if args.strategy == "greedy" and args.num_stories > 1:
        p.error("--num-stories above 1 needs --strategy sample or beam (greedy gives one story)")


def decoding(args) -> dict:
    """The decoding settings among a script's parsed arguments, as generation_config's keywords."""
    return {key: getattr(args, key) for key in DEFAULTS}


# ----------------------------------------------------------------------------- decoding

def generation_config(tokenizer, max_new_tokens=DEFAULTS["max_new_tokens"], strategy=DEFAULTS["strategy"],
                      top_k=DEFAULTS["top_k"], top_p=DEFAULTS["top_p"], temperature=DEFAULTS["temperature"],
                      num_beams=DEFAULTS["num_beams"], repetition_penalty=DEFAULTS["repetition_penalty"],
                      no_repeat_ngram_size=DEFAULTS["no_repeat_ngram_size"], num_stories=DEFAULTS["num_stories"],
                      tag_bias=DEFAULTS["tag_bias"], end_after=DEFAULTS["end_after"]) -> GenerationConfig:
    """transformers' GenerationConfig for a strategy (greedy, sample or beam) and its settings."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    common = dict(max_new_tokens=max_new_tokens, num_return_sequences=num_stories,
                  repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if strategy == "sample":
        config = GenerationConfig(do_sample=True, top_k=top_k, top_p=top_p, temperature=temperature, **common)
    elif strategy == "beam":
        beams = max(num_beams, num_stories)
        config = GenerationConfig(do_sample=False, num_beams=beams, early_stopping=beams > 1, **common)
    else:
        config = GenerationConfig(do_sample=False, num_beams=1, **common)
    config.tag_bias = tag_bias  # ours, not transformers': stories_from_features reads it (MentionTags)
    config.end_after = end_after  # ours too (EndAtSentence)
    return config


def can_stream(gen_config) -> bool:
    """Whether transformers' generate can hand on the stories as it decodes them: not with beam search."""
    return (gen_config.num_beams or 1) == 1  # None: transformers' default, one


def story_room(model) -> int:
    """Story tokens that fit in the decoder's context after the prefix: the most --max-new-tokens can give."""
    return decoder_sizes(model.decoder.config)[2] - model.config.prefix_tokens


def style_id(config, style: str | None) -> int:
    """The id of the asked-for style; a UserError naming the known ones if the model has no such style."""
    try:
        return config.style_id(style)
    except ValueError as err:
        raise UserError(f"--style {style}: {err}") from None


def length_id(config, length: str | None) -> int:
    """The id of the asked-for length; a UserError if the model was trained without length control."""
    try:
        return config.length_id(length)
    except ValueError as err:
        raise UserError(f"--length {length}: {err}") from None


@torch.no_grad()
def encode_images(model, images) -> torch.Tensor:
    """Pooled encoder features (B, feature_dim) of RGB PIL images, on the model's device and dtype."""
    transform = dataset.image_transform(model.config)
    weight = next(model.encoder.parameters())
    pixels = torch.stack([transform(image) for image in images]).to(weight.device, weight.dtype)
    return model.encode(pixels.contiguous(memory_format=torch.channels_last))  # the CNN's fastest layout


@functools.cache
def imagenet_info():
    """ImageNet's class names, shipped with timm (read once)."""
    from timm.data import ImageNetInfo
    return ImageNetInfo()


# The kind of thing an ImageNet-1k class is, for the animals, fruit, vegetables, flowers and fungi
# among them: ImageNet numbers its classes in WordNet's order, so a kind is a range of them (timm
# ships the names, not WordNet's hierarchy). A story may say "bird" of a red-breasted merganser.
KINDS = [((0, 6), "fish"), ((7, 24), "bird"), ((25, 29), "amphibian"), ((30, 32), "frog"), ((33, 37), "turtle"),
         ((38, 48), "lizard"), ((49, 50), "crocodile"), ((51, 51), "dinosaur"), ((52, 68), "snake"),
         ((72, 77), "spider"), ((80, 100), "bird"), ((101, 101), "elephant"), ((118, 121), "crab"),
         ((127, 146), "bird"), ((147, 148), "whale"), ((151, 268), "dog"), ((269, 272), "wolf"), ((273, 275), "dog"),
         ((277, 280), "fox"), ((281, 293), "cat"), ((294, 297), "bear"), ((300, 320), "insect"),
         ((321, 326), "butterfly"), ((330, 332), "rabbit"), ((333, 338), "rodent"), ((339, 339), "horse"),
         ((341, 343), "pig"), ((345, 347), "cattle"), ((348, 349), "sheep"), ((350, 350), "goat"),
         ((351, 353), "antelope"), ((365, 368), "ape"), ((369, 382), "monkey"), ((383, 384), "lemur"),
         ((385, 386), "elephant"), ((389, 397), "fish"), ((936, 946), "vegetable"), ((948, 957), "fruit"),
         ((985, 986), "flower"), ((991, 997), "mushroom")]


# For the other classes (mostly things people make), the kind is the first of these words in the
# head of WordNet's own definition of the class, which timm ships: "pickup: a light truck with ..."
# is a truck, "banjo: a stringed instrument ..." an instrument.
GLOSS_KINDS = set("""car truck van bus vehicle boat ship aircraft airplane train locomotive bicycle motorcycle
instrument hat helmet cap garment dress coat shoe boot tool building house church tower bridge shed tent toy
weapon gun ball chair table bed lamp clock bag box bottle dish bowl cup pot pan knife""".split())
# The classes whose definition heads with a word that is not what a child would call them: "balloon: large
# tough nonrigid bag ...", "corkscrew: a bottle opener ...", "syringe: a medical instrument ..." (the request
# asks about the kind first, so a wrong kind would lead the story astray). Read off all 1000 classes' kinds.
NOT_KINDS = {"balloon", "corkscrew", "nipple", "punching bag", "barometer", "binoculars", "guillotine", "projector",
             "scale", "stethoscope", "syringe"}


def gloss_kind(index: int) -> str | None:
    """The GLOSS_KINDS word in the head of the class's WordNet definition (its words before the first
    "to", "that", "with", ...: "screen to keep insects from entering a building" is no building), if any."""
    if imagenet_info().index_to_description(index).split(",")[0] in NOT_KINDS:
        return None
    definition = imagenet_info().index_to_description(index, detailed=True).partition(": ")[2].lower()
    definition = re.sub(r"^(any|one) of (various|several|the|a)?\s*", "", definition)  # "any of various large trucks"
    head = re.split(r"[;,(]| (?:to|that|with|for|used|which|in|on|from|by|of|having|consisting) ", definition)[0]
    for word in head.split():
        for kind in (word, word[:-1] if word.endswith("s") else None):  # "trucks" is a truck
            if kind in GLOSS_KINDS:
                return kind
    return None


@functools.cache
def tag_name(index: int) -> str:
    """The words a class is written with: ImageNet's first name for it, or, where that is one word and
    a two-word name begins with it, that one ("tabby, tabby cat" is "tabby cat"); then its kind where it has
    one the name does not say: "red-breasted merganser (bird)", so the story can name the kind too."""
    names = [name.strip() for name in imagenet_info().index_to_description(index).split(",")]
    if len(names[0].split()) == 1:
        names[0] = next((n for n in names[1:] if len(n.split()) == 2 and n.split()[0] == names[0]), names[0])
    kind = next((kind for (first, last), kind in KINDS if first <= index <= last), None) or gloss_kind(index)
    return names[0] if kind is None or kind in names[0].lower() else f"{names[0]} ({kind})"


def encode_whole(model, images) -> torch.Tensor:
    """Features (B, feature_dim) of the whole of each RGB PIL image (dataset.whole_picture), uncropped."""
    return encode_images(model, [dataset.whole_picture(image, model.config) for image in images])


def picture_tags(model, features, whole=None) -> list[list[tuple[str, float]]]:
    """What the decoder reads each picture shows: (name, probability) of the classifier's likeliest
    classes, best first; a class after the first only if its probability is at least tag_min_prob.
    whole: encode_whole's features of the same pictures, if given, whose probabilities are averaged
    with the crop's. Measured on 386 cut-out photos and drawings never trained on (docs/backbones.md):
    the top 3 named the thing for 45.1% from the crop alone, 51.6% with the whole picture too; on
    the sample photos the tags stayed the same or swapped places."""
    probs, ids = model.tag_classes(features, whole)
    return [[(tag_name(i), p) for k, (p, i) in enumerate(zip(row_p, row_i)) if k == 0 or p >= model.config.tag_min_prob]
            for row_p, row_i in zip(probs.tolist(), ids.tolist())]


def read_tags(model, albums, features, album_mask=None) -> list | None:
    """picture_tags of each item of albums (lists of RGB PIL images) from its encode_albums features,
    with the whole picture's view too, as generation reads them; None for a model without tags."""
    if not model.config.tags:
        return None
    whole = encode_whole(model, [album[0] for album in albums]) if album_mask is None else None
    return picture_tags(model, features, whole)


def tag_text(names: list[str]) -> str:
    """Tags as the request says them: each kind once, as the thing asked about, its classes after it.
    ["drake (bird)", "mortar", "goose (bird)"] -> "a bird (drake, goose), mortar"; the order is the tags' own.
    A kind is right more often than a class (a classifier that takes a duck for a drake still sees a
    bird), and stories asked about "a bird (drake, ...)" say "bird" more often than those asked about
    "drake (bird), ...": measured on unseen pictures in docs/backbones.md."""
    groups = []  # [kind, its classes], or [None, [a class without a kind]], in the order they first come
    for name in names:
        name, _, kind = name.partition(" (")
        kind = kind.rstrip(")") or None
        same = next((group for group in groups if kind and group[0] == kind), None)
        if same:
            same[1].append(name)
        else:
            groups.append([kind, [name]])
    return ", ".join(classes[0] if kind is None else f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} ({', '.join(classes)})"
                     for kind, classes in groups)


def tag_prompts(model, tokenizer, features, tags=None) -> list[list[int]]:
    """The tag words of each picture, as token ids: its picture_tags (or tags, if given) as tag_text in
    the model's tag_template, fewer of them if they would take more than tag_tokens."""
    config = model.config
    prompts = []
    for row in tags if tags is not None else picture_tags(model, features):
        names = [name for name, _ in row]
        for k in range(len(names), 0, -1):
            ids = tokenizer(config.tag_template.replace("{tags}", tag_text(names[:k])), add_special_tokens=False)["input_ids"]
            if len(ids) <= config.tag_tokens:
                break
        prompts.append(ids[-config.tag_tokens:])
    return prompts


@torch.no_grad()
def encode_albums(model, albums) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features of albums (lists of RGB PIL images): (B, S, feature_dim) padded to the longest with
    its album mask (B, S), each image encoded once; for a single-image model (B, feature_dim) and None."""
    flat = encode_images(model, [image for album in albums for image in album])  # (images, feature_dim)
    if model.config.album_slots == 1:
        return flat, None
    sizes = [len(album) for album in albums]
    padded = dataset.pad_albums(list(flat.split(sizes)))
    return padded["features"], padded["album_mask"].to(flat.device)


class MentionTags(LogitsProcessor):
    """Adds bias to the logits of the tokens that start each picture's tag words (metrics.tag_words:
    "merganser", "bird"), until its story has said one of them; then the story goes as the decoder likes.

    Written here because transformers' own tool for this, generate's sequence_bias, gives every row
    of a batch the same words and keeps biasing them to the end of the story; here each picture has
    its own words and the push stops once one is said."""

    def __init__(self, tokenizer, tags: list[list[tuple[str, float]]], bias: float):
        self.bias, self.words = bias, None
        self.starts = []  # per picture: the first token of each of its tag words, as a story can begin it
        for picture in tags:
            words = {w for name, _ in picture for w in tag_words(name)}
            self.starts.append(sorted({tokenizer(form, add_special_tokens=False)["input_ids"][0]
                                       for word in words for form in (f" {word}", f" {word.capitalize()}", word.capitalize())}))

    def __call__(self, input_ids, scores):
        if self.words is None:  # (pictures, vocab); the logits may have more columns than the tokenizer has tokens
            self.words = torch.zeros(len(self.starts), scores.shape[1], dtype=torch.bool, device=scores.device)
            for row, ids in enumerate(self.starts):
                self.words[row, ids] = True
        rows = scores.shape[0]  # pictures x (stories or beams) each, a picture's rows together
        words = self.words[torch.arange(rows, device=scores.device) // (rows // len(self.starts))]  # (rows, vocab)
        said = words.gather(1, input_ids).any(1, keepdim=True) if input_ids.shape[1] else torch.zeros_like(words[:, :1])
        return scores + self.bias * (words & ~said)


class EndAtSentence(StoppingCriteria):
    """Ends each story at the first token that closes a sentence (". ! ?", a closing quote after one)
    once it has at least `after` new tokens (and gen_config.min_new_tokens).

    Written here because transformers' stop_strings stop at the first match however short the story,
    and max_new_tokens cuts it wherever it is. Reads generate's input_ids, which hold only the new
    tokens: model.generate starts it from embeddings."""

    def __init__(self, tokenizer, after: int):
        self.tokenizer, self.after = tokenizer, after

    def __call__(self, input_ids, scores, **kwargs):
        if input_ids.shape[1] < self.after:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        ends = [self.tokenizer.decode(token).rstrip().rstrip("\"'”").endswith((".", "!", "?"))
                for token in input_ids[:, -1].tolist()]
        return torch.tensor(ends, dtype=torch.bool, device=input_ids.device)


def stories_from_features(model, tokenizer, features, gen_config, style=None, length=None,
                          album_mask=None, tags=None, **generate_kwargs) -> list[list[str]]:
    """gen_config.num_return_sequences stories for each row of features: (B, feature_dim), or
    albums (B, S, feature_dim) with their album_mask (B, S). For a model with tags, tags are each
    picture's (picture_tags, computed if not given), and gen_config.tag_bias pushes the story to say one.
    generate_kwargs go to transformers' generate (streamer=..., stopping_criteria=...). gen_config.end_after
    ends a sampled or greedy story at its next sentence end after that many tokens (EndAtSentence)."""
    sid, lid = style_id(model.config, style), length_id(model.config, length)
    B, device = len(features), features.device
    style_ids = torch.full((B,), sid, device=device) if model.config.styles else None
    length_ids = torch.full((B,), lid, device=device) if model.config.length_buckets else None
    prompt = {}
    if model.config.tags:
        tags = picture_tags(model, features) if tags is None else tags
        prompt_ids, prompt_mask = dataset.left_pad(tag_prompts(model, tokenizer, features, tags), tokenizer.pad_token_id)
        prompt = dict(prompt_ids=prompt_ids.to(device), prompt_mask=prompt_mask.to(device))
        if getattr(gen_config, "tag_bias", 0):
            prompt["logits_processor"] = LogitsProcessorList([MentionTags(tokenizer, tags, gen_config.tag_bias)])
    if getattr(gen_config, "end_after", 0) and can_stream(gen_config):  # (beam search keeps whole hypotheses)
        after = max(gen_config.end_after, gen_config.min_new_tokens or 0)
        criteria = StoppingCriteriaList(generate_kwargs.pop("stopping_criteria", []))
        generate_kwargs["stopping_criteria"] = StoppingCriteriaList([*criteria, EndAtSentence(tokenizer, after)])
    ids = model.generate(features=features, style_ids=style_ids, length_ids=length_ids, album_mask=album_mask,
                         generation_config=gen_config, **prompt, **generate_kwargs)
    texts = [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    n = gen_config.num_return_sequences
    return [texts[i * n:(i + 1) * n] for i in range(len(features))]


def tags_json(tags) -> list[dict]:
    """A picture's tags as generate.py --json and evaluate.py's metrics.json write them."""
    return [{"name": name, "p": round(p, 4)} for name, p in tags]


def format_stories(path, stories, as_json, several, tags=None) -> str:
    """generate.py's output for one image (path) or album (a list of paths): "Generated Story:" and
    the story, or a JSON line per story ({"image": ...} or {"images": [...]}, "story": ...), with the
    picture's tags ([{"name": ..., "p": ...}], best first) for a model with tags."""
    if as_json:
        key = "images" if isinstance(path, list) else "image"
        extra = {} if tags is None else {"tags": tags_json(tags)}
        return "\n".join(json.dumps({key: path, "story": story, **extra}, ensure_ascii=False) for story in stories)
    lines = [f"== {' | '.join(path) if isinstance(path, list) else path} =="] if several else []
    for k, story in enumerate(stories, start=1):
        lines += ["Generated Story:" if len(stories) == 1 else f"Generated Story {k}/{len(stories)}:", story, ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the library's front door

class Storyteller:
    """A checkpoint written by train.py, loaded once onto a device, ready to write stories.

    device: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps; dtype: float32, bfloat16 or
    float16 weights; quantize: "int8" for int8 decoder weights on the CPU (see generate.py --quantize).
    decoder, encoder_weights, clip: where to reload frozen pretrained parts from, if not where
    training took them. Raises cli.UserError, one line, for a checkpoint it cannot use."""

    def __init__(self, checkpoint="vlm_model.pt", device="auto", dtype="float32", quantize="none",
                 decoder=None, encoder_weights=None, clip=None):
        self.device = pick_device(device)
        self.model, self.tokenizer = load_model(load_checkpoint(checkpoint), decoder=decoder,
                                                encoder_weights=encoder_weights, clip=clip, where=str(checkpoint))
        self.model.to(self.device, DTYPES[dtype]).eval()
        self.model.encoder.to(memory_format=torch.channels_last)
        if quantize != "none":
            self.model.decoder = quantize_decoder(self.model.decoder, quantize, calibration_ids(self.tokenizer))
        self.styles = list(self.model.config.styles or [])  # a model trained with a style column
        self.room = story_room(self.model)  # the longest story the decoder's context has room for

    def settings(self, **decoding) -> GenerationConfig:
        """generation_config with DEFAULTS for what is not given, max_new_tokens capped by the room left."""
        decoding = {**DEFAULTS, **decoding}
        decoding["max_new_tokens"] = min(decoding["max_new_tokens"], self.room)
        return generation_config(self.tokenizer, **decoding)

    def check_style(self, style: str | None, length: str | None = None) -> None:
        """A UserError, before any image is read, for a style or length this model cannot write."""
        style_id(self.model.config, style)
        length_id(self.model.config, length)

    def check_album(self, size: int, what="an album") -> None:
        slots = self.model.config.album_slots
        if size > slots:
            learned = "single images only" if slots == 1 else f"albums of at most {slots} images"
            raise UserError(f"{what} of {size} images: this model learned {learned}; train it on stories "
                            f"of longer albums (image names joined by |) to tell them")

    def encode(self, images) -> torch.Tensor:
        """(B, feature_dim) features of RGB PIL images."""
        return encode_images(self.model, images)

    def from_features(self, features, gen_config, style=None, length=None, album_mask=None, tags=None,
                      **generate_kwargs) -> list[list[str]]:
        return stories_from_features(self.model, self.tokenizer, features, gen_config, style, length, album_mask, tags,
                                     **generate_kwargs)

    def stories_and_tags(self, images, gen_config, style=None, length=None, **generate_kwargs) -> tuple[list[list[str]], list]:
        """gen_config.num_return_sequences stories for each item of images, decoded in one batch
        (an item is an RGB PIL image, or an album, a list of them, that gets one story), and each
        item's tags: [(name, probability), ...] as the decoder read them, or None for a model without tags.
        generate_kwargs go to transformers' generate: streamer=streaming.StoryStreamer(...) hands on the
        stories as they are decoded, row k * num_return_sequences + j being item k's story j."""
        if not images:
            return [], []
        albums = [list(item) if isinstance(item, (list, tuple)) else [item] for item in images]
        for album in albums:
            self.check_album(len(album))
        features, album_mask = encode_albums(self.model, albums)
        tags = read_tags(self.model, albums, features, album_mask)
        stories = self.from_features(features, gen_config, style, length, album_mask, tags, **generate_kwargs)
        return stories, tags or [None] * len(stories)

    def stories(self, images, gen_config, style=None, length=None, **generate_kwargs) -> list[list[str]]:
        """The stories of stories_and_tags."""
        return self.stories_and_tags(images, gen_config, style, length, **generate_kwargs)[0]

    def load_image(self, path):
        """An image file as the model sees it: upright RGB, at least the model's input size."""
        return dataset.load_image(path, self.model.config.resize_size)

    def picture(self, image):
        """A PIL image as load_image would give its file (upright, transparency on white, RGB), or the
        image file at a path loaded: a picture told from Python gets the story its file gets from generate.py."""
        if isinstance(image, Image.Image):
            return dataset.to_rgb(ImageOps.exif_transpose(image))
        return self.load_image(image)

    def tell(self, images, album=False, style=None, length=None, batch_size=8, seed=None, **decoding):
        """Stories about an image (a path or a PIL image) or a list of them; album=True tells one story
        about the list's images, in order. keywords: generate.py's decoding flags (strategy="beam",
        temperature=1.0, max_new_tokens=60, num_stories=3, ...); length: "short", "medium" or "long".
        One image or album gives its story (a list of them with num_stories > 1); a list gives one such per image."""
        single = album or not isinstance(images, (list, tuple))
        images = [images] if not isinstance(images, (list, tuple)) else list(images)
        items = [images] if album else images
        gen_config = self.settings(**decoding)
        self.check_style(style, length)
        if album:  # before any image is read
            self.check_album(len(images))
        if seed is not None:
            torch.manual_seed(seed)
        told = []
        for start in range(0, len(items), batch_size):  # images are read a batch at a time
            batch = [[self.picture(im) for im in item] if album else self.picture(item)
                     for item in items[start:start + batch_size]]
            told += self.stories(batch, gen_config, style, length)
        told = [stories[0] if gen_config.num_return_sequences == 1 else stories for stories in told]
        return told[0] if single else told

    def stream(self, image, style=None, length=None, seed=None, **decoding):
        """The story tell(image, ...) returns with the same settings and seed, in pieces as it is
        decoded, a word at a time: "".join(teller.stream(image, seed=1)) == teller.tell(image, seed=1).
        image: a path or a PIL image; one story (num_stories=1). generate runs in a thread of its own;
        an error there is raised here, and a reader that stops early stops it at its next token.
        transformers' beam search cannot stream: with strategy="beam" the story comes whole, in one piece."""
        picture, gen_config = self._one_story(image, style, length, seed, decoding)
        stop = StopFlag()
        yield from in_background(lambda put: self._write_story(put, picture, gen_config, style, length,
                                                               stopping_criteria=StoppingCriteriaList([stop])), stop)

    def stream_to(self, write, image, style=None, length=None, seed=None, **decoding) -> None:
        """stream's pieces handed to write(piece) as they are decoded, in this thread: for a caller
        with nothing else to do meanwhile (generate.py at a terminal). Faster than stream's thread
        with int8: fbgemm's kernels ran 3x slower outside the main thread (measured, 51 -> 155 us a call
        for a 576x1536 layer), 2.3 s -> 5.1 s for a story here. A second thread's parallel work gets
        OpenMP threads of its own beside the main thread's, more than the cores, which a thread that
        is alone in using torch does not pay (app.Batcher.serve decodes in app.py's main thread so)."""
        self._write_story(write, *self._one_story(image, style, length, seed, decoding), style, length)

    def _write_story(self, write, picture, gen_config, style, length, **generate_kwargs) -> None:
        """One story of picture handed to write a piece at a time, or whole where it cannot stream (beam)."""
        if not can_stream(gen_config):
            write(self.stories([picture], gen_config, style, length, **generate_kwargs)[0][0])
            return
        self.stories([picture], gen_config, style, length, **generate_kwargs,
                     streamer=StoryStreamer(self.tokenizer, lambda row, text: write(text)))

    def _one_story(self, image, style, length, seed, decoding):
        gen_config = self.settings(**decoding)
        if gen_config.num_return_sequences != 1:
            raise UserError(f"stream tells one story; got num_stories={gen_config.num_return_sequences}")
        self.check_style(style, length)
        picture = self.picture(image)
        if seed is not None:
            torch.manual_seed(seed)  # the process's generator, which generate's thread draws from too
        return picture, gen_config
