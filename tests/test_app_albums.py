"""The web app with a model trained on albums and with length control: one story about several
uploaded pictures, in upload order, and the story length asked for; the album input opens only
files the server received, as the single picture's does; and the page driven in headless Chromium.

The model is trained for seconds, so what it writes is barely learned (test_albums.py checks
learning); these tests check that the page asks the model exactly what storyteller does."""
import json
import os
import random
import shutil
import threading
import time
from pathlib import Path

import gradio as gr
import httpx
import pytest

import app
import train
from shapes import MORE, make_albums
from storyteller import Storyteller
from conftest import CHROMIUM, need_chromium
from test_app import CHROMIUM_ARGS, free_port


@pytest.fixture(scope="module")
def album_model(album_checkpoint, tmp_path_factory):
    """A tiny model trained on album_checkpoint's 160 albums of two or three shapes (their features read
    from its cache) whose stories go on for 0, 1 or 2 more sentences, with --length-control: one
    checkpoint with both; and 4 albums it never saw, each told a story of its own."""
    root, trained = tmp_path_factory.mktemp("app_albums"), album_checkpoint.parent
    stories = root / "stories.txt"
    rng = random.Random(0)  # lengths independent of the album's size, so the thirds split
    stories.write_text("".join(line + "".join(" " + s for s in MORE[:rng.choice([0, 1, 2])]) + "\n"
                               for line in (trained / "train" / "stories.txt").read_text().splitlines()))
    train.main(["--preset", "tiny", "--images", str(trained / "train" / "images"), "--stories", str(stories),
                "--no-train-encoder", "--val-split", "0", "--epochs", "18", "--length-control",
                "--feature-cache", str(trained / ".cache" / "features"), "--out", str(root / "m.pt"), "--device", "cpu"])
    unseen = [[str(root / "test" / "images" / n) for n in names]
              for names, _ in make_albums(root / "test", 4, seed=1, sizes=(3,))]
    library = Storyteller(root / "m.pt", "cpu")
    told = {library.tell(album, album=True, strategy="greedy") for album in unseen}
    assert len(told) == len(unseen), told  # (2 epochs on 40 albums told all four the same story)
    return root / "m.pt", unseen


@pytest.fixture(scope="module")
def teller(album_model):
    return app.WebStoryteller(album_model[0], "cpu", max_batch=4)


def records(paths):
    """Gradio's records of uploaded files, as the page sends them (with preprocess=False)."""
    return [{"path": str(p), "orig_name": Path(p).name, "meta": {"_type": "gradio.FileData"}} for p in paths]


def greedy(teller, album, length="medium", upload=None):
    """The Generate button with the album input filled: one greedy story."""
    return teller.text(upload, "", "greedy", 0.8, min(80, teller.room), 1, records(album), length)


def test_an_album_gets_storytellers_story_of_its_pictures_in_upload_order(teller, album_model, monkeypatch):
    checkpoint, unseen = album_model
    library = Storyteller(checkpoint, "cpu")
    asked = []  # what the page hands the model: one album, its pictures in upload order
    stories = teller.teller.stories_and_tags
    monkeypatch.setattr(teller.teller, "stories_and_tags", lambda items, *a, **kw: asked.append(items) or stories(items, *a, **kw))
    for album in unseen[:2]:
        for order in (album, album[::-1]):
            assert greedy(teller, order) == library.tell(order, album=True, strategy="greedy")
            [[pictures]] = asked[-1:]
            assert [p.tobytes() for p in pictures] == [library.load_image(p).tobytes() for p in order]
    # The album wins over the single picture: Generate tells the album's story.
    assert greedy(teller, unseen[0], upload=records(unseen[1][:1])[0]) == greedy(teller, unseen[0])


