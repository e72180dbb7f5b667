"""The web app: its Generate handler called directly, the real server over HTTP as API clients
call it (only files it received are opened, a login, limits, eight clients at once), and the page
driven in headless Chromium."""
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import httpx

import gradio as gr
import pytest
from PIL import Image

import app
import generate
from conftest import CHROMIUM, DATA, ROOT, need_chromium
from cli import UserError, run_cli

BOAT = DATA / "images" / "night_sea_boat.jpg"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def teller(tiny_checkpoint):
    return app.WebStoryteller(tiny_checkpoint, "cpu")


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
    text = teller.text({"path": str(BOAT)}, "", "sample", 0.8, 10, 2)
    assert text.startswith("1. ") and "\n\n2. " in text


@pytest.mark.parametrize("content, message", [(b"hello, not a picture", "bad.png: not an image Pillow can read"),
                                              (BOAT.read_bytes()[:2000], "bad.png: truncated image file")],
                         ids=["text", "truncated"])
def test_a_bad_image_is_a_message_in_the_page(teller, tmp_path, content, message):
    bad = tmp_path / "upload-7f3a"  # gradio keeps the name the user gave in orig_name
    bad.write_bytes(content)
    with pytest.raises(gr.Error) as err:
        teller.text({"path": str(bad), "orig_name": "bad.png"}, "", "sample", 0.8, 20, 1)
    assert err.value.message.startswith(message) and str(tmp_path) not in err.value.message


def test_no_image_or_greedy_with_several_stories_is_a_message(teller):
    with pytest.raises(gr.Error, match="Upload an image"):
        teller.text(None, "", "sample", 0.8, 20, 1)
    with pytest.raises(gr.Error, match="Greedy decoding gives one story"):
        teller.text({"path": str(BOAT)}, "", "greedy", 0.8, 20, 2)


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


def test_app_decodes_in_its_main_thread_while_gradio_serves(tiny_checkpoint, monkeypatch):
    calls = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda page, **kw: calls.append(("launch", kw["prevent_thread_lock"])))
    monkeypatch.setattr(app.Batcher, "serve", lambda batcher: calls.append(("serve", threading.current_thread())))
    app.main(["--checkpoint", str(tiny_checkpoint), "--port", "7999"])
    assert calls == [("launch", True), ("serve", threading.main_thread())]


def test_a_taken_port_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=rf"^cannot serve on 127.0.0.1:{port} \(.*\); choose another --port$"):
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


USER, PASSWORD = "reader", "a long pass phrase"  # a space and no colon: read from the file as written
MAX_FILE_SIZE = 200_000  # over every sample image (the largest is 128 kB)


@pytest.fixture(scope="module")
def service(tiny_checkpoint, tmp_path_factory):
    """`python app.py` as someone serving it to others starts it: behind a login (--auth-file), with
    a small --max-file-size, on a free port. Its upload folder (GRADIO_TEMP_DIR) is known, so a test
    can plant files in it. One server for every test here: starting one takes seconds."""
    root = tmp_path_factory.mktemp("service")
    users = root / "users.txt"
    users.write_text(f"# who may log in\n{USER}:{PASSWORD}\n")
    log_path = root / "app.log"
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "app.py", "--checkpoint", str(tiny_checkpoint), "--port", str(port),
                                 "--device", "cpu", "--auth-file", str(users), "--max-file-size", str(MAX_FILE_SIZE),
                                 "--concurrency", "8", "--max-queue", "16"],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "GRADIO_TEMP_DIR": str(root / "uploads")})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"app.py did not start:\n{log_path.read_text()}")
                time.sleep(0.3)
        yield SimpleNamespace(url=url, uploads=root / "uploads", log=log_path)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "Traceback" not in log_path.read_text()


def logged_in(service) -> httpx.Client:
    """An HTTP client holding the login cookie, as the page's own requests do."""
    client = httpx.Client(base_url=service.url, timeout=60)
    assert client.post("login", data={"username": USER, "password": PASSWORD}).status_code == 200
    return client


def upload(client, path) -> str:
    """POST /gradio_api/upload, as the page does when a file is dropped on it: the server's path of the copy."""
    with open(path, "rb") as f:
        response = client.post("gradio_api/upload", files={"files": (Path(path).name, f)})
    assert response.status_code == 200, response.text
    [server_path] = response.json()
    return server_path


