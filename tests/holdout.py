"""A hold-out check of what stories are about: photos (and some drawings) of everyday things that no
training data here contains, from Debian's tuxpaint-stamps-default (GPL; each stamp has a one-line
English description), and the fraction of stories that name what each one shows. Not a test: it
makes docs/backbones.md's table ("Keeping the picture in the story").

    apt-get install tuxpaint-stamps-default
    python tests/holdout.py build /tmp/holdout --sample 100   # photos/ and kinds.tsv (all: 386 stamps)
    python generate.py /tmp/holdout/photos --json > told.jsonl
    python tests/holdout.py score told.jsonl /tmp/holdout/kinds.tsv [--ppl weights/smollm2-135m-instruct]

A story names its photo's thing if it says one of the words of the stamp's description (less
adjectives and colours) or of its folder's kind ("pelican", "bird"), or a plural of one; the same
stories scored against the words of a photo of another group must stay rare.
"""
import argparse
import json
import random
import re
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # metrics, imported where used: it brings torch

ROOT = Path("/usr/share/tuxpaint/stamps")
# folder (relative) -> kind words ("" = only the thing's own words)
KINDS = {
 "animals/amphibians": "frog|toad|amphibian", "animals/birds": "bird", "animals/fish": "fish",
 "animals/insects": "insect|bug", "animals/lizards": "lizard|reptile", "animals/mammals": "",
 "animals/mammals/apes": "ape|monkey", "animals/mammals/aquatic": "", "animals/mammals/bears": "bear",
 "animals/mammals/bovines": "cattle", "animals/mammals/camel": "camel", "animals/mammals/cats": "cat|kitten",
 "animals/mammals/deer": "deer", "animals/mammals/dogs": "dog|puppy", "animals/mammals/equines": "horse",
 "animals/mammals/rodents": "rodent", "animals/marsupials": "marsupial", "animals/shellfish": "shellfish",
 "animals/dinosaur": "dinosaur",
 "food/fruit": "fruit", "food/vegetables": "vegetable", "food/nuts": "nut", "food/dessert": "dessert",
 "plants/flowers": "flower|blossom", "plants/trees": "tree", "plants/mushrooms": "mushroom|fungus",
 "household/tools": "tool", "household/dishes": "dish", "household/dishes/utensils": "", "household/arttools": "",
 "household": "", "clothes": "", "clothes/hats": "hat|cap",
 "hobbies/music/brass": "instrument|music", "hobbies/music/percussion": "instrument|drum|music",
 "hobbies/music/string": "instrument|music", "hobbies/music/wind": "instrument|music",
 "vehicles": "vehicle", "vehicles/auto": "car|vehicle", "vehicles/construction": "vehicle|truck",
 "vehicles/cycle": "", "vehicles/emergency": "vehicle|truck", "vehicles/flight": "aircraft|plane",
 "vehicles/flight/planes": "aircraft|plane|airplane", "vehicles/masstransit": "vehicle", "vehicles/race": "car",
 "vehicles/ship": "ship|boat", "sports": "", "town/monuments": "monument", "town/houses": "house|home",
}
STOP = set("""a an the of and or with in on to for its it is was by as at from made put used this that which
its one two pair some small large big little old new baby young sitting standing flying male female adult
whole half slice sliced piece pieces type kind sort variety common wild great albino crowned helmeted magellanic adelaide sports happy cute tall
fat long short tiny giant wooden metal plastic glass fresh ripe round hot cold sweet fancy funny pretty beautiful
french chinese indian american european african asian japanese english spanish canadian australian brazilian
mexican italian german russian greek roman egyptian northern southern eastern western""".split())
COLOURS = set("red green blue yellow orange purple pink brown black white grey gray golden silver dark light striped spotted".split())


