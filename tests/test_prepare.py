"""prepare.py on tiny files in the exact upstream formats, written here: each conversion gives a
stories file that dataset.py reads without a problem, one line per caption, with the split kept."""
import json

import pytest

import prepare
from dataset import parse_stories
from cli import DataError, UserError, run_cli


def convert(*argv):
    prepare.main([str(a) for a in argv])
    out = argv[argv.index("--out") + 1]
    examples, problems = parse_stories(out)
    assert problems == []
    return [(ex.image, ex.story) for ex in examples]


def test_coco_captions_json(tmp_path):
    captions = {
        "info": {"description": "COCO 2017 Dataset"}, "licenses": [],
        "images": [{"license": 3, "file_name": "000000000139.jpg", "height": 426, "width": 640, "id": 139},
                   {"license": 1, "file_name": "000000000285.jpg", "height": 640, "width": 586, "id": 285}],
        "annotations": [{"image_id": 285, "id": 7, "caption": "A big burly grizzly bear is show with grass in the background."},
                        {"image_id": 139, "id": 12, "caption": "A woman stands in the dining area\tat the table.\n"},
                        {"image_id": 139, "id": 3, "caption": "A room with chairs,\r\na table, and a woman in it."},
                        {"image_id": 285, "id": 9, "caption": "   "}],
    }
    (tmp_path / "captions_val2017.json").write_text(json.dumps(captions))
    assert convert("coco", tmp_path / "captions_val2017.json", "--out", tmp_path / "s.txt") == [
        ("000000000139.jpg", "A room with chairs, a table, and a woman in it."),  # tab and line breaks become spaces
        ("000000000139.jpg", "A woman stands in the dining area at the table."),
        ("000000000285.jpg", "A big burly grizzly bear is show with grass in the background."),
    ]  # grouped by image, in annotation order; the blank caption is dropped


def test_karpathy_split_keeps_the_split_and_counts_restval_as_train(tmp_path):
    def image(split, cocoid, raw):
        return {"filepath": "val2014", "sentids": [cocoid], "filename": f"COCO_val2014_{cocoid:012d}.jpg", "imgid": cocoid,
                "split": split, "sentences": [{"tokens": raw.lower().rstrip(".").split(), "raw": raw, "imgid": cocoid,
                                               "sentid": cocoid}], "cocoid": cocoid}
    data = {"images": [image("train", 1, "A train."), image("restval", 2, "A restval."), image("val", 3, "A val."),
                       image("test", 4, "A test.")], "dataset": "coco"}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    assert convert("karpathy", tmp_path / "dataset_coco.json", "--split", "train", "--out", tmp_path / "t.txt") == [
        ("val2014/COCO_val2014_000000000001.jpg", "A train."), ("val2014/COCO_val2014_000000000002.jpg", "A restval.")]
    assert convert("karpathy", tmp_path / "dataset_coco.json", "--split", "test", "--out", tmp_path / "u.txt") == [
        ("val2014/COCO_val2014_000000000004.jpg", "A test.")]


def test_flickr8k_token_file_with_its_split_list_and_images_folder(tmp_path):
    (tmp_path / "Flickr8k.token.txt").write_text(
        "1000268201_693b08cb0e.jpg#0\tA child in a pink dress is climbing up a set of stairs in an entry way .\n"
        "1000268201_693b08cb0e.jpg#1\tA girl going into a wooden building .\n"
        "1001773457_577c3a7d70.jpg#0\tA black dog and a spotted dog are fighting\n"
        "2258277193_586949ec62.jpg.1#0\tA person rides a bike , and smiles .\n")  # an upstream name with no image
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("1000268201_693b08cb0e.jpg\n2258277193_586949ec62.jpg.1\n")
    images = tmp_path / "Flicker8k_Dataset"
    images.mkdir()
    (images / "1000268201_693b08cb0e.jpg").write_bytes(b"")
    (images / "1001773457_577c3a7d70.jpg").write_bytes(b"")
    assert convert("flickr", tmp_path / "Flickr8k.token.txt", "--split-list", tmp_path / "Flickr_8k.trainImages.txt",
                   "--images", images, "--out", tmp_path / "train.txt") == [
        ("1000268201_693b08cb0e.jpg", "A child in a pink dress is climbing up a set of stairs in an entry way."),
        ("1000268201_693b08cb0e.jpg", "A girl going into a wooden building."),
    ]  # the other image is in another split; the .jpg.1 name has no image in the folder


