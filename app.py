"""A web page that writes stories about pictures, served on this machine and working offline.

    python app.py                                  # then open http://127.0.0.1:7860
    python app.py --checkpoint my_model.pt --port 8000
    python app.py --host 0.0.0.0 --auth-file users.txt   # on the network, behind a login
"""
import argparse
import ipaddress
import sys
import threading
from pathlib import Path

import gradio as gr

import dataset
from cli import DataError, UserError, non_negative_int, parse_device, positive_int, run_cli
from model import LENGTHS
from storyteller import DEFAULTS, STRATEGIES, Storyteller, add_quantize_arg, can_stream
from streaming import StoryStreamer, in_background

SAMPLES = Path(__file__).resolve().parent / "data" / "images"
MAX_STORIES = 5
MIN_LENGTH = 8
TEMPERATURES = (0.1, 2.0)
NO_UPLOAD = "Upload an image, drop one here, or pick a sample first."


def port_number(value):
    n = int(value)
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [1, 65535], got {value}")
    return n


def read_auth_file(path) -> list[tuple[str, str]]:
    """--auth-file: one user:password per line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: auth file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read the auth file ({getattr(err, 'strerror', None) or err})") from None
    users, problems = [], []
    for number, line in enumerate(lines, start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            user, colon, password = line.partition(":")
            if colon and user.strip() and password:
                users.append((user.strip(), password))
            else:  # the line itself may hold a password: say what is wrong, never echo it
                problems.append(f"{path}:{number}: expected user:password (a name, a colon, a password)")
    if problems:
        raise DataError(problems)
    if not users:
        raise UserError(f"{path}: no user:password lines; add one per user")
    return users


def auth_pair(value) -> tuple[str, str]:
    user, colon, password = value.partition(":")
    if not (colon and user.strip() and password):
        raise argparse.ArgumentTypeError("expected USER:PASSWORD")
    return user.strip(), password


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may well resolve to a network address
        return False


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="vlm_model.pt", help="checkpoint written by train.py (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to serve on; 0.0.0.0 opens the page to your network (default: %(default)s)")
    p.add_argument("--port", type=port_number, default=7860, help="port to serve on (default: %(default)s)")
    p.add_argument("--device", type=parse_device, default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    add_quantize_arg(p)
    p.add_argument("--max-image-pixels", type=non_negative_int,
                   help="refuse larger uploads, a guard against decompression bombs; 0 = no limit (default: Pillow's, about 89 million)")
    p.add_argument("--auth", type=auth_pair, action="append", metavar="USER:PASSWORD",
                   help="ask for this user and password before the page and its API; may be repeated "
                        "(the password shows in `ps` and shell history: --auth-file avoids that)")
    p.add_argument("--auth-file", metavar="FILE", help="users who may log in, one user:password per line")
    p.add_argument("--max-file-size", type=positive_int, default=20_000_000, metavar="BYTES",
                   help="largest upload accepted (default: %(default)s, 20 MB)")
    p.add_argument("--concurrency", type=positive_int, default=8,
                   help="requests decoded at once, together in one batch (default: %(default)s)")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests that may wait for their turn; more are refused at once (default: %(default)s)")
    return p.parse_args(argv)


class Batcher:
    """Requests that arrive while the model is busy are decoded together, in one generate call.

    Each request's own thread (gradio runs up to --concurrency at once) waits while its request is
    decoded with the oldest waiting requests of the same settings, up to max_batch, in one batch.
    The thread in serve() decodes them all if one is there (app.py's main thread, for as long as the
    page is up); else whichever waiting thread finds the model free does. A failure fails only that
    batch, and every thread returns its own result, so a slow or broken request never holds up the
    others' answers for long. A request's on_text, if given, is called with its stories' text as it
    is decoded (decode says how), in the decoding thread."""

    def __init__(self, decode, max_batch: int):
        self.decode, self.max_batch = decode, max_batch  # decode(settings, [items], [on_text]) -> [[stories], ...]
        self.ready = threading.Condition()
        self.waiting = []  # [settings, item, result, error, done, on_text] of requests not yet decoded; an item
        # is an image or an album (a list of images), which Storyteller.stories decodes in one batch alike
        self.busy = False
        self.serving = False

    def __call__(self, settings: tuple, image, on_text=None):
        mine = [settings, image, None, None, False, on_text]
        with self.ready:
            self.waiting.append(mine)
            self.ready.notify_all()  # serve() waits for work
        while True:
            with self.ready:
                while (self.busy or self.serving) and not mine[4]:
                    self.ready.wait()
                if mine[4]:
                    break
                batch = self._take(settings)
            self._decode(batch)
        if mine[3] is not None:
            raise mine[3]
        return mine[2]

    def serve(self):
        """Decodes every request from now on in this thread, the oldest request's batch first, until
        the process ends. app.py runs it in its main thread, which loaded the model: PyTorch's
        OpenMP threads slow every other thread's int8 decoding down (an int8 story took 1.8x as long
        in the page's request threads; docs/webapp.md), so all of it is done in one."""
        with self.ready:
            self.serving = True
        while True:
            with self.ready:
                while self.busy or not self.waiting:
                    self.ready.wait()
                batch = self._take(self.waiting[0][0])
            self._decode(batch)

    def _take(self, settings: tuple) -> list:
        """The oldest waiting requests with these settings, up to max_batch (self.ready held)."""
        self.busy = True
        batch = [r for r in self.waiting if r[0] == settings][:self.max_batch]
        for r in batch:
            self.waiting.remove(r)
        return batch

    def _decode(self, batch: list) -> None:
        try:
            results, error = self.decode(batch[0][0], [r[1] for r in batch], [r[5] for r in batch]), None
        except Exception as err:
            results, error = [None] * len(batch), err
        with self.ready:
            for r, result in zip(batch, results):
                r[2:] = [result, error, True]
            self.busy = False
            self.ready.notify_all()


