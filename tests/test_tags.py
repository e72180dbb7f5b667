"""Tags at generation time: the words the decoder reads (tag_name, tag_min_prob), MentionTags pushing
a story to say one of them, generate.py --json and the web page showing them, evaluate.py's tag-use
rate, and ResNet-50's own ImageNet classifier as a tagger. Tiny random models, offline."""
import dataclasses
import json

import pytest
import torch
import torchvision
from PIL import Image

import dataset
import metrics
import storyteller
import train
from checkpoint import save_checkpoint
from conftest import DATA, run_main
from storyteller import MentionTags, Storyteller, picture_tags, tag_name, tag_prompts
from test_backbones import PHOTO, backbones, train_args  # noqa: F401 (backbones: the fixture)
from test_stories import writer  # noqa: F401 (the fixture: a tiny chat model)


@pytest.fixture(scope="module")
def tag_model(backbones, tmp_path_factory):
    """A tiny Llama + timm test_efficientnet model trained with --tags 3."""
    root, stories = backbones
    out = tmp_path_factory.mktemp("tags") / "m.pt"
    train.main(train_args(root, stories, out, "--decoder", root / "llama", "--freeze-decoder", "--encoder",
                          "timm:test_efficientnet", "--encoder-weights", root / "effnet.pth", "--tags", "3"))
    return out


def test_a_tag_is_written_with_its_kind():
    assert tag_name(281) == "tabby cat"  # "tabby, tabby cat": the one-word name alone would not say cat
    assert tag_name(285) == "Egyptian cat"  # two words already, the kind among them
    assert tag_name(953) == "pineapple (fruit)"  # "pineapple, ananas": no two-word name begins with it
    assert tag_name(98) == "red-breasted merganser (bird)" and tag_name(350) == "ibex (goat)"  # not "Capra ibex"
    assert tag_name(587) == "hammer (tool)" and tag_name(555) == "fire engine (truck)"  # WordNet's definitions:
    # "a hand tool with ...", "any of various large trucks that ..."
    assert tag_name(904) == "window screen"  # "screen to keep insects from entering a building" is no building
    assert tag_name(968) == "cup"  # the name is its kind
    assert tag_name(417) == "balloon" and tag_name(845) == "syringe"  # "large tough nonrigid bag", "a medical instrument"
    assert metrics.tag_words("red-breasted merganser (bird)") == ["merganser", "bird"]
    assert metrics.tag_words("tabby cat") == ["cat"] and metrics.tag_words("ox") == []


def test_the_request_asks_about_each_kind_once_before_its_classes(tag_model):
    assert storyteller.tag_text(["drake (bird)", "mortar", "goose (bird)", "ibex (goat)", "gong (instrument)"]) == \
        "a bird (drake, goose), mortar, a goat (ibex), an instrument (gong)"
    assert storyteller.tag_text(["tabby cat", "Egyptian cat"]) == "tabby cat, Egyptian cat"  # the kind is in the name
    assert storyteller.tag_text(["academic gown", "mortarboard (cap)", "military uniform"]) == \
        "academic gown, a cap (mortarboard), military uniform"  # the classifier's order, where no kind is shared
    teller = Storyteller(tag_model, "cpu")
    features = teller.encode([teller.load_image(PHOTO)])
    tags = [("fig (fruit)", 0.5), ("pot", 0.3), ("lemon (fruit)", 0.2)]
    [prompt] = tag_prompts(teller.model, teller.tokenizer, features, [tags])
    assert teller.tokenizer.decode(prompt) == "Pictured: a fruit (fig, lemon), pot.\n"