def test_flickr30k_results_csv_and_kaggle_captions_txt(tmp_path):
    (tmp_path / "results.csv").write_text(
        "image_name| comment_number| comment\n"
        "1000092795.jpg| 0| Two young guys with shaggy hair look at their hands while hanging out in the yard .\n"
        "1000092795.jpg| 1| Two young , White males are outside near many bushes .\n"
        "2199200615.jpg| 4   A dog runs across the grass .\n")  # upstream's one row with a '|' missing
    assert convert("flickr", tmp_path / "results.csv", "--out", tmp_path / "a.txt") == [
        ("1000092795.jpg", "Two young guys with shaggy hair look at their hands while hanging out in the yard."),
        ("1000092795.jpg", "Two young, White males are outside near many bushes."),
        ("2199200615.jpg", "A dog runs across the grass.")]
    (tmp_path / "captions.txt").write_text(
        "image,caption\n1000268201_693b08cb0e.jpg,A child in a pink dress is climbing up a set of stairs in an entry way .\n"
        '1001773457_577c3a7d70.jpg,"A black dog and a white dog with brown spots are staring at each other , in the street ."\n')
    assert convert("flickr", tmp_path / "captions.txt", "--out", tmp_path / "b.txt")[1] == (
        "1001773457_577c3a7d70.jpg", "A black dog and a white dog with brown spots are staring at each other, in the street.")


def vist_file(path):
    """Two stories as the SIS files hold them: each annotation a list of one storylet, in any order."""
    def storylet(story, photo, order, text):
        return [{"original_text": text, "album_id": "72157605930515606", "photo_flickr_id": photo, "setting": "last-story-type",
                 "worker_id": "AXEHUHQOCVB6HZ", "story_id": story, "tier": "story-in-sequence",
                 "worker_arranged_photo_order": order, "text": text.lower(), "storylet_id": f"{story}{order}"}]
    story_a = [("111", "We went to the lake."), ("112", "The water was cold."), ("113", "Dad caught a fish."),
               ("114", "We cooked it."), ("115", "What a day!")]
    annotations = [storylet("45530", p, k, t) for k, (p, t) in enumerate(story_a)]
    annotations = annotations[2:] + annotations[:2]  # the order in the file is not the story's order
    annotations += [storylet("45531", p, k, f"Story two, part {k}.") for k, p in enumerate(["115", "111", "112", "113", "114"])]
    annotations += [storylet("45532", p, k, f"Story three, part {k}.") for k, p in enumerate(["111", "116", "112", "113", "114"])]
    path.write_text(json.dumps({"images": [], "info": {}, "albums": [], "type_list": [], "annotations": annotations}))
    return path


def test_vist_one_story_per_album_or_a_sentence_per_image(tmp_path, capsys):
    sis = vist_file(tmp_path / "val.story-in-sequence.json")
    images = tmp_path / "val"
    images.mkdir()
    for photo in ("111.jpg", "112.jpg", "113.jpg", "114.jpg", "115.png"):  # some VIST photos are not JPEG
        (images / photo).write_bytes(b"")
    assert convert("vist", sis, "--per", "sequence", "--images", images, "--out", tmp_path / "seq.txt") == [
        ("111.jpg|112.jpg|113.jpg|114.jpg|115.png",
         "We went to the lake. The water was cold. Dad caught a fish. We cooked it. What a day!"),
        ("115.png|111.jpg|112.jpg|113.jpg|114.jpg",
         "Story two, part 0. Story two, part 1. Story two, part 2. Story two, part 3. Story two, part 4."),
    ]  # each story goes with its album of five photos, in the worker's order; story three lacks 116.jpg
    assert "skipped 1 story whose album has photos not in" in capsys.readouterr().out
    examples, _ = parse_stories(tmp_path / "seq.txt")
    assert [len(ex.images) for ex in examples] == [5, 5]  # train.py reads each line as an album of 5
    per_image = convert("vist", sis, "--per", "image", "--out", tmp_path / "img.txt")
    assert len(per_image) == 15 and per_image[:2] == [("111.jpg", "We went to the lake."), ("112.jpg", "The water was cold.")]


def test_bad_files_are_named_and_nothing_is_written(tmp_path, capsys):
    (tmp_path / "bad.json").write_text('{"images": [')
    out = tmp_path / "s.txt"
    with pytest.raises(SystemExit) as exit_code:  # as `python prepare.py coco bad.json` ends
        run_cli(lambda: prepare.main(["coco", str(tmp_path / "bad.json"), "--out", str(out)]))
    assert exit_code.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"error: {tmp_path / 'bad.json'}: not valid JSON (line 1") and len(stderr.splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "bad.json"]  # no temporary file left

    (tmp_path / "instances.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                                         "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1]}]}))
    with pytest.raises(UserError, match="not a COCO captions file"):
        prepare.main(["coco", str(tmp_path / "instances.json"), "--out", str(out)])
    (tmp_path / "t.txt").write_text("a.jpg#0\tfine\nno tab here\nb.jpg\tno number\n")
    with pytest.raises(DataError) as err:
        prepare.main(["flickr", str(tmp_path / "t.txt"), "--out", str(out)])
    assert [p.split(": ")[0] for p in err.value.problems] == [f"{tmp_path / 't.txt'}:2", f"{tmp_path / 't.txt'}:3"]
    assert not out.exists()
    (tmp_path / "latin1.txt").write_bytes("a.jpg#0\tcafé au lait .\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.txt: not UTF-8 text \(byte \d+\); expected a Flickr8k/30k caption file"):
        prepare.main(["flickr", str(tmp_path / "latin1.txt"), "--out", str(out)])
    assert not out.exists()