def test_albums_with_the_same_settings_are_decoded_in_one_batch(teller, album_model, monkeypatch):
    checkpoint, unseen = album_model
    library = Storyteller(checkpoint, "cpu")
    batches = []
    decode = teller.decode
    monkeypatch.setattr(teller.batcher, "decode", lambda settings, items, on_texts: batches.append(len(items)) or
                        decode(settings, items, on_texts))
    told = {}
    threads = [threading.Thread(target=lambda k=k: told.setdefault(k, greedy(teller, unseen[k]))) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert told == {k: library.tell(unseen[k], album=True, strategy="greedy") for k in range(4)}
    assert sum(batches) == 4 and max(batches) >= 2, batches  # the ones that waited went together


def test_more_pictures_than_the_model_learned_is_one_line_before_any_is_read(teller, tmp_path):
    never_read = [tmp_path / f"missing{k}.png" for k in range(4)]  # reading one would be another error
    with pytest.raises(gr.Error) as err:
        greedy(teller, never_read)
    assert err.value.message.startswith("An album of 4 images: this model learned albums of at most 3 images")
    assert "\n" not in err.value.message


def test_an_unreadable_picture_in_an_album_is_named_by_its_upload_name(teller, album_model, tmp_path):
    bad = tmp_path / "upload-7f3a"
    bad.write_text("not a picture")
    album = records([album_model[1][0][0], bad])
    album[1]["orig_name"] = "second.png"
    with pytest.raises(gr.Error) as err:
        teller.text(None, "", "greedy", 0.8, 40, 1, album, "medium")
    assert err.value.message.startswith("second.png: not an image Pillow can read")
    assert str(tmp_path) not in err.value.message


def blocks(page, kind):
    return {block.label: block for block in page.blocks.values() if isinstance(block, kind)}


def test_the_length_menu_shows_for_a_length_model_and_the_story_follows_it(teller, album_model, monkeypatch):
    checkpoint, unseen = album_model
    page = app.build_page(teller)
    menu, album = blocks(page, gr.Radio)["Story length"], blocks(page, gr.File)[
        "Album: up to 3 pictures, in story order"]
    assert menu.visible is True and [v for _, v in menu.choices] == ["short", "medium", "long"]
    assert menu.value == "medium" and album.visible is True
    assert "Max tokens" in blocks(page, gr.Slider)
    library = Storyteller(checkpoint, "cpu")
    asked = []
    stories = teller.teller.stories_and_tags
    monkeypatch.setattr(teller.teller, "stories_and_tags", lambda items, config, style, length, **kw: asked.append(length) or
                        stories(items, config, style, length, **kw))
    for length in ("short", "long"):
        assert greedy(teller, unseen[0], length) == library.tell(unseen[0], album=True, length=length, strategy="greedy")
    assert asked == ["short", "long"]
    with pytest.raises(gr.Error) as err:
        greedy(teller, unseen[0], "epic")
    assert err.value.message == "Length must be one of short, medium, long, got 'epic'"


def test_a_single_image_model_without_length_control_shows_neither(teller, monkeypatch):
    monkeypatch.setattr(teller.model.config, "album_slots", 1)
    monkeypatch.setattr(teller.model.config, "length_buckets", [])
    page = app.build_page(teller)
    assert blocks(page, gr.Radio)["Story length"].visible is False
    assert blocks(page, gr.File)["Album: up to 1 pictures, in story order"].visible is False
    [click] = [fn for fn in page.fns.values() if fn.name == "on_generate"]
    assert len(click.inputs) == 6  # the API clients' six values, as before albums
    with pytest.raises(gr.Error) as err:
        teller.settings("", "greedy", 0.8, 20, 1, "short")
    assert err.value.message == "This model was trained without length control (train.py --length-control)"


# ----------------------------------------------------------------------------- the real server

@pytest.fixture(scope="module")
def served(teller):
    """The page served by gradio in this process (starting `python app.py` costs seconds more)."""
    page = app.build_page(teller)
    page.queue(default_concurrency_limit=4)
    port = free_port()
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        page.close()


def ask(client, data) -> tuple[str, object]:
    """POST /gradio_api/call/on_generate: ("complete", [stories]) or ("error", message)."""
    response = client.post("gradio_api/call/on_generate", json={"data": data})
    assert response.status_code == 200, response.text
    lines = client.get(f"gradio_api/call/on_generate/{response.json()['event_id']}").text.splitlines()
    kind = lines[-3].removeprefix("event: ")  # the last event: the stories as they grew come before it
    answer = json.loads(lines[-2].removeprefix("data: "))
    return kind, answer["error"] if kind == "error" else answer


def test_the_album_input_opens_only_files_the_server_received(served, album_model, tmp_path):
    client = httpx.Client(base_url=served, timeout=60)
    paths = album_model[1][0]
    with client:
        uploaded = []
        for path in paths:
            with open(path, "rb") as f:
                [server_path] = client.post("gradio_api/upload", files={"files": (Path(path).name, f)}).json()
            uploaded.append(server_path)
        settings = ["", "greedy", 0.8, 40, 1]
        kind, [story] = ask(client, [None, *settings, records(uploaded), "medium"])
        assert kind == "complete" and story == Storyteller(album_model[0], "cpu").tell(
            paths, album=True, strategy="greedy", max_new_tokens=40)

        elsewhere = tmp_path / "elsewhere.png"  # a real picture on the server's disk, never uploaded
        shutil.copy(paths[0], elsewhere)
        fifo = tmp_path / "fifo.png"  # opening it would block until something writes to it
        os.mkfifo(fifo)
        for path in [elsewhere, "/etc/passwd", fifo, paths[0], ""]:
            start = time.monotonic()
            # The foreign file last, after real uploads: each path of an album is checked.
            assert ask(client, [None, *settings, records(uploaded[:2] + [path]), "medium"]) == ("error", app.NO_UPLOAD)
            assert time.monotonic() - start < 10  # answered at once: nothing waited on the FIFO
        with pytest.raises(OSError):  # nobody holds the FIFO open for reading: the server never opened it
            os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        # Not file records at all: refused alike, never a traceback (gradio's own check would raise one).
        for junk in ["/etc/passwd", ["/etc/passwd"], [{"path": uploaded[0]}], 7]:
            assert ask(client, [None, *settings, junk, "medium"]) == ("error", app.NO_UPLOAD), junk


def test_in_chromium_upload_an_album_in_order_and_read_its_story(served, album_model):
    need_chromium()
    from playwright.sync_api import expect, sync_playwright
    checkpoint, unseen = album_model
    album = unseen[1][::-1]  # not the files' sorted order: the page must keep the order they were given in
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(served)
            page.locator("#album input[type=file]").set_input_files(album)
            names = page.locator("#album td.filename")
            expect(names).to_have_count(len(album))  # uploaded and listed, in the order given
            assert [names.nth(k).get_attribute("aria-label") for k in range(len(album))] == [Path(p).name for p in album]
            page.get_by_label("greedy").check()
            page.get_by_role("button", name="Generate").click()
            stories = page.locator("#stories textarea")
            # The story grows a word at a time, then stays as the library tells it.
            told = Storyteller(checkpoint, "cpu").tell(album, album=True, strategy="greedy")
            expect(stories).to_have_value(told, timeout=60_000)
        finally:
            browser.close()
