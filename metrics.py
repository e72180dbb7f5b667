"""Caption and story metrics, offline: BLEU-4 through sacrebleu; ROUGE-L and CIDEr-D in plain
Python as the COCO caption toolkit (tylin/coco-caption, pycocoevalcap) defines them; distinct-n;
the ranks of evaluate.py's image-story consistency check; and the tag-use rate.

ROUGE-L and CIDEr-D compare lowercase words with punctuation dropped (`words`), which is what the
toolkit's Java PTB tokenizer produces for plain English apart from details such as "dog's" (one
word here, "dog 's" there); that tokenization is the only difference from the toolkit's numbers.
"""
import math
import re
from collections import Counter

import torch

WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")


def words(text: str) -> list[str]:
    """'The dog's ball, again!' -> ['the', "dog's", 'ball', 'again']"""
    return WORD.findall(text.lower())


def bleu4(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 (0-100) by sacrebleu, each hypothesis against all the references of its image.

    sacrebleu takes references as streams (stream k holds every image's k-th reference); an image
    with fewer references gets None in the streams it lacks, sacrebleu's way of varying their number.
    """
    from sacrebleu.metrics import BLEU
    streams = [[refs[k] if k < len(refs) else None for refs in references]
               for k in range(max(map(len, references)))]
    return BLEU(lowercase=True).corpus_score(hypotheses, streams).score


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence of two word lists (dynamic programming, one row at a time)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(hypothesis: str, references: list[str], beta: float = 1.2) -> float:
    """ROUGE-L F-measure (0-1) of one hypothesis, as the COCO toolkit computes it: the best LCS
    precision and the best LCS recall over the references (they may come from different ones),
    combined with recall weighted by beta = 1.2."""
    hyp = words(hypothesis)
    precision = recall = 0.0
    for ref in map(words, references):
        lcs = lcs_length(hyp, ref)
        precision = max(precision, lcs / len(hyp) if hyp else 0.0)
        recall = max(recall, lcs / len(ref) if ref else 0.0)
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def ngram_counts(tokens: list[str], n: int = 4) -> Counter:
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def cider_d(hypotheses: list[str], references: list[list[str]], n: int = 4, sigma: float = 6.0) -> list[float]:
    """CIDEr-D of each hypothesis as the COCO toolkit computes it (their mean is the corpus score;
    papers print it x100).

    Each text becomes tf-idf vectors of its 1- to 4-grams, the document frequency of an n-gram
    being the number of images whose references contain it. For each reference: the cosine
    similarity per n-gram order with the hypothesis' weights clipped at the reference's (so
    repeating a word does not pay), times a Gaussian penalty on the length difference (sigma 6).
    The score averages over the orders and the references, times 10.
    """
    ref_counts = [[ngram_counts(words(r), n) for r in refs] for refs in references]
    document_frequency = Counter(gram for refs in ref_counts for gram in set().union(*refs))
    log_images = math.log(len(references))

    def vector(counts):
        """tf-idf weights per n-gram order, their norms, and the length the toolkit uses: it counts
        bigrams (words - 1), which gives the same length differences."""
        weights = [{} for _ in range(n)]
        for gram, tf in counts.items():  # an n-gram no reference has gets the largest idf
            weights[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, document_frequency[gram])))
        norms = [math.sqrt(sum(w * w for w in order.values())) for order in weights]
        length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return weights, norms, length

    def similarity(hyp, ref):
        (hyp_w, hyp_norm, hyp_len), (ref_w, ref_norm, ref_len) = hyp, ref
        penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * sigma**2))
        total = 0.0
        for k in range(n):
            if hyp_norm[k] and ref_norm[k]:
                dot = sum(min(w, ref_w[k].get(g, 0.0)) * ref_w[k].get(g, 0.0) for g, w in hyp_w[k].items())
                total += dot / (hyp_norm[k] * ref_norm[k]) * penalty
        return total / n

    scores = []
    for hypothesis, refs in zip(hypotheses, ref_counts, strict=True):
        hyp = vector(ngram_counts(words(hypothesis), n))
        scores.append(10.0 * sum(similarity(hyp, vector(ref)) for ref in refs) / len(refs))
    return scores


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams / all n-grams over the texts (Li et al., 2016): 1.0 when no n-gram repeats."""
    grams = [tuple(t[i:i + n]) for t in map(words, texts) for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def consistency_ranks(nll: torch.Tensor, owner: list[int]) -> list[int]:
    """Ranks for the image-story consistency check.

    nll[i, j] is the negative log-likelihood of story j given image i; owner[j] is the row of
    story j's own image. A story's log-likelihood is first compared with its average under all the
    images (pointwise mutual information, log p(s|i) - log mean_k p(s|k)), so that a story that is
    likely whatever the image (short, common words) does not win for every image. Returns, for each
    story, its rank under its own image among itself and the other images' stories (1 = best;
    ties count in the story's favour).
    """
    log_p = -nll.double()
    pmi = log_p - (torch.logsumexp(log_p, dim=0) - math.log(nll.shape[0]))  # (images, stories)
    owner = torch.tensor(owner)
    ranks = []
    for j, i in enumerate(owner.tolist()):
        others = owner != i
        ranks.append(1 + int((pmi[i, others] > pmi[i, j]).sum()))
    return ranks


def tag_words(tag: str) -> list[str]:
    """The words that name a tag's thing: the last word of its name and its kind, if it has one
    ("red-breasted merganser (bird)": merganser, bird). A name's first words are often an adjective
    ("red", "American") that a story may say of anything."""
    name, _, kind = tag.partition(" (")
    return [w for w in [*words(name.replace("-", " "))[-1:], *words(kind)] if len(w) >= 3]


def plurals(word: str) -> set[str]:
    """The word and the ways English makes its plural: cats, boxes, strawberries, wolves, knives."""
    forms = {word, word + "s", word + "es"}
    if word.endswith("y") and word[-2:-1] not in set("aeiou"):
        forms.add(word[:-1] + "ies")
    if word.endswith(("f", "fe")):
        forms.add(word.rstrip("e")[:-1] + "ves")
    return forms


def names_a_tag(story: str, tags: list[str]) -> bool:
    """Does the story say one of its picture's tags' words (tag_words), or its plural? "A tabby cat ..."
    and "two cats" both name the tag "tabby cat"."""
    said = set(words(story))
    return any(plurals(w) & said for tag in tags for w in tag_words(tag))


def tag_use(stories: list[str], tags: list[list[str]]) -> float:
    """The fraction of stories that name one of their picture's tags (names_a_tag)."""
    return sum(map(names_a_tag, stories, tags)) / len(stories)