def call(client, path, settings=("", "greedy", 0.8, 20, 1), read=True):
    """The Generate button's API (/gradio_api/call/on_generate) with a file record naming path:
    ("complete", [stories]) or ("error", message)."""
    record = {"path": path, "orig_name": Path(path).name, "meta": {"_type": "gradio.FileData"}}
    response = client.post("gradio_api/call/on_generate", json={"data": [record, *settings]})
    assert response.status_code == 200, response.text
    event_id = response.json()["event_id"]
    if not read:
        return event_id
    lines = client.get(f"gradio_api/call/on_generate/{event_id}").text.splitlines()
    kind = lines[-3].removeprefix("event: ")  # the last event: the stories as they grew come before it
    data = json.loads(lines[-2].removeprefix("data: "))
    return kind, data["error"] if kind == "error" else data


def test_the_api_opens_only_files_the_server_received(service, tmp_path):
    client = logged_in(service)
    kind, [story] = call(client, upload(client, BOAT))
    assert kind == "complete" and len(story.split()) >= 5

    elsewhere = tmp_path / "elsewhere.jpg"  # a real picture on the server's disk, never uploaded
    shutil.copy(BOAT, elsewhere)
    fifo = tmp_path / "fifo.jpg"  # opening it would block until something writes to it
    os.mkfifo(fifo)
    planted = service.uploads / "planted"  # inside the upload folder, but not put there by an upload
    planted.mkdir(parents=True, exist_ok=True)
    (planted / "boat.jpg").symlink_to(elsewhere)
    (planted / "passwd").symlink_to("/etc/passwd")
    shutil.copy(BOAT, planted / "copy.jpg")
    for path in [elsewhere, "/etc/passwd", fifo, planted / "boat.jpg", planted / "passwd", planted / "copy.jpg",
                 BOAT, "data/images/night_sea_boat.jpg", "http://127.0.0.1:1/x.jpg", ""]:
        start = time.monotonic()
        assert call(client, str(path)) == ("error", app.NO_UPLOAD), path
        assert time.monotonic() - start < 10  # answered at once: nothing waited on the FIFO
    # No process holds the FIFO open for reading: had the server opened it, it would still be waiting
    # there for a writer, and this open would succeed.
    with pytest.raises(OSError) as nobody:
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    assert nobody.value.errno == errno.ENXIO


def test_a_login_guards_the_page_and_its_api(service):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AuthenticationError
    stranger = httpx.Client(base_url=service.url, timeout=30)
    assert stranger.post("gradio_api/call/on_generate", json={"data": [None, "", "greedy", 0.8, 20, 1]}).status_code == 401
    assert stranger.post("gradio_api/upload", files={"files": ("a.jpg", b"x")}).status_code == 401
    assert stranger.post("login", data={"username": USER, "password": "wrong"}).status_code == 400
    assert stranger.get("config").status_code == 401  # what gradio_client reads first
    with pytest.raises(AuthenticationError, match="as credentials were not provided. Please login.$"):
        Client(service.url, verbose=False).predict(handle_file(BOAT), "", "greedy", 0.8, 20, 1, api_name="/on_generate")
    with pytest.raises(ValueError, match=r"^Could not login to http://127\.0\.0\.1:\d+/\.$"):  # the 400 above
        Client(service.url, auth=(USER, "wrong"), verbose=False)
    story = Client(service.url, auth=(USER, PASSWORD), verbose=False).predict(
        handle_file(BOAT), "", "greedy", 0.8, 20, 1, api_name="/on_generate")
    assert len(story.split()) >= 5


