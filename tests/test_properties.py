"""Property tests (hypothesis) of what users feed the data code: any bytes as a stories file,
any bytes as an image. Nothing may crash except with the clear error that names the file.
derandomize=True: the same examples on every run, so CI never fails by chance."""
import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from PIL import Image

import dataset
from cli import UserError

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


# ----------------------------------------------------------------------------- stories files

# Pieces that make stories files interesting: separators, comments, escapes from the images
# folder, BOMs, NULs, odd line ends, non-ASCII; glued together with arbitrary text.
PIECES = st.sampled_from(["\t", "\n", "\r\n", "\r", "#", " ", "..", "/", "\\", "C:", "a.jpg", "sub/b.png",
                          "\ufeff", "\x00", "\u00e9", "\u2028", "Once upon a time."])
TEXT = st.lists(PIECES | st.text(max_size=6), max_size=30).map("".join)
STORIES_BYTES = st.one_of(
    st.binary(max_size=200),
    st.tuples(TEXT, st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1"])).map(
        lambda t: t[0].encode(t[1], errors="replace")),
)


@SETTINGS
@given(data=STORIES_BYTES)
def test_any_stories_file_gives_examples_and_problems_with_file_and_line(folder, data):
    path = folder / "stories.txt"
    path.write_bytes(data)
    try:
        examples, problems = dataset.parse_stories(path)
    except UserError as err:  # a file that is wrong as a whole: one line naming it
        assert str(err).startswith(f"{path}: ") and "\n" not in str(err)
        return
    n_lines = len(data.splitlines())
    for line, message in problems:
        assert 1 <= line <= n_lines and message.startswith(f"{path}:{line}: ") and "\n" not in message
    for ex in examples:
        assert 1 <= ex.line <= n_lines and ex.image and ex.story and "\t" not in ex.image + ex.story
        assert dataset._unsafe_name(ex.image) is None  # nothing that leaves the images folder
    used = [ex.line for ex in examples] + [line for line, _ in problems]
    assert len(used) == len(set(used))  # each line is an example, a problem, or skipped


NAME = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_ .-]{0,12}(/[A-Za-z0-9_][A-Za-z0-9_.-]{0,8})?\.jpg", fullmatch=True)
STORY = st.text(st.characters(blacklist_categories=["Cc", "Cs", "Zl", "Zp"]), min_size=1, max_size=40).map(
    str.strip).filter(bool)


@SETTINGS
@given(rows=st.lists(st.tuples(NAME, STORY, st.none() | st.sampled_from(["noir", "fairy tale"])), max_size=8),
       newline=st.sampled_from(["\n", "\r\n"]), bom=st.booleans())
def test_well_formed_stories_files_read_back_exactly(folder, rows, newline, bom):
    path = folder / "stories.txt"
    text = newline.join("\t".join(f for f in row if f) for row in rows) + newline
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode("utf-8"))
    examples, problems = dataset.parse_stories(path)
    assert problems == []
    assert [(ex.image, ex.story, ex.style, ex.line) for ex in examples] == [
        (name.strip(), story, style, i) for i, (name, story, style) in enumerate(rows, start=1)]


# ----------------------------------------------------------------------------- image files

def _encoded(mode, fmt, size=(12, 9)):
    img = Image.fromarray(np.full(size[::-1], 40000, dtype=np.uint16)) if mode == "I;16" else Image.new(mode, size, 90)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


SEEDS = [_encoded(m, f) for m, f in [("RGB", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("I;16", "PNG"),
                                     ("P", "GIF"), ("RGB", "BMP"), ("RGB", "TIFF"), ("RGB", "WEBP"), ("L", "PPM")]]


@st.composite
def damaged_images(draw):
    """A real small image file, maybe with a few bytes overwritten or inserted, maybe cut short."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data) - 1))
        data[at:at + 1] = draw(st.binary(min_size=0, max_size=4))
        if not data:
            data = bytearray(b"\x00")
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(SETTINGS, max_examples=300)
@given(data=damaged_images() | st.binary(max_size=300), min_side=st.sampled_from([None, 8]))
def test_any_image_file_is_an_rgb_image_or_a_one_line_reason(folder, data, min_side):
    path = folder / "image.jpg"
    path.write_bytes(data)
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 100_000  # a damaged header may claim any size: refuse big ones before decoding
    try:
        img = dataset.load_image(path, min_side)
    except dataset.IMAGE_ERRORS as err:
        event(type(err).__name__)
        reason = dataset.describe_image_error(path, err)
        assert reason.startswith(f"{path}: ") and "\n" not in reason
        return
    finally:
        Image.MAX_IMAGE_PIXELS = before
    event("RGB image")
    assert img.mode == "RGB" and img.width * img.height >= 1
