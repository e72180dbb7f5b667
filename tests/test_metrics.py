"""Each metric of evaluate.py against small cases worked out by hand (the arithmetic is in the comments)."""
import math

import pytest
import torch

import metrics

L = math.log(2)  # idf of an n-gram found in the references of 1 of 2 images: log(2 images) - log(1)


def test_words_lowercase_and_drop_punctuation():
    assert metrics.words("The dog's ball, again!") == ["the", "dog's", "ball", "again"]


def test_bleu4_uses_every_reference_of_each_image():
    hyps = ["the cat sat on the mat", "a dog runs"]
    refs = [["the cat sat on the mat"], ["a dog runs fast", "a dog runs"]]
    # Every n-gram of both hypotheses is in a reference: 1-grams 9/9, 2-grams 7/7, 3-grams 5/5, 4-grams 3/3.
    # Closest reference lengths 6 + 3 = 9 = hypothesis length, so no brevity penalty: BLEU = 100.
    assert metrics.bleu4(hyps, refs) == pytest.approx(100.0)
    # Had only the first reference of each image been used ("a dog runs fast", 4 words): reference length
    # 10 > 9, brevity penalty exp(1 - 10/9) = 0.8948.
    assert metrics.bleu4(hyps, [["the cat sat on the mat"], ["a dog runs fast"]]) == pytest.approx(89.48, abs=0.01)


def test_rouge_l_best_precision_and_best_recall_with_beta_1_2():
    hyp = "the cat sat on the mat"  # 6 words
    # "the cat sat": LCS 3 -> P = 3/6, R = 3/3; F = (1 + 1.44) * 0.5 * 1 / (1 + 1.44 * 0.5) = 1.22 / 1.72
    assert metrics.rouge_l(hyp, ["the cat sat"]) == pytest.approx(1.22 / 1.72)
    # Adding "the cat is on the mat": LCS 5 ("the cat on the mat") -> P = 5/6, R = 5/6. The best P (5/6)
    # and the best R (1, from the first reference) combine: 2.44 * 5/6 / (1 + 1.44 * 5/6) = 0.92424
    assert metrics.rouge_l(hyp, ["the cat sat", "the cat is on the mat"]) == pytest.approx(2.44 * 5 / 6 / (1 + 1.2))
    assert metrics.rouge_l("red boat", ["a house"]) == 0.0
    assert metrics.lcs_length("abcbdab", "bdcaba") == 4  # the textbook example: "bcba"


def test_cider_d_tf_idf_over_the_reference_corpus():
    # Two images. "a" is in both images' references: idf = log 2 - log 2 = 0. "cat", "dog", "a cat",
    # "a dog" are in one: idf = L. "bird" and "a bird" are in none: idf = log 2 - log(max(1, 0)) = L.
    # Image 1, "a cat" vs "a cat": 1-grams {a: 0, cat: L} on both sides -> cosine 1; 2-grams {a cat: L}
    # -> cosine 1; no 3- or 4-grams -> 0. Same length -> no penalty. 10 * (1 + 1 + 0 + 0) / 4 = 5.
    # Image 2, "a bird" vs "a dog": the only shared n-gram, "a", weighs 0 -> 0.
    assert metrics.cider_d(["a cat", "a bird"], [["a cat"], ["a dog"]]) == pytest.approx([5.0, 0.0])


def test_cider_d_clips_repeats_and_penalises_length():
    # Image 1: "cat cat" vs "the cat sat". Hypothesis 1-grams {cat: 2L}, norm 2L; reference {the: 0, cat: L,
    # sat: L}, norm sqrt(2) L. Clipped dot: min(2L, L) * L = L^2 -> cosine 1 / (2 sqrt 2) = 0.35355 (without
    # the clipping it would be twice that). "cat cat" is in no reference and "the cat", "cat sat" are not in
    # the hypothesis: 2-gram cosine 0; no 3-grams in the hypothesis: 0. Lengths (in bigrams) 1 and 2:
    # penalty exp(-1 / (2 * 6^2)) = 0.98621. Score 10 * 0.35355 * 0.98621 / 4 = 0.87169.
    # Image 2: "the dog" vs "the dog": 1-gram and 2-gram cosines 1 -> 10 * 2 / 4 = 5.
    scores = metrics.cider_d(["cat cat", "the dog"], [["the cat sat"], ["the dog"]])
    assert scores == pytest.approx([10 * (1 / (2 * math.sqrt(2))) * math.exp(-1 / 72) / 4, 5.0])
    assert scores[0] == pytest.approx(0.87169, abs=1e-5)


def test_cider_d_averages_over_references():
    # Image 1 has two references: "a cat" (cosines 1, 1 -> 10 * 2 / 4 = 5) and "the dog" (no shared n-gram -> 0).
    # df: a: 1, cat: 1, the: 2 (both images), dog: 2; the average over the references is (5 + 0) / 2 = 2.5.
    assert metrics.cider_d(["a cat", "the dog"], [["a cat", "the dog"], ["the dog"]])[0] == pytest.approx(2.5)


def test_distinct_n():
    texts = ["a cat a dog", "a cat"]
    # 1-grams: a cat a dog a cat -> 6 in all, 3 distinct (a, cat, dog) -> 0.5
    assert metrics.distinct_n(texts, 1) == 0.5
    # 2-grams: (a cat) (cat a) (a dog) (a cat) -> 4 in all, 3 distinct -> 0.75
    assert metrics.distinct_n(texts, 2) == 0.75
    assert metrics.distinct_n(["one"], 2) == 0.0


def test_consistency_ranks_compare_stories_with_their_average_likelihood():
    # Story 0 is easy under every image (loss 1 and 2), story 1 is hard (5 and 4). By raw likelihood
    # image 1 would prefer story 0 (loss 2 < 4) to its own. Relative to each story's average:
    # log mean_k p(s0 | k) = log((e^-1 + e^-2) / 2) = -1.3799, log mean_k p(s1 | k) = log((e^-5 + e^-4) / 2) = -4.3799.
    # Image 1: s0 -> -2 + 1.3799 = -0.6201, s1 -> -4 + 4.3799 = 0.3799: its own story wins, rank 1.
    # Image 0: s0 -> -1 + 1.3799 = 0.3799, s1 -> -5 + 4.3799 = -0.6201: rank 1.
    nll = torch.tensor([[1.0, 5.0], [2.0, 4.0]])
    assert metrics.consistency_ranks(nll, owner=[0, 1]) == [1, 1]
    # Swapping which image owns which story puts both last: rank 2 of 2.
    assert metrics.consistency_ranks(nll, owner=[1, 0]) == [2, 2]
    # Two stories of image 0 and one of image 1: each story competes only with the other image's stories.
    nll = torch.tensor([[1.0, 1.0, 3.0], [3.0, 3.0, 1.0]])
    assert metrics.consistency_ranks(nll, owner=[0, 0, 1]) == [1, 1, 1]