def test_eight_clients_at_once_then_junk_and_a_hang_up_never_wedge_the_queue(service, teller):
    from gradio_client import Client, handle_file
    photos = sorted((DATA / "images").glob("*.jpg"))[:8]
    alone = {photo: teller.text({"path": str(photo)}, "", "greedy", 0.8, 20, 1) for photo in photos}
    assert len(set(alone.values())) == 8  # a story each: a mix-up between the clients would show
    stories, errors = {}, []

    def one_client(photo):
        try:
            client = Client(service.url, auth=(USER, PASSWORD), verbose=False)
            stories[photo] = client.predict(handle_file(photo), "", "greedy", 0.8, 20, 1, api_name="/on_generate")
        except Exception as err:  # a refusal ("Queue is full") or anything else fails the test below
            errors.append(f"{photo.name}: {err!r}")

    threads = [threading.Thread(target=one_client, args=(photo,)) for photo in photos]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == [] and stories == alone  # each client got its own picture's story, as told alone

    client = logged_in(service)
    boat = upload(client, BOAT)
    junk = [(["not", "a", "request"], "expected 6 input values, as the page sends"),
            ([{"path": boat}, "", "nucleus", 0.8, 20, 1], "Strategy must be one of"),
            ([{"path": boat}, "", "sample", "hot", 20, 1], "Temperature must be a number in [0.1, 2.0]"),
            ([{"path": boat}, "", "sample", 0.8, 10 ** 9, 1], "Max tokens must be a number in [8, "),
            ([{"path": boat}, "", "sample", 0.8, 20, 10 ** 9], "Stories must be a number in [1, 5]"),
            ([{"path": boat}, "noir", "sample", 0.8, 20, 1], "Unknown style 'noir'; this model has no styles")]
    for data, message in junk:
        response = client.post("gradio_api/call/on_generate", json={"data": data})
        lines = client.get(f"gradio_api/call/on_generate/{response.json()['event_id']}").text.splitlines()
        assert lines[0] == "event: error" and json.loads(lines[1][6:])["error"].startswith(message), lines
    assert client.post("gradio_api/call/on_generate", content=b"{not json").status_code >= 400
    too_big = client.post("gradio_api/upload", files={"files": ("big.png", b"x" * (MAX_FILE_SIZE + 1))})
    assert too_big.status_code == 413 and too_big.text == f"File size exceeded maximum allowed size of {MAX_FILE_SIZE} bytes."

    # A client asks for five long stories and hangs up as soon as its request is queued.
    event_id = call(client, boat, ("", "beam", 0.8, 100, 5), read=False)
    with client.stream("GET", f"gradio_api/call/on_generate/{event_id}") as hung_up:
        next(hung_up.iter_bytes())
    kind, [story] = call(client, boat)  # the next one is still answered
    assert kind == "complete" and len(story.split()) >= 5
    story = Client(service.url, auth=(USER, PASSWORD), verbose=False).predict(
        handle_file(photos[0]), "", "greedy", 0.8, 20, 1, api_name="/on_generate")  # and a ninth gradio_client
    assert len(story.split()) >= 5


def settled(textbox, quiet=3.0, timeout=60.0) -> str:
    """The text of a textbox whose story streams in, once it has not changed for quiet seconds."""
    value, since, start = textbox.input_value(), time.monotonic(), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() - start < timeout, f"the story never stopped growing: {value!r}"
        time.sleep(0.25)
        now = textbox.input_value()
        if now != value:
            value, since = now, time.monotonic()
    return value


def test_in_chromium_log_in_upload_generate_read_and_nothing_leaves_localhost(service, tmp_path):
    need_chromium()
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
            page.goto(service.url)
            page.get_by_label("username").fill(USER)
            page.get_by_label("password").fill(PASSWORD)
            page.get_by_role("button", name="Login").click()
            upload = page.locator("input[type=file]").first
            generate_button = page.get_by_role("button", name="Generate")
            stories = page.locator("#stories textarea")

            upload.set_input_files(BOAT)
            page.locator(f'img[src*="{BOAT.name}"]').first.wait_for()  # uploaded and shown
            generate_button.click()
            expect(stories).not_to_have_value("", timeout=60_000)
            first = settled(stories)
            assert len(first.split()) >= 5

            # A sample image: the page sends gradio's cached copy, which the server accepts as its own.
            page.locator(".gallery-item").first.click()
            generate_button.click()
            expect(stories).not_to_have_value(first, timeout=60_000)  # another picture, another story
            settled(stories)
            assert app.NO_UPLOAD not in page.content()

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
        teller.text({"path": str(big), "orig_name": "big.png"}, "", "sample", 0.8, 20, 1)
    assert err.value.message.startswith("big.png: 10000 pixels, over the limit of 1000")
    assert "--max-image-pixels 10000" in err.value.message


# ----------------------------------------------------------------------------- serving to others

def test_requests_that_arrive_together_are_decoded_in_one_batch_each_getting_its_own_stories():
    batches = []

    def decode(settings, images, on_texts):
        batches.append((settings, list(images)))
        time.sleep(0.2)  # long enough for the other requests to arrive and wait
        return [[f"{settings[0]} story of {image}"] for image in images]

    batcher = app.Batcher(decode, max_batch=4)
    results = {}
    requests = [(("plain",), k) for k in range(6)] + [(("noir",), 6)]
    threads = [threading.Thread(target=lambda s=s, k=k: results.setdefault(k, batcher(s, k))) for s, k in requests]
    for thread in threads:
        thread.start()
        time.sleep(0.01)
    for thread in threads:
        thread.join(timeout=10)
    assert results == {k: [f"{s[0]} story of {k}"] for s, k in requests}
    assert all(len(images) <= 4 for _, images in batches)
    assert len(batches) <= 4 and max(len(images) for _, images in batches) >= 3  # together, not one by one
    assert all(set(images) <= {k for s2, k in requests if s2 == s} for s, images in batches)  # never mixed


