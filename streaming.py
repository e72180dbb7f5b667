"""Stories as they are decoded: a streamer for transformers' generate that hands on each story's
text a word at a time, a stop flag generate checks, and a thread to run generate in while its reader
takes the pieces. storyteller.Storyteller.stream and app.py's page use them."""
import queue
import re
import threading

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer


class StoryStreamer(BaseStreamer):
    """Calls on(row, text) with the new text of each row of the batch as generate decodes it, so that
    a row's pieces joined are exactly its story as storyteller.stories_from_features returns it
    (batch_decode with skip_special_tokens, then strip).

    Not transformers' TextIteratorStreamer: it takes a batch of one (the page decodes many stories at
    once) and hands on a token's text as soon as it is letters, which is exact only if decoding more
    tokens never changes text decoded before; a tokenizer's clean_up_tokenization_spaces turns " n" and
    "'t" into "n't". Here each row is decoded whole and handed on up to its last space: the last word
    may still change (a character whose bytes are split across tokens is "\ufffd" until its last byte
    comes), and the story's trailing spaces are stripped only at the end."""

    def __init__(self, tokenizer, on):
        self.tokenizer, self.on = tokenizer, on
        self.special = set(tokenizer.all_special_ids)  # skipped by the decoding: they change no text
        self.ids = self.sent = None  # per row: its story's token ids, and the text handed on

    def put(self, value):
        if self.ids is None:  # generate's first call is with the prompt's ids, (rows, 0) for our prefix of embeddings
            self.ids, self.sent = [[] for _ in range(len(value))], [""] * len(value)
            return
        for row, token in enumerate(value.tolist()):  # (rows,): each row's new token
            if token not in self.special:  # the padding after a story's end among them
                self.ids[row].append(token)
                self.send(row, re.sub(r"\s*\S*$", "", self.text(row)))  # up to the last word

    def end(self):
        for row in range(len(self.ids or [])):
            self.send(row, self.text(row))

    def text(self, row) -> str:
        return self.tokenizer.decode(self.ids[row], skip_special_tokens=True).strip()

    def send(self, row, text):
        if len(text) > len(self.sent[row]):
            self.on(row, text[len(self.sent[row]):])
            self.sent[row] = text


class StopFlag(StoppingCriteria):
    """Ends generate at its next token once set(), from any thread: a reader that stopped reading."""

    def __init__(self):
        self.event = threading.Event()

    def set(self):
        self.event.set()

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def in_background(work, stop: StopFlag | None = None, poll: float = 1.0):
    """Runs work(put) in a thread of its own and yields whatever it puts, as it puts it; then returns
    what work returned (`result = yield from in_background(work)`), or raises what it raised, here.

    A reader that stops early (closes the generator) sets stop, if given, and waits the one token it
    takes the thread to see it; without stop the thread finishes its work (the page's batch, which
    other requests share) and its pieces are dropped. The wait for a piece checks every poll seconds
    that the thread is still alive, so nothing here can wait forever."""
    pieces = queue.Queue()  # unbounded: the thread never waits for its reader

    def run():
        try:
            pieces.put(("done", work(lambda piece: pieces.put(("piece", piece)))))
        except BaseException as err:  # handed to the reader, whose thread raises it
            pieces.put(("failed", err))

    thread = threading.Thread(target=run, name="story-decoding", daemon=True)
    thread.start()
    try:
        while True:
            try:
                kind, value = pieces.get(timeout=poll)
            except queue.Empty:
                if thread.is_alive():
                    continue
                kind, value = pieces.get_nowait()  # it put its answer just before it ended
            if kind == "done":
                return value
            if kind == "failed":
                raise value
            yield value
    finally:
        if stop is not None:
            stop.set()
            thread.join()
