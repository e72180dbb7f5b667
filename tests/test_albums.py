"""Album stories (one story told across several pictures, in order) and length control, each learned
by a tiny model from synthetic data where only the pictures (or the asked length) can decide the words."""
import json
from pathlib import Path

import pytest
import torch

import dataset
from conftest import run_main
from cli import UserError
from shapes import COLOURS, album_words, make_albums, make_lengths, sentences
from storyteller import Storyteller


@pytest.fixture(scope="module")
def albums(album_checkpoint, tmp_path_factory):
    """The tiny model trained on 160 albums of two or three shapes; and 30 albums it never saw."""
    root = tmp_path_factory.mktemp("unseen_albums")
    unseen = make_albums(root / "test", 30, seed=1)
    out = album_checkpoint
    return out, [([str(root / "test" / "images" / n) for n in names], pictures) for names, pictures in unseen]


def test_the_feature_cache_holds_each_picture_once(albums):
    """An album costs no more than its pictures: the cache has one entry per picture (by its bytes:
    two identical drawings are one), not per album."""
    checkpoint, _ = albums
    [folder] = (checkpoint.parent / ".cache" / "features").iterdir()
    pictures = {dataset.FeatureCache.key(p) for p in (checkpoint.parent / "train" / "images").glob("*.png")}
    assert {p.stem for p in folder.glob("*.pt")} == pictures and len(pictures) > 160  # 160 albums of 2 or 3


def colours_in_place(told, pictures) -> float:
    """Share of the pictures whose colour the story names in the picture's place."""
    named = album_words(told)
    return sum(i < len(named) and named[i][0] == colour for i, (colour, _) in enumerate(pictures)) / len(pictures)


def test_unseen_albums_get_each_pictures_words_in_order(albums):
    checkpoint, unseen = albums
    assert torch.load(checkpoint, weights_only=True)["config"]["album_slots"] == 3
    teller = Storyteller(checkpoint, "cpu")
    told = [teller.tell(paths, album=True, strategy="greedy") for paths, _ in unseen]
    right = sum(colours_in_place(t, pictures) for t, (_, pictures) in zip(told, unseen)) / len(unseen)
    assert right >= 3 / len(COLOURS), told  # chance: 1/5 of the pictures
    # Swapping the pictures swaps the words: each album told backwards names its colours backwards.
    backwards = [teller.tell(paths[::-1], album=True, strategy="greedy") for paths, _ in unseen]
    right = sum(colours_in_place(t, pictures[::-1]) for t, (_, pictures) in zip(backwards, unseen)) / len(unseen)
    assert right >= 3 / len(COLOURS), backwards


def test_a_mixed_batch_tells_each_album_as_it_would_alone(albums):
    """Albums of 1, 2 and 3 pictures in one padded batch get the stories they get one at a time."""
    checkpoint, unseen = albums
    teller = Storyteller(checkpoint, "cpu")
    items = [unseen[0][0][:1], unseen[1][0][:2], unseen[2][0][:3], unseen[3][0][:2]]
    alone = [teller.tell(paths, album=True, strategy="greedy") for paths in items]
    pictures = [[teller.load_image(p) for p in paths] for paths in items]
    together = [s for [s] in teller.stories(pictures, teller.settings(strategy="greedy"))]
    assert together == alone


def test_generate_tells_albums_from_the_command_line_and_from_lists(albums, tmp_path):
    checkpoint, unseen = albums
    paths = unseen[0][0]
    done = run_main("generate.py", "--album", *paths, "--checkpoint", checkpoint, "--strategy", "greedy", "--json",
                    "--device", "cpu")
    assert done.returncode == 0, done.stderr
    [record] = [json.loads(line) for line in done.stdout.splitlines()]
    assert record["images"] == paths and record["story"] == Storyteller(checkpoint, "cpu").tell(
        paths, album=True, strategy="greedy")
    # A list whose lines name albums: one story per line, batched.
    listing = tmp_path / "albums.txt"
    folder = Path(paths[0]).parent
    listing.write_text("".join("|".join(Path(n).name for n in p) + "\n" for p, _ in unseen[:5]))
    done = run_main("generate.py", listing, "--images", folder, "--checkpoint", checkpoint, "--strategy", "greedy",
                    "--json", "--batch-size", "2", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["images"] for r in records] == [p for p, _ in unseen[:5]]
    # Longer albums than the model learned are refused in one line, before any image is read.
    done = run_main("generate.py", "--album", *paths, *paths, "--checkpoint", checkpoint, "--device", "cpu")
    assert done.returncode == 2 and "this model learned albums of at most 3 images" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def lengths(length_checkpoint, tmp_path_factory):
    """The tiny model trained with --length-control on stories of 1, 2 or 3 sentences; unseen images."""
    root = tmp_path_factory.mktemp("unseen_lengths")
    make_lengths(root / "test", 20, seed=1)
    out = length_checkpoint
    return out, sorted(str(p) for p in (root / "test" / "images").glob("*.png"))


def test_length_short_and_long_give_one_and_three_sentences(lengths):
    checkpoint, images = lengths
    config = torch.load(checkpoint, weights_only=True)["config"]
    assert len(config["length_buckets"]) == 2
    teller = Storyteller(checkpoint, "cpu")
    short = teller.tell(images, length="short", strategy="greedy")
    long = teller.tell(images, length="long", strategy="greedy")
    assert sum(sentences(s) == 1 for s in short) >= 0.8 * len(images), short  # chance: a third
    assert sum(sentences(s) == 3 for s in long) >= 0.8 * len(images), long


def test_a_model_without_length_control_says_so(albums):
    checkpoint, unseen = albums
    done = run_main("generate.py", unseen[0][0][0], "--length", "short", "--checkpoint", checkpoint, "--device", "cpu")
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: --length short: this model was trained without length control "
                                   "(train.py --length-control)")


def test_length_thirds_splits_at_a_third_and_two_thirds_or_says_it_cannot():
    from train import length_thirds
    by_words = lambda texts, **kw: {"input_ids": [t.split() for t in texts]}  # a token per word
    stories = lambda *lengths: [dataset.Example("a.jpg", " ".join(["word"] * n), i) for i, n in enumerate(lengths)]
    assert length_thirds(stories(*range(1, 10)), by_words) == [3, 6]
    assert length_thirds(stories(2, 2, 2, 5, 5, 9, 9, 9, 9), by_words) == [2, 5]
    for lengths, told in [((5,) * 6, "5 to 5"), ((2, 2, 2, 5, 5, 5), "2 to 5")]:  # one group, two groups
        with pytest.raises(UserError, match=rf"^--length-control: the stories' lengths \({told} tokens\) do not split "
                                            rf"into three groups; give --length-buckets SHORT,MEDIUM, or train "):
            length_thirds(stories(*lengths), by_words)


def test_length_buckets_takes_two_increasing_token_counts(capsys):
    from train import parse_args
    args = parse_args(["--preset", "tiny", "--length-buckets", "20,40"])
    assert args.length_buckets == [20, 40] and args.length_control  # the buckets ask for length control
    assert parse_args(["--preset", "tiny"]).length_buckets is None
    for bad in ["40,20", "20,20", "0,5", "20", "20,40,60", "short,long", ""]:
        with pytest.raises(SystemExit) as stop:
            parse_args(["--preset", "tiny", "--length-buckets", bad])
        assert stop.value.code == 2
        assert (f"argument --length-buckets: expected two increasing token counts such as 20,40, got {bad!r}"
                in capsys.readouterr().err), bad
