"""stories.txt parsing and image loading: the formats users really have, and clear errors."""
import io

import numpy as np
import pytest
from PIL import Image

import dataset
from conftest import DATA, write_stories
from cli import DataError, UserError


def test_reads_bom_crlf_comments_blank_lines_several_stories_and_styles(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_bytes("\ufeff# a comment\r\na.jpg\tOnce upon a time.\r\n\r\na.jpg\tAnother one.\tnoir\r\n"
                     "sub/b.png\tA third, with ünïcödé.\r\n".encode("utf-8"))
    examples, problems = dataset.parse_stories(path)
    assert not problems
    assert [(e.image, e.story, e.line, e.style) for e in examples] == [
        ("a.jpg", "Once upon a time.", 2, None),
        ("a.jpg", "Another one.", 4, "noir"),
        ("sub/b.png", "A third, with ünïcödé.", 5, None),
    ]


def test_every_bad_line_is_reported_at_once_with_its_line_number(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_bytes(b"good.jpg\tFine.\n"
                     b"no tab here\n"
                     b"\tNo image name.\n"
                     b"empty.jpg\t\n"
                     b"../secret.jpg\tEscapes.\n"
                     b"/etc/passwd\tAbsolute.\n"
                     b"latin1.jpg\tCaf\xe9\n")
    examples, problems = dataset.parse_stories(path)
    assert [e.line for e in examples] == [1]
    assert [line for line, _ in problems] == [2, 3, 4, 5, 6, 7]
    problems = [msg for _, msg in problems]
    assert all(p.startswith(str(path)) for p in problems)
    assert "tab" in problems[0] and "UTF-8" in problems[5] and "'..'" in problems[3]


def test_missing_or_empty_stories_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        dataset.read_examples(tmp_path / "nope.txt", tmp_path)
    with pytest.raises(UserError, match="no stories"):
        dataset.read_examples(write_stories(tmp_path / "s.txt", ["# only a comment"]), tmp_path)


def save(img, path, **kw):
    img.save(path, **kw)
    return path


def test_image_modes_become_upright_rgb(tmp_path):
    grey16 = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    rgb = dataset.load_image(save(grey16, tmp_path / "g16.png"))
    assert rgb.mode == "RGB" and abs(rgb.getpixel((0, 0))[0] - 128) <= 1  # scaled, not clipped to white

    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert dataset.load_image(save(transparent, tmp_path / "t.png")).getpixel((0, 0)) == (255, 255, 255)

    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # red in CMYK
    r, g, b = dataset.load_image(save(cmyk, tmp_path / "c.jpg")).getpixel((2, 2))
    assert r > 200 and g < 60 and b < 60

    palette = Image.new("P", (4, 4), 3)
    assert dataset.load_image(save(palette, tmp_path / "p.gif")).mode == "RGB"

    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    r, g, b = dataset.load_image(tmp_path / "anim.gif").getpixel((1, 1))
    assert r > 200 and b < 60  # the first frame

    wide = Image.new("RGB", (40, 20), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees": the photo is really portrait
    assert dataset.load_image(save(wide, tmp_path / "rot.jpg", exif=exif)).size == (20, 40)

    assert dataset.load_image(save(Image.new("L", (1, 1), 7), tmp_path / "one.png")).size == (1, 1)


def test_a_pil_image_told_from_python_is_the_picture_its_file_is(tiny_checkpoint, tmp_path):
    from storyteller import Storyteller
    teller = Storyteller(tiny_checkpoint, "cpu")
    photo = Image.open(DATA / "images" / "photo_cat.jpg").convert("RGB")
    cutout = photo.convert("RGBA")
    cutout.paste((0, 0, 0, 0), (0, 0, photo.width // 2, photo.height))  # the transparent half hides black
    exif = Image.Exif()
    exif[0x0112] = 6
    files = [save(cutout, tmp_path / "cutout.png"), save(photo.resize((60, 30)), tmp_path / "rot.jpg", exif=exif)]
    for path in files:
        with Image.open(path) as opened:
            assert teller.picture(opened).tobytes() == teller.picture(path).tobytes(), path.name
    with Image.open(files[0]) as opened:
        assert teller.tell(opened, strategy="greedy") == teller.tell(files[0], strategy="greedy")


def test_jpeg_draft_decoding_keeps_enough_pixels(tmp_path):
    photo = Image.new("RGB", (4000, 3000), (10, 20, 30))
    img = dataset.load_image(save(photo, tmp_path / "big.jpg"), min_side=232)
    assert min(img.size) >= 232 and img.size[0] < 4000


def test_check_images_names_every_bad_file_with_its_line(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    save(Image.new("RGB", (8, 8)), images / "ok.png")
    (images / "empty.jpg").write_bytes(b"")
    (images / "text.jpg").write_text("not an image")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, "JPEG")
    (images / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (images / "folder.jpg").mkdir()
    names = ["ok.png", "missing.jpg", "empty.jpg", "text.jpg", "cut.jpg", "folder.jpg"]
    stories = write_stories(tmp_path / "s.txt", [f"{n}\tA story." for n in names] + ["no tab"])
    with pytest.raises(DataError) as err:
        dataset.read_examples(stories, images)
    problems = err.value.problems
    assert len(problems) == 6  # the image problems and the bad line, in line order
    for line, word in zip(range(2, 8), ["not found", "empty file", "not an image", "truncated", "directory", "tab"]):
        hit = [p for p in problems if p.startswith(f"{stories}:{line}:")]
        assert hit and word in hit[0], (line, problems)


def test_split_holds_out_whole_images():
    examples = [dataset.Example(f"{i}.jpg", "s", i) for i in range(20) for _ in range(2)]
    train, val = dataset.split_by_image(examples, 0.1, seed=0)
    assert len(val) == 4 and not {e.image for e in train} & {e.image for e in val}
    assert dataset.split_by_image(examples[:8], 0.1, seed=0) == (examples[:8], [])


def test_a_picture_shared_by_albums_is_never_in_both_training_and_validation():
    # Albums chained by shared pictures (0|1, 1|2, ...) and pairs of their own, beside single pictures.
    lines = [f"c{i}.jpg|c{i + 1}.jpg" for i in range(6)] + [f"p{i}a.jpg|p{i}b.jpg" for i in range(6)] + \
            [f"s{i}.jpg" for i in range(6)] + ["c3.jpg", "s0.jpg|s1.jpg"]
    examples = [dataset.Example(image, "s", n) for n, image in enumerate(lines)]
    for seed in range(20):
        train, val = dataset.split_by_image(examples, 0.3, seed)
        pictures = lambda part: {name for ex in part for name in ex.images}
        assert val and not pictures(train) & pictures(val), seed
        assert sorted(train + val, key=lambda ex: ex.line) == examples
    # Without shared pictures the split is what it was: by each line's image field.
    singles = [dataset.Example(f"{i}.jpg", "s", i) for i in range(20)]
    held_out = {"4.jpg", "6.jpg", "8.jpg", "18.jpg"}  # what the split was before it knew of shared pictures
    assert {ex.image for ex in dataset.split_by_image(singles, 0.2, seed=0)[1]} == held_out