def test_mention_tags_pushes_each_picture_to_its_own_words_until_one_is_said(tag_model):
    teller = Storyteller(tag_model, "cpu")
    tok = teller.tokenizer
    tags = [[("tabby cat", 0.9)], [("pineapple (fruit)", 0.5), ("teapot", 0.2)]]
    push = MentionTags(tok, tags, bias=5.0)
    def starts(words):  # the first token of each word as a story can begin it: " cat", " Cat", "Cat"
        return {tok(form, add_special_tokens=False)["input_ids"][0] for w in words for form in (f" {w}", f" {w.capitalize()}", w.capitalize())}
    first = {0: starts(["cat"]), 1: starts(["pineapple", "fruit", "teapot"])}  # metrics.tag_words
    assert first[0] - first[1] and first[1] - first[0]
    # Two stories per picture (num_return_sequences 2): rows 0-1 are picture 0's, rows 2-3 picture 1's.
    scores = torch.zeros(4, len(tok))
    pushed = push(torch.zeros(4, 0, dtype=torch.long), scores.clone())
    for row in range(4):
        assert set(torch.nonzero(pushed[row]).flatten().tolist()) == first[row // 2]
        assert pushed[row].max() == 5.0
    # Once a row has said one of its words (its first token), the push stops for that row only.
    said = next(iter(first[0] - first[1]))
    history = torch.tensor([[said], [7], [said], [7]])
    pushed = push(history, scores.clone())
    assert not pushed[0].any() and pushed[1].any() and pushed[2].any() and pushed[3].any()


def test_the_tag_bias_makes_the_story_say_a_tag_word(tag_model):
    teller = Storyteller(tag_model, "cpu")
    image = teller.load_image(PHOTO)
    [tags] = picture_tags(teller.model, teller.encode([image]))
    words = {teller.tokenizer(form, add_special_tokens=False)["input_ids"][0]
             for name, _ in tags for w in metrics.tag_words(name) for form in (f" {w}", f" {w.capitalize()}", w.capitalize())}
    plain = teller.tell(image, strategy="greedy", max_new_tokens=6, tag_bias=0.0)
    pushed = teller.tell(image, strategy="greedy", max_new_tokens=6, tag_bias=100.0)
    first = teller.tokenizer(pushed, add_special_tokens=False)["input_ids"]
    assert any(t in words for t in first) and pushed != plain
    # With the push off, the story is the one transformers' generate writes with no logits processor.
    assert plain == teller.tell(image, strategy="greedy", max_new_tokens=6, tag_bias=0.0)


def test_json_carries_the_tags_the_decoder_read(tag_model, tmp_path):
    teller = Storyteller(tag_model, "cpu")
    image = teller.load_image(PHOTO)
    [tags] = picture_tags(teller.model, teller.encode([image]), storyteller.encode_whole(teller.model, [image]))
    [crop_only] = picture_tags(teller.model, teller.encode([image]))
    assert tags != crop_only  # the whole picture's view is read too
    result = run_main("generate.py", PHOTO, "--checkpoint", tag_model, "--strategy", "greedy", "--max-new-tokens", "5", "--json")
    [line] = result.stdout.splitlines()
    told = json.loads(line)
    assert [t["name"] for t in told["tags"]] == [name for name, _ in tags] and len(tags) == 3
    probs = [t["p"] for t in told["tags"]]
    assert probs == sorted(probs, reverse=True) and all(0 < p <= 1 for p in probs)
    assert probs == [round(p, 4) for _, p in tags]


def test_the_tags_read_the_whole_picture_as_well_as_the_crop(tag_model):
    teller = Storyteller(tag_model, "cpu")
    model = teller.model
    for width in [600, 20_000]:  # a panorama's square is made of a smaller copy, not 20,000 pixels wide
        wide = Image.new("RGB", (width, 100), (0, 0, 255))
        wide.paste((255, 0, 0), (0, 0, width // 30, 100))  # a red band at the left edge, which the centre crop cuts off
        for config in [model.config, dataclasses.replace(model.config, image_size=224, resize_size=256)]:  # the small preset's
            def red(image):  # red pixels left after the encoder's preprocessing (normalised: red high, blue low)
                x = dataset.image_transform(config)(image)
                return int(((x[0] > x[2] + 1)).sum())
            whole = dataset.whole_picture(wide, config)
            assert red(wide) == 0 and red(whole) > 0 and whole.size[0] == whole.size[1] <= 3 * config.resize_size
            assert dataset.image_transform(config)(whole).shape == dataset.image_transform(config)(wide).shape
    wide = Image.new("RGB", (600, 100), (0, 0, 255))
    config = model.config
    # The classifier's probabilities of the two views are averaged: the same numbers computed by hand.
    crop, full = teller.encode([wide]), storyteller.encode_whole(model, [wide])
    probs, ids = model.tag_classes(crop, full)
    by_hand = (model.tagger(crop).softmax(-1) + model.tagger(full).softmax(-1)) / 2
    assert torch.allclose(probs, by_hand.topk(config.tags).values) and torch.equal(ids, by_hand.topk(config.tags).indices)
    assert not torch.allclose(model.tag_classes(crop)[0], probs)


def test_a_class_after_the_first_is_named_only_when_sure_enough(tag_model, tmp_path):
    ckpt = torch.load(tag_model, weights_only=True)
    ckpt["config"]["tag_min_prob"] = 1.0  # no second class is that sure
    save_checkpoint(ckpt, tmp_path / "sure.pt")
    teller = Storyteller(tmp_path / "sure.pt", "cpu")
    features = teller.encode([teller.load_image(PHOTO)])
    [tags] = picture_tags(teller.model, features)
    [prompt] = tag_prompts(teller.model, teller.tokenizer, features)
    assert len(tags) == 1 and teller.tokenizer.decode(prompt) == f"Pictured: {tags[0][0]}.\n"
    ckpt["config"]["tag_min_prob"] = 2.0
    save_checkpoint(ckpt, tmp_path / "bad.pt")
    result = run_main("generate.py", PHOTO, "--checkpoint", tmp_path / "bad.pt")
    assert result.returncode == 2 and "tag_min_prob = 2.0, not a probability" in result.stderr


def test_the_web_page_shows_what_it_saw_under_the_story(tag_model):
    import app
    web = app.WebStoryteller(tag_model, "cpu")
    image = web.teller.load_image(PHOTO)
    stories, tags = web.told(image, None, "greedy", 1.0, 8, 1)
    text = web.text({"path": str(PHOTO)}, None, "greedy", 1.0, 8, 1)
    assert text == stories[0] + "\n\nWhat it saw: " + ", ".join(f"{n} ({p:.0%})" for n, p in tags)


def test_tag_use_counts_the_stories_that_name_a_tag():
    assert metrics.names_a_tag("Two cats slept.", ["tabby cat", "teapot"])  # a plural of a tag's word
    assert metrics.names_a_tag("A bird flew by.", ["red-breasted merganser (bird)"])  # its kind
    assert metrics.names_a_tag("The Boxes fell.", ["box"])  # -es, any case
    assert metrics.names_a_tag("She picked strawberries.", ["strawberry (fruit)"])  # -y -> -ies
    assert metrics.names_a_tag("Wolves howled.", ["timber wolf"]) and metrics.names_a_tag("Two knives.", ["knife"])
    assert not metrics.names_a_tag("A red hat.", ["red-breasted merganser (bird)"])  # an adjective names nothing
    assert not metrics.names_a_tag("A dog ran to the category.", ["tabby cat"])  # not a part of a word
    assert not metrics.names_a_tag("An ox.", ["ox"])  # words under 3 letters say too little
    assert metrics.tag_use(["A cat.", "A dog.", "Tea in a teapot.", "Nothing."],
                           [["tabby cat"], ["pineapple"], ["teapot"], []]) == 0.5


def test_evaluate_reports_the_tag_use_rate(tag_model, tmp_path):
    stories = tmp_path / "s.txt"
    stories.write_text("photo_cat.jpg\tA cat.\nphoto_coffee.jpg\tA cup.\n")
    out = tmp_path / "metrics.json"
    result = run_main("evaluate.py", "--checkpoint", tag_model, "--images", DATA / "images", "--stories", stories,
                      "--strategy", "greedy", "--max-new-tokens", "6", "--out", out)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    told = {name: s[0] for name, s in report["stories"].items()}
    tags = {name: [t["name"] for t in read] for name, read in report["tags"].items()}
    expected = metrics.tag_use([told[n] for n in sorted(told)], [tags[n] for n in sorted(told)])
    assert report["metrics"]["tag_use"] == expected and "tag use: stories naming a tag" in result.stdout


def test_resnet50_tags_come_from_its_own_imagenet_classifier(backbones, tmp_path):
    root, stories = backbones
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None)
    torch.save(net.state_dict(), tmp_path / "resnet50.pth")
    out = tmp_path / "r.pt"
    train.main(train_args(root, stories, out, "--decoder", root / "llama", "--freeze-decoder", "--encoder", "resnet50",
                          "--encoder-weights", tmp_path / "resnet50.pth", "--tags", "2", "--epochs", "1"))
    ckpt = torch.load(out, weights_only=True)
    assert torch.equal(ckpt["model"]["tagger.weight"], net.fc.weight) and torch.equal(ckpt["model"]["tagger.bias"], net.fc.bias)
    teller = Storyteller(out, "cpu")
    image = teller.load_image(PHOTO)
    features = teller.encode([image])
    pixels = storyteller.dataset.image_transform(teller.model.config)(image)[None]
    best = net.eval()(pixels).softmax(-1).topk(2)
    assert [n for n, _ in picture_tags(teller.model, features)[0]] == [tag_name(i) for i in best.indices[0].tolist()]


def test_prepare_writes_stories_about_the_tags_and_train_reads_them(tag_model, backbones, writer, tmp_path, monkeypatch):
    """prepare.py stories --tags: one story per picture about the tags the model's classifier reads in
    it (the writer is asked with them), kept only if it names one; train.py then learns from that file."""
    import prepare
    root, stories = backbones
    asked = []
    monkeypatch.setattr(prepare, "generate_stories", lambda model, tok, captions, args: asked.extend(captions) or
                        [f"Once there was a {c.split(', ')[0]} in the park." for c in captions])
    out = tmp_path / "tag_stories.txt"
    prepare.main(["stories", "--tags", str(tag_model), "--captions", str(stories), "--images", str(DATA / "images"),
                  "--writer", str(writer), "--out", str(out), "--device", "cpu"])
    teller = Storyteller(tag_model, "cpu")
    names = list(dict.fromkeys(line.split("\t")[0] for line in stories.read_text().splitlines() if "\t" in line))
    images = [teller.load_image(DATA / "images" / name) for name in names]
    read = picture_tags(teller.model, teller.encode(images), storyteller.encode_whole(teller.model, images))
    expected = [storyteller.tag_text([n for n, _ in tags]) for tags in read]  # as generate.py asks about them
    assert asked == expected  # one caption per picture: its tags, in the order the stories file names them
    lines = [line.split("\t") for line in out.read_text().splitlines() if not line.startswith("#")]
    assert [name for name, _ in lines] == names
    assert all(story == f"Once there was a {tags.split(', ')[0]} in the park." for (_, story), tags in zip(lines, expected))
    model = tmp_path / "m.pt"
    train.main(train_args(root, stories, model, "--tag-stories", out, "--decoder", root / "llama", "--freeze-decoder",
                          "--encoder", "timm:test_efficientnet", "--encoder-weights", root / "effnet.pth", "--tags", "3",
                          "--epochs", "1"))
    import hashlib
    import dataset
    examples = dataset.read_examples(stories, DATA / "images") + dataset.read_examples(out, DATA / "images")
    trained_on = hashlib.sha256(repr([(ex.image, ex.story, ex.style) for ex in examples]).encode()).hexdigest()[:16]
    assert torch.load(model, weights_only=True)["train"]["data"] == trained_on  # both files' stories, in that order


def test_a_missing_tag_stories_file_is_one_line_and_nothing_is_written(backbones, tmp_path):
    from cli import UserError
    root, stories = backbones
    with pytest.raises(UserError, match="none.txt: --tag-stories file not found; write it with prepare.py stories --tags"):
        train.main(train_args(root, stories, tmp_path / "m.pt", "--tag-stories", tmp_path / "none.txt", "--decoder",
                              root / "llama", "--freeze-decoder", "--encoder", "timm:test_efficientnet",
                              "--encoder-weights", root / "effnet.pth", "--tags", "3"))
    assert list(tmp_path.iterdir()) == []


def test_the_small_preset_trains_on_the_sample_tag_stories(monkeypatch):
    """data/tag_stories.txt: the sample pictures told from their tags, the small preset's stories on the
    sample pictures where its tags are read; anywhere else the stories are the hand-written ones or --stories."""
    import dataset
    monkeypatch.setattr(train.backbones, "local_weights", lambda decoder, encoder, weights: (decoder, weights))  # no weights/
    args = train.parse_args(["--preset", "small"])
    assert (args.stories, args.tag_stories) == ("data/tag_stories.txt", None)
    told = {ex.image for ex in dataset.read_examples(DATA / "tag_stories.txt", DATA / "images")}
    assert len(told) >= 40 and told <= {ex.image for ex in dataset.read_examples(DATA / "stories.txt", DATA / "images")}
    assert train.parse_args(["--preset", "small", "--stories", "mine.txt"]).stories == "mine.txt"
    assert train.parse_args(["--preset", "small", "--stories", "data/stories.txt"]).stories == "data/stories.txt"
    assert train.parse_args(["--preset", "small", "--tags", "0"]).stories == "data/stories.txt"
    assert train.parse_args(["--preset", "small", "--images", "mine/"]).stories == "data/stories.txt"
    assert train.parse_args([]).stories == train.parse_args(["--preset", "tiny"]).stories == "data/stories.txt"
    assert train.parse_args(["--tag-stories", "t.txt"]).tag_stories == "t.txt"  # gpt2 tags too
    with pytest.raises(SystemExit):
        train.parse_args(["--tags", "0", "--tag-stories", "t.txt"])  # stories about tags that are not read


def test_prepare_stories_tags_needs_a_model_with_tags(tmp_path, tiny_checkpoint):
    captions = tmp_path / "s.txt"
    captions.write_text("photo_cat.jpg\tA cat.\n")
    result = run_main("prepare.py", "stories", "--tags", tiny_checkpoint, "--captions", captions, "--images",
                      DATA / "images", "--out", tmp_path / "o.txt")
    assert result.returncode == 2 and "this model was trained without tags" in result.stderr
    assert not (tmp_path / "o.txt").exists()
    result = run_main("prepare.py", "stories", "--tags", tiny_checkpoint, "--captions", captions, "--out", tmp_path / "o.txt")
    assert result.returncode == 2 and "--tags: pass --images" in result.stderr


def test_the_presets_tag_where_a_frozen_imagenet_classifier_can():
    assert train.parse_args([]).tags == 3  # gpt2: ResNet-50's own classifier
    assert train.parse_args(["--encoder", "clip-vit-b32"]).tags == 0  # CLIP has no ImageNet classifier
    assert train.parse_args(["--train-encoder"]).tags == 0  # a classifier of features that change reads nothing
    assert train.parse_args(["--no-feature-cache"]).tags == 0  # tags are read from the cached features
    assert train.parse_args(["--tags", "0"]).tags == 0 and train.parse_args(["--preset", "tiny"]).tags == 0
    with pytest.raises(SystemExit):
        train.parse_args(["--encoder", "clip-vit-b32", "--tags", "2"])  # asked for, and impossible: refused
