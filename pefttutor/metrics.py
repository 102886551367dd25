"""Evaluation metrics, as pure functions of predictions and gold data.

* Classification: `accuracy`, `macro_f1` (implemented here; they agree with scikit-learn's
  `accuracy_score` and `f1_score(average="macro")`, which the tests check).
* Generation: `bleu` (corpus BLEU from `sacrebleu`, multi-reference) and `rouge_l` (ROUGE-L F1 from
  Google's `rouge-score`, best reference per hypothesis). Both on a 0-100 scale, like the E2E NLG
  Challenge reports them.
* Uncertainty: `bootstrap_se`, the standard error of any of them over the test items.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence

import sacrebleu
from rouge_score import rouge_scorer


def _check_lengths(a: Sequence, b: Sequence, what: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{what}: {len(a)} vs {len(b)} items")
    if len(a) == 0:
        raise ValueError(f"{what}: empty input")


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of positions where `preds[i] == labels[i]` (0-1)."""
    _check_lengths(preds, labels, "accuracy")
    return sum(int(p) == int(y) for p, y in zip(preds, labels)) / len(labels)


def per_class_f1(preds: Sequence[int], labels: Sequence[int], classes: Sequence[int] | None = None) -> dict[int, float]:
    """F1 of each class (one-vs-rest). A class never predicted and never present scores 0."""
    _check_lengths(preds, labels, "f1")
    preds, labels = [int(p) for p in preds], [int(y) for y in labels]
    if classes is None:
        classes = sorted(set(preds) | set(labels))
    out = {}
    for c in classes:
        tp = sum(p == c and y == c for p, y in zip(preds, labels))
        fp = sum(p == c and y != c for p, y in zip(preds, labels))
        fn = sum(p != c and y == c for p, y in zip(preds, labels))
        out[c] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0  # = 2PR/(P+R)
    return out


def macro_f1(preds: Sequence[int], labels: Sequence[int], classes: Sequence[int] | None = None) -> float:
    """Unweighted mean of per-class F1 (0-1).

    Like `sklearn.metrics.f1_score(labels, preds, average="macro", zero_division=0)`: by default the
    classes are those seen in `labels` or `preds`; pass `classes=range(3)` to always average over 3.
    """
    f1 = per_class_f1(preds, labels, classes)
    return sum(f1.values()) / len(f1)


def _check_refs(hypotheses: Sequence[str], references: Sequence[Sequence[str]], what: str) -> None:
    _check_lengths(hypotheses, references, what)
    if isinstance(references[0], str):
        raise TypeError(f"{what}: references[i] must be a list of reference strings for hypothesis i")
    if any(len(refs) == 0 for refs in references):
        raise ValueError(f"{what}: every hypothesis needs at least one reference")


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0-100) with `sacrebleu.corpus_bleu` and its default 13a tokenisation.

    `references[i]` holds all references of `hypotheses[i]`; their number may vary. sacrebleu wants
    reference *streams* (stream j = j-th reference of every hypothesis), and a `None` in a stream
    means "no j-th reference here" (sacrebleu skips it; an empty string would count as a reference).
    """
    _check_refs(hypotheses, references, "bleu")
    n = max(len(r) for r in references)
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(n)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]], use_stemmer: bool = False) -> float:
    """Mean ROUGE-L F1 (0-100), each hypothesis scored against its best reference.

    Uses `rouge_score.rouge_scorer.RougeScorer(["rougeL"]).score_multi`, which keeps the reference
    with the highest F-measure. Its tokenizer lowercases and keeps only letters and digits.
    """
    _check_refs(hypotheses, references, "rouge_l")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    total = sum(scorer.score_multi(list(refs), hyp)["rougeL"].fmeasure for hyp, refs in zip(hypotheses, references))
    return 100.0 * total / len(hypotheses)


def bootstrap_se(metric: Callable[[Sequence, Sequence], float], predictions: Sequence, gold: Sequence,
                 n_resamples: int = 200, seed: int = 0) -> float:
    """The bootstrap standard error of `metric(predictions, gold)` over the test items.

    Resamples the items with replacement `n_resamples` times (seeded) and returns the standard
    deviation of the metric: how much the score would move on another test set of the same size
    from the same distribution. Works for corpus-level metrics such as BLEU, where a per-item
    formula does not exist (Koehn 2004, "Statistical significance tests for machine translation
    evaluation").
    """
    _check_lengths(predictions, gold, "bootstrap_se")
    rng, n = random.Random(seed), len(predictions)
    scores = []
    for _ in range(n_resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        scores.append(metric([predictions[i] for i in idx], [gold[i] for i in idx]))
    return statistics.stdev(scores)
