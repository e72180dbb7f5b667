"""evaluate.py on album lines (a.png|b.png<TAB>story) and with --length, on tiny models trained on the
synthetic albums and lengths of tests/shapes.py: every metric is computed per album, and the reference
loss is the model's own loss on the album's features and story."""
import json
import math

import pytest
import torch
from PIL import Image

import dataset
from conftest import run_main, write_stories
from shapes import make_albums, make_lengths, sentences
from storyteller import Storyteller, encode_albums


@pytest.fixture(scope="module")
def album_model(album_checkpoint, tmp_path_factory):
    """The tiny model trained on albums of two or three shapes; and a stories file of 12 albums it never
    saw, of one, two or three pictures, with their images folder."""
    root = tmp_path_factory.mktemp("eval_albums")
    make_albums(root / "test", 12, seed=1, sizes=(1, 2, 3))
    return album_checkpoint, root / "test"


def reference_loss(checkpoint, images, examples, length_ids=None):
    """Token-weighted loss of each story alone, through the model's forward on its album's features."""
    teller = Storyteller(checkpoint, "cpu")
    model, tokenizer = teller.model, teller.tokenizer
    total, tokens = 0.0, 0
    for k, ex in enumerate(examples):
        pictures = [[dataset.load_image(images / n, model.config.resize_size) for n in ex.images]]
        features, album_mask = encode_albums(model, pictures)
        ids = tokenizer(ex.story, add_special_tokens=False)["input_ids"][:teller.room - 1] + [tokenizer.eos_token_id]
        ids = torch.tensor([ids])
        with torch.no_grad():
            loss = model(ids, torch.ones_like(ids), features=features, album_mask=album_mask,
                         length_ids=None if length_ids is None else torch.tensor([length_ids[k]])).loss
        total, tokens = total + loss.item() * ids.shape[1], tokens + ids.shape[1]
    return total / tokens


def test_evaluate_scores_albums_as_wholes(album_model, tmp_path):
    checkpoint, test = album_model
    stories = test / "stories.txt"
    out, sheet = tmp_path / "metrics.json", tmp_path / "sheet.png"
    # --batch-size 5: batches mix albums of one, two and three pictures, padded.
    done = run_main("evaluate.py", "--checkpoint", checkpoint, "--images", test / "images", "--stories", stories,
                    "--strategy", "greedy", "--batch-size", "5", "--out", out, "--sheet", sheet,
                    "--clip", tmp_path / "no-clip-here", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "reference loss per token" in done.stdout and "consistency recall@1" in done.stdout
    report = json.loads(out.read_text())
    examples = dataset.read_examples(stories, test / "images")
    assert list(report["stories"]) == [ex.image for ex in examples]  # keyed by the album field, in file order
    assert any(len(ex.images) == 1 for ex in examples) and any(len(ex.images) == 3 for ex in examples)
    albums = sum(len(ex.images) > 1 for ex in examples)  # an album of one is an image
    assert f"{albums} of the 12 items are albums: one story each" in " ".join(report["notes"])

    m = report["metrics"]
    assert m["reference_loss"] == pytest.approx(reference_loss(checkpoint, test / "images", examples), abs=1e-4)
    assert m["perplexity"] == pytest.approx(math.exp(m["reference_loss"]))
    # The stories told are those Storyteller tells each album alone.
    teller = Storyteller(checkpoint, "cpu")
    for ex in examples[:4]:
        told = teller.tell([str(test / "images" / n) for n in ex.images], album=True, strategy="greedy")
        assert report["stories"][ex.image] == [told]
    # Unseen albums: each ranks its own story among the 12, well above chance (1/12).
    assert m["consistency_candidates"] == 12 and m["consistency_recall_at_1"] >= 0.5, m
    assert m["bleu4"] > 20, m

    image = Image.open(sheet)  # 12 albums: 3 rows of 4, each a strip of its pictures
    assert image.format == "PNG" and image.width == 1200 and image.height > 3 * 250


def test_an_album_longer_than_the_model_learned_names_its_line(album_model, tmp_path):
    checkpoint, test = album_model
    names = sorted(p.name for p in (test / "images").glob("*.png"))
    stories = write_stories(tmp_path / "s.txt", [f"{names[0]}\tFirst a thing.",
                                                 "|".join(names[:4]) + "\tFirst a thing. Last a thing."])
    done = run_main("evaluate.py", "--checkpoint", checkpoint, "--images", test / "images", "--stories", stories,
                    "--out", tmp_path / "m.json", "--device", "cpu")
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: {stories}:2: an album of 4 images: this model learned albums of at most 3 ")
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "m.json").exists()


def test_length_on_a_model_without_length_control_is_one_line(album_model, tmp_path):
    checkpoint, test = album_model
    done = run_main("evaluate.py", "--checkpoint", checkpoint, "--images", test / "images", "--stories",
                    test / "stories.txt", "--length", "short", "--out", tmp_path / "m.json", "--device", "cpu")
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: --length short: this model was trained without length control "
                                   "(train.py --length-control)")
    assert not (tmp_path / "m.json").exists()


def test_length_sets_the_stories_told_not_how_the_references_are_scored(length_checkpoint, tmp_path):
    root = tmp_path
    make_lengths(root / "test", 12, seed=1)
    checkpoint = length_checkpoint
    reports = {}
    for length in ("short", "long"):
        out = tmp_path / f"{length}.json"
        done = run_main("evaluate.py", "--checkpoint", checkpoint, "--images", root / "test" / "images", "--stories",
                        root / "test" / "stories.txt", "--strategy", "greedy", "--length", length, "--out", out,
                        "--rank-images", "0", "--clip", tmp_path / "no-clip", "--device", "cpu")
        assert done.returncode == 0, done.stderr
        reports[length] = json.loads(out.read_text())
    short, long = ([s for [s] in reports[k]["stories"].values()] for k in ("short", "long"))
    assert sum(sentences(s) == 1 for s in short) >= 9 and sum(sentences(s) == 3 for s in long) >= 9, (short, long)
    assert reports["long"]["settings"]["length"] == "long"
    # Each reference story is scored with the length bucket of its own token count, whatever --length asks.
    loss = reports["short"]["metrics"]["reference_loss"]
    assert reports["long"]["metrics"]["reference_loss"] == loss
    examples = dataset.read_examples(root / "test" / "stories.txt", root / "test" / "images")
    teller = Storyteller(checkpoint, "cpu")
    buckets = [teller.model.config.length_bucket(len(teller.tokenizer(ex.story, add_special_tokens=False)["input_ids"])) for ex in examples]
    assert len(set(buckets)) == 3
    assert loss == pytest.approx(reference_loss(checkpoint, root / "test" / "images", examples, buckets), abs=1e-4)
    assert loss < reference_loss(checkpoint, root / "test" / "images", examples, [2 - b for b in buckets])
