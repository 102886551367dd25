"""Metrics against hand-computed values and the reference libraries."""

from __future__ import annotations

import random

import pytest
import sacrebleu
from rouge_score import rouge_scorer
from sklearn.metrics import accuracy_score, f1_score

from pefttutor.metrics import accuracy, bleu, bootstrap_se, macro_f1, per_class_f1, rouge_l


def test_accuracy_by_hand():
    assert accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    with pytest.raises(ValueError):
        accuracy([0], [0, 1])
    with pytest.raises(ValueError):
        accuracy([], [])


def test_macro_f1_by_hand():
    # class 0: tp=1 fp=0 fn=1 -> 2/3; class 1: tp=1 fp=1 fn=0 -> 2/3; class 2: tp=1 -> 1
    preds, labels = [0, 1, 1, 2], [0, 0, 1, 2]
    assert per_class_f1(preds, labels) == pytest.approx({0: 2 / 3, 1: 2 / 3, 2: 1.0})
    assert macro_f1(preds, labels) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    # a class in `classes` that never occurs scores 0 and pulls the mean down
    assert macro_f1([0, 0], [0, 0], classes=range(3)) == pytest.approx(1 / 3)


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed):
    rng = random.Random(seed)
    labels = [rng.randrange(3) for _ in range(200)]
    preds = [y if rng.random() < 0.6 else rng.randrange(3) for y in labels]
    if seed == 4:
        preds = [0 if p == 2 else p for p in preds]  # a class never predicted
    assert accuracy(preds, labels) == pytest.approx(accuracy_score(labels, preds))
    assert macro_f1(preds, labels) == pytest.approx(f1_score(labels, preds, average="macro", zero_division=0))


HYPS = ["the cat sat on the mat", "a dog runs in the park", "it is cheap"]
REFS = [["the cat is on the mat", "there is a cat on the mat"], ["a dog is running in the park"],
        ["it is cheap and friendly", "prices are low", "it is inexpensive"]]


def test_bleu_ragged_references_match_sacrebleu_streams():
    streams = [[r[j] if j < len(r) else None for r in REFS] for j in range(3)]
    assert bleu(HYPS, REFS) == pytest.approx(sacrebleu.corpus_bleu(HYPS, streams).score)
    # same number of refs everywhere -> identical to the plain stream call
    two = [r[:1] * 2 for r in REFS]
    assert bleu(HYPS, two) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [[r[0] for r in REFS]]).score)
    assert bleu(["the cat is on the mat"], [["the cat is on the mat"]]) == pytest.approx(100.0)
    # padding with None is not the same as padding with "" (an empty reference changes the brevity penalty)
    empty = [[r[j] if j < len(r) else "" for r in REFS] for j in range(3)]
    assert 0 <= bleu(HYPS, REFS) <= 100 and sacrebleu.corpus_bleu(HYPS, empty).score != pytest.approx(0.0)


def test_bleu_rejects_flat_references():
    with pytest.raises(TypeError):
        bleu(["a b"], ["a b"])
    with pytest.raises(ValueError):
        bleu(["a b"], [[]])


def test_rouge_l_best_reference_by_hand():
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    per_hyp = [max(scorer.score(r, h)["rougeL"].fmeasure for r in refs) for h, refs in zip(HYPS, REFS)]
    assert rouge_l(HYPS, REFS) == pytest.approx(100 * sum(per_hyp) / 3)
    # "it is cheap" vs "it is cheap and friendly": LCS 3, P=1, R=3/5 -> F=0.75, better than
    # "it is inexpensive" (LCS 2, F=2/3) and "prices are low" (F=0)
    assert rouge_l(["it is cheap"], [REFS[2]]) == pytest.approx(75.0)
    assert rouge_l(["The cat, sat."], [["the cat sat"]]) == pytest.approx(100.0)  # lowercased, punctuation dropped


def test_bootstrap_se_of_a_mean_matches_the_formula():
    """For accuracy (a mean of 0/1 items) the bootstrap se approaches sqrt(p (1 - p) / n)."""
    rng = random.Random(1)
    labels = [rng.randrange(2) for _ in range(400)]
    preds = [y if rng.random() < 0.7 else 1 - y for y in labels]
    p = accuracy(preds, labels)
    formula = (p * (1 - p) / len(labels)) ** 0.5
    assert bootstrap_se(accuracy, preds, labels, n_resamples=1000) == pytest.approx(formula, rel=0.1)
    assert bootstrap_se(accuracy, labels, labels) == 0.0  # every resample scores 1.0
    assert bootstrap_se(bleu, HYPS, REFS, seed=3) == bootstrap_se(bleu, HYPS, REFS, seed=3) > 0  # seeded
    with pytest.raises(ValueError):
        bootstrap_se(bleu, HYPS, REFS[:2])
