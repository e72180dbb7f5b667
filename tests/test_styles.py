"""Story styles: a third column in stories.txt trains a style control that generate.py --style obeys."""
import json

import pytest
import torch

import dataset
import generate
import train
from shapes import STYLES, make_shapes
from checkpoint import load_checkpoint, load_model
from cli import run_cli
from storyteller import story_room

FIRST_WORDS = {None: "A", "grand": "Behold,", "noir": "The"}  # how each style's stories begin


@pytest.fixture(scope="module")
def styled(tmp_path_factory):
    """A tiny model trained on shapes told plainly (no style) and in two styles; and unseen images."""
    root = tmp_path_factory.mktemp("styled")
    make_shapes(root / "train", 40, seed=0, styles=True)
    make_shapes(root / "test", 6, seed=1)  # plain stories only
    out = root / "m.pt"
    train.main(["--preset", "tiny", "--images", str(root / "train" / "images"), "--stories", str(root / "train" / "stories.txt"),
                "--epochs", "3", "--no-train-encoder", "--val-split", "0", "--out", str(out), "--device", "cpu"])
    return out, sorted((root / "test" / "images").glob("*.png"))


def run_generate(argv, capsys):
    """generate.py's main as the command line runs it: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as code:
        run_cli(lambda: generate.main(argv))
    out, err = capsys.readouterr()
    return code.value.code, out, err


def test_generation_follows_the_asked_style_on_unseen_images(styled, capsys):
    checkpoint, images = styled
    assert torch.load(checkpoint, weights_only=True)["config"]["styles"] == sorted(STYLES)
    for style, first in FIRST_WORDS.items():
        argv = [*map(str, images), "--checkpoint", str(checkpoint), "--strategy", "greedy", "--json", "--device", "cpu"]
        code, out, err = run_generate(argv + (["--style", style] if style else []), capsys)
        assert code == 0, err
        stories = [json.loads(line)["story"] for line in out.splitlines()]
        assert len(stories) == len(images)
        assert all(s.split()[0] == first for s in stories), (style, stories)


def test_the_web_app_offers_the_styles_and_follows_them(styled):
    import app  # here: gradio takes seconds to import
    checkpoint, images = styled
    teller = app.WebStoryteller(checkpoint, device="cpu")
    assert teller.styles == sorted(STYLES)
    image = dataset.load_image(images[0])
    for style, first in FIRST_WORDS.items():
        [story] = teller.stories(image, style, strategy="greedy")
        assert story.split()[0] == first, (style, story)


def test_an_unknown_style_is_refused_with_the_known_ones(styled, capsys):
    checkpoint, images = styled
    code, out, err = run_generate([str(images[0]), "--checkpoint", str(checkpoint), "--style", "funny"], capsys)
    assert code == 2 and not out
    assert err == "error: --style funny: unknown style 'funny'; this model knows: grand, noir\n"


def test_a_model_trained_without_styles_says_it_has_none(tiny_checkpoint, capsys):
    code, out, err = run_generate(["x.jpg", "--checkpoint", str(tiny_checkpoint), "--style", "noir"], capsys)
    assert code == 2 and not out
    assert len(err.splitlines()) == 1 and "trained without styles" in err


def test_evaluate_scores_a_model_with_styles(styled, tmp_path):
    """The style position shifts the story by one: evaluate.py's reference loss is the model's own
    loss on those stories (without a style), as train.py computes it."""
    import evaluate
    checkpoint, images = styled
    images_dir, stories = images[0].parent, images[0].parent.parent / "stories.txt"
    report = tmp_path / "eval.json"
    evaluate.main(["--checkpoint", str(checkpoint), "--images", str(images_dir), "--stories", str(stories),
                   "--strategy", "greedy", "--out", str(report), "--device", "cpu"])
    result = json.loads(report.read_text())
    assert any("styles grand, noir" in note for note in result["notes"])

    model, tokenizer = load_model(load_checkpoint(checkpoint))
    data = dataset.StoryDataset(dataset.read_examples(stories, images_dir), images_dir, tokenizer,
                                dataset.image_transform(model.config), story_room(model),
                                style_id=model.config.style_id)
    with torch.no_grad():
        loss = model.eval()(**dataset.collate([data[i] for i in range(len(data))], tokenizer.pad_token_id)).loss
    assert result["metrics"]["reference_loss"] == pytest.approx(loss.item(), abs=1e-4)


def test_evaluate_writes_in_the_asked_style(styled, tmp_path):
    import evaluate
    checkpoint, images = styled
    images_dir, stories = images[0].parent, images[0].parent.parent / "stories.txt"
    report = tmp_path / "eval.json"
    evaluate.main(["--checkpoint", str(checkpoint), "--images", str(images_dir), "--stories", str(stories),
                   "--strategy", "greedy", "--style", "noir", "--rank-images", "0", "--out", str(report),
                   "--device", "cpu"])
    result = json.loads(report.read_text())
    assert any("in the style noir" in note for note in result["notes"])
    written = [story for [story] in result["stories"].values()]
    assert len(written) == len(images) and all(s.split()[0] == FIRST_WORDS["noir"] for s in written), written