class WebStoryteller:
    """The model behind the page, loaded once (storyteller.Storyteller), its Batcher, and the
    page's Generate button."""

    def __init__(self, checkpoint, device="auto", max_batch=1, quantize_method="none"):
        self.teller = Storyteller(checkpoint, device, quantize=quantize_method)
        self.model, self.styles, self.room = self.teller.model, self.teller.styles, self.teller.room
        self.batcher = Batcher(self.decode, max_batch)

    def decode(self, settings: tuple, items: list, on_texts=None) -> list[tuple[list[str], list | None]]:
        """Stories for several RGB PIL images or albums (lists of them), all with the same settings (see
        stories), each with its picture's tags (None for a model without tags). on_texts: for each item,
        None or on_text(k, text), called with the new text of its story k as it is decoded (not with
        beam search, which transformers cannot stream: its stories come only whole)."""
        style, strategy, temperature, max_new_tokens, num_stories, length = settings
        gen_config = self.teller.settings(strategy=strategy, temperature=temperature, max_new_tokens=max_new_tokens,
                                          num_stories=num_stories)
        streaming = {}
        if any(on_texts or []) and can_stream(gen_config):
            def on(row, text):  # row k * num_stories + j is item k's story j
                if on_texts[row // num_stories] is not None:
                    on_texts[row // num_stories](row % num_stories, text)
            streaming["streamer"] = StoryStreamer(self.teller.tokenizer, on)
        return list(zip(*self.teller.stories_and_tags(items, gen_config, style, length, **streaming)))

    def told(self, image, style=None, strategy=DEFAULTS["strategy"], temperature=DEFAULTS["temperature"],
             max_new_tokens=DEFAULTS["max_new_tokens"], num_stories=1, length=None,
             on_text=None) -> tuple[list[str], list | None]:
        """Stories about one RGB PIL image, or about an album (a list of them, in order), decoded as
        generate.py does with the same settings (generate.py --album for an album), and the picture's
        tags as the decoder read them: [(name, probability), ...], or None for a model without tags.
        on_text(k, text), if given, gets the new text of story k as it is decoded (see decode)."""
        return self.batcher((style, strategy, temperature, max_new_tokens, num_stories, length), image, on_text)

    def stories(self, image, *settings, **named) -> list[str]:
        """The stories of told."""
        return self.told(image, *settings, **named)[0]

    def settings(self, style, strategy, temperature, max_new_tokens, num_stories, length=None) -> tuple:
        """The page's settings, checked: an API client can send any value, not only the sliders' ones."""
        def number(kind, value, low, high, what):
            try:
                x = kind(value)
            except (TypeError, ValueError, OverflowError):
                x = None
            if x is None or not low <= x <= high or (kind is int and x != float(value)):
                raise gr.Error(f"{what} must be a number in [{low}, {high}], got {str(value)[:40]!r}",
                               print_exception=False)
            return x
        if strategy not in STRATEGIES:
            raise gr.Error(f"Strategy must be one of {', '.join(STRATEGIES)}", print_exception=False)
        if style not in (None, "", *self.styles):
            known = f"this model knows: {', '.join(self.styles)}" if self.styles else "this model has no styles"
            raise gr.Error(f"Unknown style {str(style)[:40]!r}; {known}", print_exception=False)
        temperature = number(float, temperature, *TEMPERATURES, "Temperature")
        if length not in (None, "") and not self.model.config.length_buckets:
            raise gr.Error("This model was trained without length control (train.py --length-control)",
                           print_exception=False)
        if length not in (None, "", *LENGTHS):
            raise gr.Error(f"Length must be one of {', '.join(LENGTHS)}, got {str(length)[:40]!r}", print_exception=False)
        max_new_tokens = number(int, max_new_tokens, MIN_LENGTH, self.room, "Max tokens")
        num_stories = number(int, num_stories, 1, MAX_STORIES, "Stories")
        if strategy == "greedy" and num_stories > 1:
            raise gr.Error("Greedy decoding gives one story; choose sample or beam for several.", print_exception=False)
        return style or None, strategy, temperature, max_new_tokens, num_stories, length or None

    def load(self, upload):
        """The RGB PIL image of an upload's record; one line naming the file by the user's name if unreadable."""
        path = upload["path"]
        name = str(upload.get("orig_name") or Path(path).name)[:200]
        try:
            return self.teller.load_image(path)
        except Exception as err:  # Pillow raises many types for broken files; each gets one line
            # Described by its real path (describe_image_error looks at the file), shown by the user's name.
            message = dataset.describe_image_error(path, err)
            raise gr.Error(name + message[len(path):], print_exception=False) from None

    def on_generate(self, upload, style, strategy, temperature, max_new_tokens, num_stories, album=None,
                    length=None):
        """The Generate button: gradio's record of the uploaded file ({"path", "orig_name", ...}) and
        the settings in, the stories as text out, yielded as they grow while they are decoded (a word
        at a time; with beam search only whole), then the whole text. album: the records of an album's
        files, in upload order, which get one story (and then upload is not used); length: short,
        medium or long, for a model with length control. A problem the user can fix becomes a message
        in the page (gr.Error), not a traceback."""
        def is_upload(record):  # Page checked that every "path" in the request is an upload
            return isinstance(record, dict) and isinstance(record.get("path"), str)
        uploads = album if isinstance(album, list) and album else [upload]
        if not all(is_upload(record) for record in uploads):
            raise gr.Error(NO_UPLOAD, print_exception=False)
        settings = self.settings(style, strategy, temperature, max_new_tokens, num_stories, length)
        if uploads is album:
            try:  # before any image is read: an album longer than the model learned is refused in one line
                self.teller.check_album(len(album), "An album")
            except UserError as err:
                raise gr.Error(str(err), print_exception=False) from None
            item = [self.load(record) for record in album]
        else:
            item = self.load(upload)
        # The Batcher's call runs in a thread of its own, which may decode the batch, while this one
        # hands the page each piece. If the client goes away the thread still ends with its batch, which
        # other requests share, and nothing waits for its pieces.
        grown = [""] * settings[4]
        pieces = in_background(lambda put: self.told(item, *settings, on_text=lambda k, text: put((k, text))))
        try:
            while True:
                k, text = next(pieces)
                grown[k] += text
                yield page_text(grown)
        except StopIteration as done:
            stories, tags = done.value
        except UserError as err:  # e.g. a style this model does not know
            raise gr.Error(str(err), print_exception=False) from None
        yield page_text(stories, tags)

    def text(self, *inputs) -> str:
        """The whole text on_generate(*inputs) ends with, for a caller that need not watch it grow."""
        *_, text = self.on_generate(*inputs)
        return text


def page_text(stories: list[str], tags=None) -> str:
    """The stories as the page shows them (numbered if several) and, for a model with tags, what it saw."""
    text = stories[0] if len(stories) == 1 else "\n\n".join(f"{k}. {s}" for k, s in enumerate(stories, start=1))
    if tags:  # what the model read the picture shows, under the story
        text += "\n\nWhat it saw: " + ", ".join(f"{name} ({p:.0%})" for name, p in tags)
    return text


def file_paths(value):
    """The "path" of every file record ({"path": ..., "meta": ...}) in a request's value, however nested."""
    if isinstance(value, dict):
        if "path" in value:
            yield value["path"]
        for item in value.values():
            yield from file_paths(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from file_paths(item)


class Page(gr.Blocks):
    """The page, which opens only files it was given: a request naming any other file (a path on
    the server typed into an API call) gets the same answer as no upload at all.

    Gradio records every file it receives (POST /gradio_api/upload) or copies into its cache (the
    sample images) in temp_file_sets. Each path in a request (the picture's, and every one of an
    album's) is looked up there by its string before gradio's own handling of the request, which
    would look at the file; nothing here touches it, so a FIFO, a symlink out of the upload folder
    or /etc/passwd is neither opened nor stat'ed."""

    async def preprocess_data(self, block_fn, inputs, state, explicit_call=False):
        if not explicit_call:  # a call from this Python process itself (page.fns[0](...)) is trusted
            if not isinstance(inputs, list) or len(inputs) != len(block_fn.inputs):  # gradio would print a traceback
                raise gr.Error(f"expected {len(block_fn.inputs)} input values, as the page sends", print_exception=False)
            for path in file_paths(inputs):
                if not isinstance(path, str) or not any(path in files for files in self.temp_file_sets):
                    raise gr.Error(NO_UPLOAD, print_exception=False)
            for block, value in zip(block_fn.inputs, inputs):  # e.g. a bare path string, not a file record:
                model = getattr(block, "data_model", None)  # gradio would fail on it with a traceback
                if model is not None and value is not None:
                    try:
                        model.model_validate(value, context={"validate_meta": True})
                    except ValueError:  # pydantic's ValidationError is one
                        raise gr.Error(NO_UPLOAD, print_exception=False) from None
        return await super().preprocess_data(block_fn, inputs, state, explicit_call)


def build_page(teller: WebStoryteller | None, problem: str | None = None) -> gr.Blocks:
    """The page; without a model it only says why (problem), so a browser user learns it too."""
    # analytics_enabled=False: no usage reports and no version check leave this machine.
    with Page(title="image-to-story", analytics_enabled=False) as page:
        if teller is None:
            gr.Markdown(f"# image-to-story\n**The model could not be loaded:** {problem}")
            return page
        config = teller.model.config
        albums, lengths = config.album_slots > 1, bool(config.length_buckets)
        intro = "Upload or drop a picture (or pick a sample below), press **Generate**, read its story."
        if albums:
            intro += (f" Or put up to {config.album_slots} pictures in **Album**, in the order they happen: "
                      "**Generate** then tells one story about them all.")
        gr.Markdown(f"# image-to-story\n{intro}")
        d = DEFAULTS
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"])
                # The ten photos first: what a real-weights model is for. The 33 drawn scenes after them are the
                # tiny preset's toy world, and an ImageNet classifier reads them as "web site" or "ping-pong ball".
                samples = sorted(SAMPLES.glob("*.jpg"), key=lambda p: (not p.name.startswith("photo_"), p.name))
                gr.Examples([str(p) for p in samples], inputs=image, examples_per_page=12, label="Sample images")
                # Files chosen at once arrive in the order chosen; more can be added after them, and
                # dragged into another order (allow_reordering). The list shows the order told.
                album = gr.File(file_count="multiple", file_types=["image"], type="filepath", visible=albums,
                                allow_reordering=True, elem_id="album",
                                label=f"Album: up to {config.album_slots} pictures, in story order")
            with gr.Column():
                style = gr.Dropdown([("none", "")] + [(s, s) for s in teller.styles], value="", label="Style",
                                    visible=bool(teller.styles))
                strategy = gr.Radio(STRATEGIES, value=d["strategy"], label="Strategy",
                                    info="sample: varied; beam and greedy: the most likely words")
                temperature = gr.Slider(0.1, 2.0, value=d["temperature"], step=0.05, label="Temperature",
                                        info="sample only: higher is wilder")
                max_tokens = gr.Slider(MIN_LENGTH, teller.room, value=min(d["max_new_tokens"], teller.room), step=1,
                                       label="Max tokens", info="most new tokens per story")
                length = gr.Radio(LENGTHS, value="medium" if lengths else None, label="Story length",
                                  visible=lengths, info="as learned from the training stories")
                count = gr.Slider(1, MAX_STORIES, value=1, step=1, label="Stories", info="sample or beam")
                button = gr.Button("Generate", variant="primary")
                output = gr.Textbox(label="Stories", lines=8, interactive=False, elem_id="stories")
        # preprocess=False: the handler gets the uploaded file unopened. gr.Image's own preprocessing
        # opens it with Pillow, and a file that is not an image would fail there with no clear message.
        # concurrency_limit="default": as many at once as page.queue(default_concurrency_limit=...) says.
        # A model without albums or length control keeps the six inputs API clients already send.
        extra = [album, length] if albums or lengths else []
        button.click(teller.on_generate, [image, style, strategy, temperature, max_tokens, count, *extra], output,
                     preprocess=False, concurrency_limit="default")
    return page


def main(argv=None):
    args = parse_args(argv)
    dataset.set_max_image_pixels(args.max_image_pixels)
    users = (args.auth or []) + (read_auth_file(args.auth_file) if args.auth_file else [])
    if not users and not is_loopback(args.host):
        print(f"warning: serving on {args.host} without --auth: anyone who can reach this machine can use the "
              f"page and its API; add --auth-file FILE (one user:password per line)", file=sys.stderr)
    try:
        teller, problem = WebStoryteller(args.checkpoint, args.device, max_batch=args.concurrency,
                                      quantize_method=args.quantize), None
    except UserError as err:  # still serve the page: whoever opens it is told what is wrong
        teller, problem = None, str(err)
        print(f"error: {problem}", file=sys.stderr)
    page = build_page(teller, problem)
    # One worker thread per request decoded at once (the Batcher puts them in one batch); more wait in
    # the queue, up to --max-queue, and a request beyond that is refused at once with "Queue is full".
    page.queue(default_concurrency_limit=args.concurrency, max_size=args.max_queue)
    try:
        # Gradio 6's default theme uses fonts shipped with gradio, so the page fetches nothing from the internet.
        page.launch(server_name=args.host, server_port=args.port, share=False, allowed_paths=[str(SAMPLES)],
                    auth=users or None, max_file_size=args.max_file_size, prevent_thread_lock=True)
    except OSError as err:
        reason = str(err).split(". ")[0]  # gradio's advice after the first sentence names its own parameters
        raise UserError(f"cannot serve on {args.host}:{args.port} ({reason}); choose another --port") from None
    try:  # the server runs in gradio's threads; this one decodes (Batcher.serve) or waits for Ctrl-C
        teller.batcher.serve() if teller else page.block_thread()
    finally:
        page.close()


if __name__ == "__main__":
    run_cli(main)