def test_a_failing_batch_fails_only_its_own_requests():
    def decode(settings, images, on_texts):
        time.sleep(0.1)
        if settings == ("bad",):
            raise UserError("this batch failed")
        return [["fine"] for _ in images]

    batcher = app.Batcher(decode, max_batch=8)
    outcome = {}

    def ask(settings, k):
        try:
            outcome[k] = batcher(settings, k)
        except UserError as err:
            outcome[k] = str(err)
    threads = [threading.Thread(target=ask, args=(("bad",) if k == 1 else ("good",), k)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert outcome == {0: ["fine"], 1: "this batch failed", 2: ["fine"], 3: ["fine"]}


def test_with_a_thread_in_serve_every_batch_is_decoded_in_that_one():
    """app.py's main thread serves: an int8 story took 1.8x as long in the request threads."""
    decoded_in, sizes, pieces = [], [], []

    def decode(settings, images, on_texts):
        decoded_in.append(threading.get_ident())
        sizes.append(len(images))
        time.sleep(0.2)
        if settings == ("bad",):
            raise UserError("this batch failed")
        for image, on_text in zip(images, on_texts):
            on_text(0, f"piece of {image}")
        return [[f"story of {image}"] for image in images]

    batcher = app.Batcher(decode, max_batch=3)
    server = threading.Thread(target=batcher.serve, daemon=True)
    server.start()
    while not batcher.serving:
        time.sleep(0.01)
    outcome = {}

    def ask(settings, k):
        try:
            outcome[k] = batcher(settings, k, on_text=lambda story, text: pieces.append(text))
        except UserError as err:
            outcome[k] = str(err)
    threads = [threading.Thread(target=ask, args=(("bad",) if k == 2 else ("good",), k)) for k in range(7)]
    for thread in threads:
        thread.start()
        time.sleep(0.01)
    for thread in threads:
        thread.join(timeout=10)
    assert outcome == {k: "this batch failed" if k == 2 else [f"story of {k}"] for k in range(7)}
    assert set(decoded_in) == {server.ident} and max(sizes) >= 2  # all there, and in batches
    assert sorted(pieces) == sorted(f"piece of {k}" for k in range(7) if k != 2)


@pytest.mark.parametrize("settings, message", [
    (("", "nucleus", 0.8, 20, 1), "Strategy must be one of sample, beam, greedy"),
    (("", "sample", float("nan"), 20, 1), "Temperature must be a number in [0.1, 2.0], got 'nan'"),
    (("", "sample", 0.8, 20.5, 1), "Max tokens must be a number in [8, "),
    (("", "sample", 0.8, 20, 10 ** 9), "Stories must be a number in [1, 5], got '1000000000'"),
    (("", "sample", 0.8, None, 1), "Max tokens must be a number in [8, "),
    (("funny", "sample", 0.8, 20, 1), "Unknown style 'funny'; this model has no styles"),
], ids=["strategy", "nan temperature", "fractional max tokens", "a billion stories", "no max tokens", "style"])
def test_settings_sent_by_an_api_client_are_checked(teller, settings, message):
    with pytest.raises(gr.Error) as err:
        teller.text({"path": str(BOAT)}, *settings)
    assert err.value.message.startswith(message)


def test_a_network_address_without_a_login_warns_and_the_limits_reach_gradio(tmp_path, monkeypatch, capsys):
    served = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda page, **kw: served.append((page, kw)))
    app.main(["--checkpoint", str(tmp_path / "none.pt"), "--host", "0.0.0.0"])
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warning == ["warning: serving on 0.0.0.0 without --auth: anyone who can reach this machine can use the "
                       "page and its API; add --auth-file FILE (one user:password per line)"]

    users = tmp_path / "users.txt"
    users.write_text("\n# readers\nann:pass:with:colons\n bob : two words \n")
    app.main(["--checkpoint", str(tmp_path / "none.pt"), "--host", "0.0.0.0", "--auth-file", str(users),
              "--auth", "cy:x", "--max-file-size", "1000", "--concurrency", "3", "--max-queue", "5"])
    assert "warning" not in capsys.readouterr().err
    page, kw = served[-1]
    assert kw["auth"] == [("cy", "x"), ("ann", "pass:with:colons"), ("bob", " two words ")]
    assert kw["max_file_size"] == 1000
    assert page._queue.max_size == 5 and page._queue.default_concurrency_limit == 3


def test_a_bad_auth_file_names_each_bad_line_and_never_shows_a_password(tmp_path, capsys):
    users = tmp_path / "users.txt"
    users.write_text("ann:fine\nsecretword\n:nouser\nbob:\n")
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: app.main(["--checkpoint", str(tmp_path / "none.pt"), "--auth-file", str(users)]))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "secretword" not in err and "nouser" not in err
    assert err.splitlines() == [f"error: {users}:{n}: expected user:password (a name, a colon, a password)"
                                for n in (2, 3, 4)] + ["error: 3 problems found; fix them and run again"]