def build(out: Path, sample: int | None = None) -> None:
    rows = []
    (out / "photos").mkdir(parents=True, exist_ok=True)
    for folder, kind in KINDS.items():
        for sub in [folder, folder + "/cartoon"]:
            for png in sorted((ROOT / sub).glob("*.png")):
                txt = png.with_suffix(".txt")
                if not txt.exists():
                    continue
                first = re.split(r"[.,;:(]", txt.read_text(encoding="utf-8", errors="replace").splitlines()[0])[0]
                words = {w for w in re.findall(r"[a-z]+", first.lower()) if len(w) > 2 and w not in STOP and w not in COLOURS}
                words |= {w for w in kind.split("|") if w}
                if words:
                    rows.append((png, f"{sub.replace('/', '_')}__{png.name}\t{folder.split('/')[0]}\t{'|'.join(sorted(words))}"))
    if sample:  # a fixed random sample (docs/backbones.md's runs take 100)
        random.Random(1).shuffle(rows)
        rows = sorted(rows[:sample], key=lambda row: row[1])
    for png, row in rows:
        shutil.copy(png, out / "photos" / row.split("\t")[0])
    rows = [row for _, row in rows]
    (out / "kinds.tsv").write_text("\n".join(rows) + "\n")
    print(f"wrote {out}/photos/ and {out}/kinds.tsv: {len(rows)} pictures")


COMPOUND = {"bird", "fish", "bus", "cake", "berry", "flower", "boat"}  # "blackbird" names a bird

def names_it(text, words):
    """The word itself or a plural of it (metrics.plurals) as a word; a compound ending in it for a few kind words."""
    import metrics
    return any(re.search(rf"{'' if w in COMPOUND else chr(92) + 'b'}({'|'.join(map(re.escape, metrics.plurals(w)))})\b",
                         text.lower()) for w in words)



def repetitive(text):
    w = re.findall(r"[a-z']+", text.lower())
    grams = list(zip(w, w[1:], w[2:]))
    return len(grams) != len(set(grams))


def score(stories_file, kinds_file, ppl_model=None) -> None:
    import metrics
    kinds = {}
    for line in open(kinds_file):
        name, group, words = line.rstrip("\n").split("\t")
        kinds[name] = (group, words.split("|"))
    told = {Path(rec["image"]).name: rec for rec in map(json.loads, open(stories_file))}
    names = sorted(n for n in told if n in kinds)
    rng = random.Random(0)
    own = cross = tag_right = told_right = used = 0
    for n in names:
        group, words = kinds[n]
        story, tags = told[n]["story"], [t["name"] for t in told[n].get("tags", [])]
        hit = names_it(story, words)
        other = rng.choice([m for m in kinds if kinds[m][0] != group])  # a photo of another group
        own, cross = own + hit, cross + names_it(story, kinds[other][1])
        right = bool(tags) and names_it(" ".join(tags), words)
        tag_right, told_right, used = tag_right + right, told_right + (right and hit), used + metrics.names_a_tag(story, tags)
    N = len(names)
    print(f"{N} pictures: the story names its thing or kind {own}/{N} = {own / N:.1%}; "
          f"against another group's picture {cross / N:.1%}")
    if tag_right:
        print(f"the tags name it {tag_right}/{N} = {tag_right / N:.1%}; the story does when they do "
              f"{told_right}/{tag_right} = {told_right / tag_right:.1%}; tag use {used}/{N}")
    words = statistics.median(len(told[n]["story"].split()) for n in names)
    print(f"repetitive (a word 3-gram twice): {sum(repetitive(told[n]['story']) for n in names)}/{N}; median words {words}")
    if ppl_model:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok, lm = AutoTokenizer.from_pretrained(ppl_model), AutoModelForCausalLM.from_pretrained(ppl_model).eval()
        with torch.no_grad():
            ppl = [lm(ids, labels=ids).loss.exp().item() for n in names
                   for ids in [tok(told[n]["story"], return_tensors="pt")["input_ids"]] if ids.shape[1] > 1]
        print(f"median perplexity under the plain decoder: {statistics.median(ppl):.2f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("out", type=Path)
    b.add_argument("--sample", type=int, help="only this many pictures, a fixed random sample")
    s = sub.add_parser("score")
    s.add_argument("stories")
    s.add_argument("kinds")
    s.add_argument("--ppl", help="a causal LM folder: median perplexity of the stories under it")
    args = p.parse_args()
    build(args.out, args.sample) if args.command == "build" else score(args.stories, args.kinds, args.ppl)
