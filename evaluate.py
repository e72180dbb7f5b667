"""Scores a model trained by train.py on a stories file, and draws what it makes.

    python evaluate.py --checkpoint vlm_model.pt --images data/images --stories data/stories.txt
    python evaluate.py --strategy beam --out metrics.json --sheet sheet.png --curves curves.png

Writes a story for every image in the stories file (with generate.py's decoding flags) and reports:
the loss and perplexity of the reference stories under the model; BLEU-4, ROUGE-L and CIDEr-D of
the generated stories against all the references of their image; their diversity; whether the model
prefers each image's own stories to the other images' stories; and CLIPScore when CLIP weights are
on this machine. Prints a table and writes the numbers and the stories to --out as JSON.
An album line (a.jpg|b.jpg<TAB>story) is one item: one story about its images, scored as a whole.
"""
import argparse
import contextlib
import json
import math
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import dataset
import metrics
from cli import UserError, non_negative_int, parse_device, positive_int, run_cli
from figures import draw_curves, draw_sheet, read_metrics_log
from files import atomic_write
from dataset import ALBUM
from storyteller import (Storyteller, add_decoding_args, add_quantize_arg, check_decoding_args, decoding, encode_albums,
                         read_tags, tag_prompts, tags_json)
from training import metrics_path

CLIP_DEFAULT = "openai/clip-vit-base-patch32"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="vlm_model.pt", help="checkpoint written by train.py (default: %(default)s)")
    p.add_argument("--images", default="data/images", help="folder the image names are relative to (default: %(default)s)")
    p.add_argument("--stories", default="data/stories.txt",
                   help="image_name<TAB>story lines: the images (or albums, a.jpg|b.jpg) to write about and their "
                        "reference stories (default: %(default)s)")
    p.add_argument("--out", default="metrics.json", help="JSON file for the metrics and the generated stories (default: %(default)s)")
    p.add_argument("--sheet", help="also draw a contact sheet PNG: thumbnails with their generated stories")
    p.add_argument("--sheet-images", type=positive_int, default=24,
                   help="images (or albums) on the contact sheet, the first ones of the stories file (default: %(default)s)")
    p.add_argument("--curves", help="also draw the training curves PNG from the checkpoint's metrics log")
    p.add_argument("--metrics-log", help="metrics log written by train.py (default: NAME.metrics.jsonl beside the checkpoint)")
    p.add_argument("--rank-images", type=non_negative_int, default=100,
                   help="images (or albums) in the consistency check, drawn at random; each scores every reference story of "
                        "them all, so the cost grows with the square; 0 = skip (default: %(default)s)")
    p.add_argument("--clip", default=CLIP_DEFAULT,
                   help="CLIP for CLIPScore: a save_pretrained folder or a hub name already in the Hugging Face "
                        "cache; never downloaded, skipped when absent (default: %(default)s)")
    add_decoding_args(p)
    p.add_argument("--style", help="style of the generated stories, for a model trained with a style column "
                                   "(default: no style); reference stories are always scored with their own style")
    # --length (add_decoding_args) likewise sets only the generated stories' length: a reference story is
    # scored with the length bucket of its own token count, as training saw it.
    p.set_defaults(seed=0)  # metrics should repeat: sampling is seeded unless told otherwise
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="images per generate call and stories per scoring pass (default: %(default)s)")
    p.add_argument("--device", type=parse_device, default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    add_quantize_arg(p)
    p.add_argument("--decoder", "--gpt2", dest="decoder",
                   help="where to load a frozen decoder from (a hub name or folder), if not where training took it")
    p.add_argument("--encoder-weights", help="state_dict file of a frozen ResNet-50 or timm encoder, if not where training took it")
    args = p.parse_args(argv)
    check_decoding_args(p, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    log_records = read_metrics_log(args.metrics_log or metrics_path(args.checkpoint)) if args.curves else None
    teller = Storyteller(args.checkpoint, args.device, quantize=args.quantize, decoder=args.decoder,
                         encoder_weights=args.encoder_weights)
    model, tokenizer, device = teller.model, teller.tokenizer, teller.device
    teller.check_style(args.style, args.length)  # refuse an unknown style or length before reading any image
    check_albums(teller, dataset.parse_stories(args.stories)[0], args.stories)  # and albums it cannot tell
    examples = dataset.read_examples(args.stories, args.images, min_side=model.config.resize_size)
    references = {}  # image (or album: the line's whole image field) -> its reference stories, in file order
    for ex in examples:
        references.setdefault(ex.image, []).append(ex.story)
    names = list(references)
    notes = []
    if model.config.styles:
        notes.append(f"the model knows the styles {', '.join(model.config.styles)}; stories were written "
                     + (f"in the style {args.style}" if args.style else "without one (--style picks one)"))
    if model.config.length_buckets:
        notes.append(f"stories were written at the length {args.length or 'medium'} (--length); each reference "
                     f"story is scored with the length of its own token count, as training saw it")
    albums = sum(ALBUM in name for name in names)
    if albums:
        notes.append(f"{albums} of the {len(names)} items are albums: one story each, scored against the "
                     f"references of the whole album")

    # Stories for every image or album, decoded as generate.py does; the features are kept for scoring:
    # one (feature_dim,) row per image for a single-image model, an (images, feature_dim) stack per album.
    room = teller.room
    gen_config = teller.settings(**decoding(args))
    torch.manual_seed(args.seed)
    generated, features, tags = {}, [], {}
    for start in tqdm(range(0, len(names), args.batch_size), desc="generating", leave=False, disable=None):
        chunk = names[start:start + args.batch_size]
        pictures = [[load(args.images, n, model.config.resize_size) for n in name.split(ALBUM)] for name in chunk]
        batch, album_mask = encode_albums(model, pictures)  # (B, D) and None, or (B, S, D) and (B, S)
        read = read_tags(model, pictures, batch, album_mask)  # what the decoder reads each one shows
        tags.update(zip(chunk, read or []))
        generated.update(zip(chunk, teller.from_features(batch, gen_config, args.style, args.length, album_mask, read)))
        batch = batch.float().cpu()
        features += list(batch) if album_mask is None else [row[mask] for row, mask in zip(batch, album_mask.cpu())]

    # The reference stories under the model: loss per token, as train.py's validation loss.
    ids = tokenizer([ex.story for ex in examples], add_special_tokens=False)["input_ids"]
    tokens = [torch.tensor(x[:room - 1] + [tokenizer.eos_token_id]) for x in ids]  # as dataset.StoryDataset
    known = model.config.styles or ()  # a reference in a style the model does not know is scored without one
    styles = torch.tensor([model.config.style_id(ex.style) if ex.style in known else 0 for ex in examples])
    lengths = torch.tensor([model.config.length_bucket(len(x)) for x in ids])  # as dataset.StoryDataset
    row = {name: i for i, name in enumerate(names)}
    # A model with tags reads each picture's tag words before its story, as in training.
    prompts = (tag_prompts(model, tokenizer, torch.stack(features).to(device)) if model.config.tags else None)
    nll, count = story_nll(model, [features[row[ex.image]] for ex in examples], tokens, styles, args.batch_size,
                           device, tokenizer.pad_token_id, lengths,
                           prompts and [prompts[row[ex.image]] for ex in examples])
    loss = float(nll.sum() / count.sum())
    result = {"reference_loss": loss, "perplexity": math.exp(loss)}

    hypotheses = [generated[name][0] for name in names]  # the first story of each image is scored
    refs = [references[name] for name in names]
    result["bleu4"] = metrics.bleu4(hypotheses, refs)
    result["rouge_l"] = 100 * sum(map(metrics.rouge_l, hypotheses, refs)) / len(names)
    result["cider_d"] = 100 * sum(metrics.cider_d(hypotheses, refs)) / len(names)
    if len(names) == 1:
        notes.append("CIDEr-D is 0 for a single image: its n-gram weights come from how many images use them")

    everything = [story for name in names for story in generated[name]]
    result["distinct_1"], result["distinct_2"] = metrics.distinct_n(everything, 1), metrics.distinct_n(everything, 2)
    result["unique_stories"] = len(set(hypotheses)) / len(hypotheses)
    if tags:  # does a story tell of what its picture shows, by the tags' own words
        result["tag_use"] = metrics.tag_use(hypotheses, [[name for name, _ in tags[name]] for name in names])
    if args.num_stories > 1:
        for n in (1, 2):
            result[f"distinct_{n}_within_image"] = sum(metrics.distinct_n(generated[name], n) for name in names) / len(names)
    else:
        notes.append("diversity within an image needs --num-stories 2 or more (with --strategy sample)")

    result["fluency_perplexity"] = fluency(model, tokenizer, everything, args.batch_size, device, notes)
    result.update(consistency(model, features, names, examples, tokens, styles, lengths, args, device,
                              tokenizer.pad_token_id, notes, prompts))
    result["clip_score"] = clip_score(args.clip, args.images, names, hypotheses, args.batch_size, device, notes)

    print_table(result, notes)
    report = {"metrics": result, "notes": notes,
              "settings": {"checkpoint": str(args.checkpoint), "stories": str(args.stories), "images": len(names),
                           "reference_stories": len(examples),
                           "decoding": {k: getattr(gen_config, k) for k in sorted(DECODING_KEYS)},
                           "strategy": args.strategy, "seed": args.seed, "style": args.style, "length": args.length},
              "stories": generated,
              **({"tags": {name: tags_json(read) for name, read in tags.items()}} if tags else {})}
    with atomic_write(args.out) as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    print(f"wrote {args.out}")
    if args.sheet:
        draw_sheet(args.sheet, [(n, generated[n][0]) for n in names[:args.sheet_images]], args.images)
        print(f"wrote {args.sheet}")
    if args.curves:
        draw_curves(args.curves, log_records)
        print(f"wrote {args.curves}")


DECODING_KEYS = {"do_sample", "num_beams", "top_k", "top_p", "temperature", "repetition_penalty",
                 "no_repeat_ngram_size", "max_new_tokens", "num_return_sequences", "tag_bias"}


def load(images_dir, name, min_side):
    return dataset.load_image(Path(images_dir) / name, min_side)  # read_examples opened them all already


def check_albums(teller, examples, stories_path):
    """A UserError naming the first line whose album is longer than the model learned (and how many more)."""
    too_long = [ex for ex in examples if len(ex.images) > teller.model.config.album_slots]
    if not too_long:
        return
    try:
        teller.check_album(len(too_long[0].images), f"{stories_path}:{too_long[0].line}: an album")
    except UserError as err:
        more = len(too_long) - 1
        raise UserError(f"{err}" + (f"; {more} more {'lines name' if more > 1 else 'line names'} too many images" if more else "")) from None


@torch.no_grad()
def fluency(model, tokenizer, stories, batch_size, device, notes) -> float:
    """Perplexity of the written stories under the decoder alone, without any image: low for text the
    language model finds natural. Each story follows the tokenizer's BOS token (GPT-2's: its end-of-text
    token), as text did in pre-training, and is scored up to and including its end token."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = tokenizer(stories, add_special_tokens=False)["input_ids"]
    tokens = [[start] + x + [tokenizer.eos_token_id] for x in ids]
    decoder = model.decoder
    peft = hasattr(decoder, "disable_adapter")  # LoRA adapters not merged (--quantize merges them)
    adapters_off = decoder.disable_adapter() if peft else contextlib.nullcontext()
    if model.config.train_decoder or (model.config.lora and not peft):
        notes.append("fluency is scored by the fine-tuned decoder (a frozen or LoRA-tuned one scores as the plain decoder)")
    total, count = 0.0, 0
    with adapters_off:
        for begin in range(0, len(tokens), batch_size):
            chunk = tokens[begin:begin + batch_size]
            ids = torch.full((len(chunk), max(map(len, chunk))), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, row in enumerate(chunk):
                ids[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), 1
            ids, mask = ids.to(device), mask.to(device)
            logits = decoder(input_ids=ids, attention_mask=mask).logits[:, :-1]
            nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none") * mask[:, 1:]
            total, count = total + nll.sum().item(), count + mask[:, 1:].sum().item()
    return math.exp(total / max(count, 1))


@torch.no_grad()
def story_nll(model, features, tokens, styles, batch_size, device, pad_id, lengths=None, prompts=None):
    """Negative log-likelihood of each story given its features, style id and length bucket, summed
    over its tokens (EOS included), and its token count: (stories,), (stories,). Batched by length.
    features[i]: story i's image, (feature_dim,); or its album, (images, feature_dim), for a model
    of several album slots. lengths: (stories,) length buckets, for a model with length control;
    prompts: each story's tag words (token ids), for a model with tags."""
    nll, count = torch.zeros(len(tokens)), torch.zeros(len(tokens))
    order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids = torch.full((len(idx), max(len(tokens[i]) for i in idx)), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, :len(tokens[i])], mask[r, :len(tokens[i])] = tokens[i], 1
        ids, mask = ids.to(device), mask.to(device)
        rows = [features[i] for i in idx]
        if rows[0].dim() == 1:
            batch, album_mask = torch.stack(rows).to(device), None  # (B, feature_dim)
        else:  # albums of any length, padded as training pads them
            padded = dataset.pad_albums(rows)
            batch, album_mask = padded["features"].to(device), padded["album_mask"].to(device)  # (B, S, D), (B, S)
        style_ids = styles[idx].to(device) if model.config.styles else None
        length_ids = lengths[idx].to(device) if model.config.length_buckets else None
        words = {}
        if prompts is not None:
            prompt_ids, prompt_mask = dataset.left_pad([prompts[i] for i in idx], pad_id)
            words = dict(prompt_ids=prompt_ids.to(device), prompt_mask=prompt_mask.to(device))
        # The prefix (images, style, length, tags) comes first: position P-1+t predicts story token t, P-1 = -T-1.
        logits = model(ids, mask, features=batch, style_ids=style_ids, length_ids=length_ids,
                       album_mask=album_mask, **words).logits[:, -ids.shape[1] - 1:-1]
        token_nll = F.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none") * mask  # (B, T)
        nll[idx], count[idx] = token_nll.sum(1).cpu(), mask.sum(1).float().cpu()
    return nll, count


def consistency(model, features, names, examples, tokens, styles, lengths, args, device, pad_id, notes,
                prompts=None) -> dict:
    """Does the model prefer each image's own reference stories to the other images' stories?
    A random subset of --rank-images images each scores the reference stories of the whole subset.
    Albums rank among the other albums (and images) of the file the same way, each story given the whole album."""
    k = min(args.rank_images, len(names))
    if k < 2:
        notes.append("consistency check skipped: " + ("--rank-images 0" if args.rank_images == 0 else "it needs 2 or more images"))
        return {}
    chosen = sorted(random.Random(0).sample(range(len(names)), k))
    position = {names[i]: p for p, i in enumerate(chosen)}
    stories = [j for j, ex in enumerate(examples) if ex.image in position]
    owner = [position[examples[j].image] for j in stories]
    candidate_tokens, candidate_styles, candidate_lengths = [tokens[j] for j in stories], styles[stories], lengths[stories]
    nll = torch.stack([story_nll(model, [features[i]] * len(stories), candidate_tokens, candidate_styles,
                                 args.batch_size, device, pad_id, candidate_lengths,
                                 prompts and [prompts[i]] * len(stories))[0]
                       for i in tqdm(chosen, desc="consistency", leave=False, disable=None)])  # (images, stories)
    ranks = metrics.consistency_ranks(nll, owner)
    candidates = [1 + sum(o != i for o in owner) for i in owner]  # own story + the other images' stories
    if k < len(names):
        notes.append(f"consistency on {k} of {len(names)} images, drawn at random (--rank-images)")
    return {"consistency_recall_at_1": sum(r == 1 for r in ranks) / len(ranks),
            "consistency_mean_rank": sum(ranks) / len(ranks),
            "consistency_candidates": sum(candidates) / len(candidates)}


@torch.no_grad()
def clip_score(name, images_dir, names, stories, batch_size, device, notes):
    """CLIPScore (Hessel et al., 2021): mean of 2.5 * max(cos(image, "A photo depicts " + story), 0).
    An album's story is scored against each of its images and the album gets the mean: CLIPScore is
    defined for one image, and no single picture stands for an album. Only with CLIP weights already
    on this machine: nothing is downloaded."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel
    how = f"fetch them once with `hf download {CLIP_DEFAULT}` or pass --clip DIR (a CLIPModel saved by save_pretrained)"
    try:
        clip, info = CLIPModel.from_pretrained(name, local_files_only=True, output_loading_info=True)
        clip_tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(name, local_files_only=True)
    except OSError:
        notes.append(f"CLIPScore skipped: no CLIP weights for {name!r} on this machine; {how}")
        return None
    except Exception as err:  # e.g. a vision tower alone, whose sizes do not fit a whole CLIPModel
        notes.append(f"CLIPScore skipped: {name!r} is not a whole CLIP model ({str(err).splitlines()[0][:120]}); {how}")
        return None
    if info["missing_keys"]:  # a text tower filled with random weights would give a meaningless score
        notes.append(f"CLIPScore skipped: {name!r} lacks {len(info['missing_keys'])} of CLIP's weights "
                     f"(a vision tower alone?); {how}")
        return None
    clip = clip.to(device).eval()
    max_length = clip.config.text_config.max_position_embeddings  # CLIP reads 77 tokens: longer stories are cut
    pairs = [(k, image, story) for k, (name, story) in enumerate(zip(names, stories)) for image in name.split(ALBUM)]
    scores = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        pixels = processor(images=[load(images_dir, image, 224) for _, image, _ in chunk], return_tensors="pt")["pixel_values"]
        text = clip_tokenizer(["A photo depicts " + story for _, _, story in chunk], padding=True,
                              truncation=True, max_length=max_length, return_tensors="pt")
        out = clip(pixel_values=pixels.to(device), input_ids=text["input_ids"].to(device),
                   attention_mask=text["attention_mask"].to(device))
        cosine = (out.image_embeds * out.text_embeds).sum(-1)  # both are unit vectors
        scores += (2.5 * cosine.clamp(min=0)).tolist()
    if any(len(clip_tokenizer(s)["input_ids"]) > max_length for s in stories):
        notes.append(f"CLIPScore read only the first {max_length} tokens of longer stories")
    per_item = [[] for _ in names]
    for (k, _, _), score in zip(pairs, scores):
        per_item[k].append(score)
    if len(pairs) > len(names):
        notes.append("CLIPScore of an album: the mean over its images of its story's score against each; a story "
                     "tells each picture only in part, so expect lower scores than for single images")
    return sum(sum(s) / len(s) for s in per_item) / len(per_item)


TABLE = [  # key, label, format
    ("reference_loss", "reference loss per token", "{:.4f}"),
    ("perplexity", "reference perplexity", "{:.2f}"),
    ("bleu4", "BLEU-4", "{:.2f}"),
    ("rouge_l", "ROUGE-L", "{:.2f}"),
    ("cider_d", "CIDEr-D", "{:.2f}"),
    ("distinct_1", "distinct-1, all stories", "{:.3f}"),
    ("distinct_2", "distinct-2, all stories", "{:.3f}"),
    ("distinct_1_within_image", "distinct-1 within an image", "{:.3f}"),
    ("distinct_2_within_image", "distinct-2 within an image", "{:.3f}"),
    ("unique_stories", "unique stories / images", "{:.3f}"),
    ("tag_use", "tag use: stories naming a tag", "{:.3f}"),
    ("fluency_perplexity", "fluency: decoder perplexity, no image", "{:.2f}"),
    ("consistency_recall_at_1", "consistency recall@1", "{:.3f}"),
    ("consistency_mean_rank", "consistency mean rank", "{:.2f}"),
    ("consistency_candidates", "  stories ranked per image", "{:.1f}"),
    ("clip_score", "CLIPScore", "{:.4f}"),
]


def print_table(result, notes):
    width = max(len(label) for _, label, _ in TABLE)
    print(f"{'metric':<{width}}  value")
    for key, label, fmt in TABLE:
        if result.get(key) is not None:
            print(f"{label:<{width}}  {fmt.format(result[key])}")
    for note in notes:
        print(f"note: {note}")
    sys.stdout.flush()


if __name__ == "__main__":
    run_cli(main)
