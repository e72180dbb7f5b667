"""The web app: its Generate handler called directly, and the page driven in headless Chromium."""
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import gradio as gr
import pytest
from PIL import Image

import app
import generate
import utils
from conftest import DATA, ROOT

BOAT = DATA / "images" / "night_sea_boat.jpg"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's package; `playwright install` is not used
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def teller(tiny_checkpoint):
    return app.Storyteller(tiny_checkpoint, "cpu")


def test_the_page_tells_the_same_story_as_generate_py(teller, tiny_checkpoint, capsys):
    image = Image.open(BOAT).convert("RGB")
    [story] = teller.stories(image, strategy="greedy")
    generate.main([str(BOAT), "--checkpoint", str(tiny_checkpoint), "--strategy", "greedy", "--json", "--device", "cpu"])
    assert story == json.loads(capsys.readouterr().out)["story"]
    assert len(story.split()) >= 5

    stories = teller.stories(image, strategy="sample", temperature=1.0, max_new_tokens=12, num_stories=3)
    # Byte-level BPE starts a new token at every space, so 12 tokens hold at most 12 words.
    assert len(stories) == 3 and all(0 < len(s.split()) <= 12 for s in stories)


def test_several_stories_are_numbered(teller):
    text = teller.on_generate({"path": str(BOAT)}, "", "sample", 0.8, 10, 2)
    assert text.startswith("1. ") and "\n\n2. " in text


@pytest.mark.parametrize("content, message", [(b"hello, not a picture", "bad.png: not an image Pillow can read"),
                                              (BOAT.read_bytes()[:2000], "bad.png: truncated image file")],
                         ids=["text", "truncated"])
def test_a_bad_image_is_a_message_in_the_page(teller, tmp_path, content, message):
    bad = tmp_path / "upload-7f3a"  # gradio keeps the name the user gave in orig_name
    bad.write_bytes(content)
    with pytest.raises(gr.Error) as err:
        teller.on_generate({"path": str(bad), "orig_name": "bad.png"}, "", "sample", 0.8, 20, 1)
    assert err.value.message.startswith(message) and str(tmp_path) not in err.value.message


def test_no_image_or_greedy_with_several_stories_is_a_message(teller):
    with pytest.raises(gr.Error, match="Upload an image"):
        teller.on_generate(None, "", "sample", 0.8, 20, 1)
    with pytest.raises(gr.Error, match="Greedy decoding gives one story"):
        teller.on_generate({"path": str(BOAT)}, "", "greedy", 0.8, 20, 2)


def test_style_menu_only_for_a_model_with_styles(teller, monkeypatch):
    def menu(page):
        [dropdown] = [block for block in page.blocks.values() if isinstance(block, gr.Dropdown)]
        return dropdown
    assert menu(app.build_page(teller)).visible is False
    monkeypatch.setattr(teller, "styles", ["funny", "noir"])
    shown = menu(app.build_page(teller))
    assert shown.visible is True and [value for _, value in shown.choices] == ["", "funny", "noir"]


def test_missing_checkpoint_is_said_on_stderr_and_in_the_page(tmp_path, monkeypatch, capsys):
    served = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda page, **kw: served.append((page, kw)))
    app.main(["--checkpoint", str(tmp_path / "none.pt"), "--port", "7999"])
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'none.pt'}: checkpoint not found") and len(err.splitlines()) == 1
    [(page, kw)] = served
    texts = [block.value for block in page.blocks.values() if isinstance(block, gr.Markdown)]
    assert any("checkpoint not found" in t and "python train.py" in t for t in texts)
    assert not any(isinstance(block, gr.Button) for block in page.blocks.values())
    assert kw["share"] is False and kw["server_name"] == "127.0.0.1" and kw["server_port"] == 7999


def test_a_taken_port_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(utils.UserError, match=rf"^cannot serve on 127.0.0.1:{port} \(.*\); choose another --port$"):
            app.main(["--checkpoint", str(tmp_path / "none.pt"), "--port", str(port)])


def test_bad_port_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        app.parse_args(["--port", "70000"])
    assert exit_.value.code == 2 and "[1, 65535]" in capsys.readouterr().err


# ----------------------------------------------------------------------------- in a real browser

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served_app(tiny_checkpoint, tmp_path):
    """`python app.py` as a user starts it, on a free port; yields its URL once it answers."""
    port = free_port()
    log = open(tmp_path / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--checkpoint", str(tiny_checkpoint), "--port", str(port),
                             "--device", "cpu"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"app.py did not start:\n{(tmp_path / 'app.log').read_text()}")
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    assert "Traceback" not in (tmp_path / "app.log").read_text()


def test_in_chromium_upload_generate_read_and_nothing_leaves_localhost(served_app, tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.skip("Chromium not found: install Debian's package (apt-get install -y chromium; .ci/run does)")
    from playwright.sync_api import expect, sync_playwright
    outside = []

    def note(request):
        url = urlparse(request.url)
        if url.scheme not in ("data", "blob") and url.hostname not in ("127.0.0.1", "localhost"):
            outside.append(request.url)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("request", note)
            page.goto(served_app)
            upload = page.locator("input[type=file]").first
            generate_button = page.get_by_role("button", name="Generate")
            stories = page.locator("#stories textarea")

            upload.set_input_files(BOAT)
            page.locator(f'img[src*="{BOAT.name}"]').first.wait_for()  # uploaded and shown
            generate_button.click()
            expect(stories).not_to_have_value("", timeout=60_000)
            assert len(stories.input_value().split()) >= 5

            bad = tmp_path / "photo.png"
            bad.write_text("not a picture, only text")
            upload.set_input_files(bad)
            page.locator('img[src*="photo.png"]').first.wait_for(state="attached")
            generate_button.click()
            expect(page.get_by_text("photo.png: not an image Pillow can read")).to_be_visible(timeout=30_000)
        finally:
            browser.close()
    assert outside == []


def test_an_image_over_the_pixel_limit_is_a_message_naming_the_flag(teller, tmp_path, monkeypatch):
    from PIL import Image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # what --max-image-pixels 1000 sets
    big = tmp_path / "upload"
    Image.new("RGB", (100, 100)).save(big, format="PNG")  # 10,000 pixels: over twice the limit, a bomb to Pillow
    with pytest.raises(gr.Error) as err:
        teller.on_generate({"path": str(big), "orig_name": "big.png"}, "", "sample", 0.8, 20, 1)
    assert err.value.message.startswith("big.png: 10000 pixels, over the limit of 1000")
    assert "--max-image-pixels 10000" in err.value.message
