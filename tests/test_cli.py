"""End to end as a user runs it: train.py --preset tiny on the sample data, then generate.py."""
import json
import re
from pathlib import Path

import torch

from conftest import DATA, run_main, run_script

THINGS = ["house", "tree", "boat", "balloon"]


def test_checkpoint_describes_itself_and_loads_safely(tiny_checkpoint):
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["config"]["encoder"] == "resnet-tiny" and ckpt["config"]["prefix_length"] == 10
    assert ckpt["sources"] == {"encoder": None, "decoder": None}  # random weights: all stored
    assert any(k.startswith("mapper.") for k in ckpt["model"])
    assert ckpt["train"]["step"] > 0 and "optimizer" in ckpt["train"]
    assert isinstance(ckpt["tokenizer"], str)


def test_the_picture_decides_the_story(tiny_checkpoint):
    """Greedy stories for every drawn sample scene name the object drawn in it, and differ between images."""
    images = sorted(p for p in (DATA / "images").glob("*.jpg") if any(t in p.stem for t in THINGS))
    out = {}
    for record in generate_json(tiny_checkpoint, images):
        out[record["image"]] = record["story"]
    assert len(out) == len(images)
    right = sum(THINGS[[t in p for t in THINGS].index(True)] in out[p] for p in out)
    assert right >= 0.8 * len(images), out
    assert len(set(out.values())) >= len(images) // 2  # not one story for every picture


def test_the_real_photos_get_their_own_stories(tiny_checkpoint):
    """Each sample photo has two stories of its own: greedy decoding starts like one of them."""
    own = {}
    for line in (DATA / "stories.txt").read_text().splitlines():
        if line.startswith("photo_"):
            name, story = line.split("\t")
            own.setdefault(name, []).append(story.split()[:3])
    photos = [DATA / "images" / name for name in sorted(own)]
    records = generate_json(tiny_checkpoint, photos)
    right = [r["story"].split()[:3] in own[Path(r["image"]).name] for r in records]
    assert len(photos) == 10 and sum(right) >= 8, records


def generate_json(checkpoint, images, *extra):
    result = run_main("generate.py", *images, "--checkpoint", checkpoint, "--strategy", "greedy", "--json", *extra)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_generate_prints_the_story(tiny_checkpoint):
    image = DATA / "images" / "night_sea_boat.jpg"
    result = run_script("generate.py", image, "--checkpoint", tiny_checkpoint, "--seed", "0")  # sampled: seeded
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "Generated Story:" and len(lines[1].split()) >= 5


def test_several_images_stories_each_headed_by_its_image_and_bad_ones_named(tiny_checkpoint, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_text("not a picture")
    good = [DATA / "images" / "day_grass_house.jpg", DATA / "images" / "night_sea_boat.jpg"]
    result = run_main("generate.py", good[0], bad, good[1], "--checkpoint", tiny_checkpoint,
                      "--strategy", "sample", "--num-stories", "2", "--seed", "3")
    assert result.returncode == 2
    assert str(bad) in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    for image in good:
        assert f"== {image} ==" in result.stdout
    assert len(re.findall(r"^Generated Story [12]/2:$", result.stdout, flags=re.M)) == 4


def test_sampling_with_a_seed_repeats(tiny_checkpoint):
    image = DATA / "images" / "sunset_sand_house.jpg"
    runs = [generate_json(tiny_checkpoint, [image], "--strategy", "sample", "--seed", "7", "--num-stories", "3")
            for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 3


def test_missing_checkpoint_says_how_to_train_one(tmp_path):
    result = run_main("generate.py", DATA / "images" / "day_grass_tree.jpg", "--checkpoint", tmp_path / "none.pt")
    assert result.returncode == 2 and "python train.py" in result.stderr
    assert "Traceback" not in result.stderr


def test_greedy_refuses_several_stories():
    result = run_main("generate.py", "x.jpg", "--strategy", "greedy", "--num-stories", "2")
    assert result.returncode == 2 and "--num-stories" in result.stderr


def test_training_is_repeatable_with_a_seed(tmp_path):
    import train
    stories = tmp_path / "s.txt"
    stories.write_text("".join(line + "\n" for line in (DATA / "stories.txt").read_text().splitlines()[1:9]))
    weights = []
    for run in range(2):
        out = tmp_path / f"m{run}.pt"
        train.main(["--preset", "tiny", "--images", str(DATA / "images"), "--stories", str(stories),
                    "--epochs", "2", "--seed", "5", "--out", str(out), "--device", "cpu"])
        weights.append(torch.load(out, weights_only=True)["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_bad_data_is_reported_before_training_and_nothing_is_written(tmp_path):
    stories = tmp_path / "s.txt"
    stories.write_text("day_grass_tree.jpg\tFine.\nmissing.jpg\tGone.\nno tab\n")
    out = tmp_path / "m.pt"
    result = run_main("train.py", "--preset", "tiny", "--images", DATA / "images", "--stories", stories, "--out", out)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{stories}:2:" in result.stderr and f"{stories}:3:" in result.stderr
    assert not out.exists()
