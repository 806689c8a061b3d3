"""Evaluation metrics and their bootstrap confidence intervals, on example weights.

Every metric here takes per-example values and a weight per example: a segment's metric counts each test
example as often as that segment's users asked it, so the weight is that query count. The weights may be a
matrix ``(B, n)`` — one row per bootstrap resample — and the metric then returns ``(B,)``, which is what makes
1,000 resamples of a macro F1 over 77 labels cost one matrix product instead of 1,000 Python loops.

The bootstrap resamples *examples* (with their weights), not queries: all the queries of one example share
one model answer, so treating them as independent draws would make intervals too narrow.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

Stat = Callable[[np.ndarray], np.ndarray]


def _rows(w: np.ndarray) -> np.ndarray:
    return np.atleast_2d(np.asarray(w, dtype=float))


def weighted_mean(values: np.ndarray, w: np.ndarray) -> np.ndarray:
    """sum(w * values) / sum(w), per row of ``w``; NaN where a row's weights are all zero."""
    w = _rows(w)
    total = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, w @ np.asarray(values, dtype=float) / total, np.nan)


def macro_prf(true_idx: np.ndarray, pred_idx: np.ndarray, n_labels: int, w: np.ndarray,
              label_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted macro precision, recall, F1 over labels ``0..n_labels-1`` (scikit-learn's ``average='macro'``,
    ``zero_division=0``). Index ``-1`` is outside the label set: a prediction there (the model answered something
    that is no label) is wrong for its true label and counts toward no label's precision; a true label there
    counts only as a false positive of whatever label was predicted, as scikit-learn does with ``labels=``."""
    w = _rows(w)
    true_idx, pred_idx = np.asarray(true_idx), np.asarray(pred_idx)
    rows = np.arange(len(true_idx))
    t = np.zeros((len(true_idx), n_labels))
    t[rows[true_idx >= 0], true_idx[true_idx >= 0]] = 1.0
    p = np.zeros_like(t)
    p[rows[pred_idx >= 0], pred_idx[pred_idx >= 0]] = 1.0
    tp, support, predicted = w @ (t * p), w @ t, w @ p          # (B, K) each
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    if label_mask is not None:  # average over these labels only (e.g. those a cell's references contain)
        precision, recall, f1 = precision[:, label_mask], recall[:, label_mask], f1[:, label_mask]
    return precision.mean(axis=1), recall.mean(axis=1), f1.mean(axis=1)


def macro_precision_recall_f1(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str] | None = None,
                              sample_weight: Sequence[float] | None = None) -> tuple[float, float, float]:
    """Label-string front end of :func:`macro_prf`; ``labels`` defaults to every label seen in either list."""
    labels = sorted(set(y_true) | set(y_pred)) if labels is None else list(labels)
    index = {label: i for i, label in enumerate(labels)}
    w = np.ones(len(y_true)) if sample_weight is None else np.asarray(sample_weight, float)
    ti = np.array([index.get(t, -1) for t in y_true], dtype=int)
    pi = np.array([index.get(p, -1) for p in y_pred], dtype=int)
    p, r, f = macro_prf(ti, pi, len(labels), w)
    return float(p[0]), float(r[0]), float(f[0])


def accuracy(y_true: Sequence[str], y_pred: Sequence[str], sample_weight: Sequence[float] | None = None) -> float:
    """Share of (weighted) answers equal to the reference."""
    correct = np.array([a == b for a, b in zip(y_true, y_pred)], dtype=float)
    w = np.ones(len(correct)) if sample_weight is None else np.asarray(sample_weight, float)
    return float(weighted_mean(correct, w)[0])


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_text(text: str) -> str:
    """SQuAD's answer normalization: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalized answers are equal."""
    return float(normalize_text(prediction) == normalize_text(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the bag of normalized tokens (SQuAD): partial credit for partly right free text."""
    pred, ref = normalize_text(prediction).split(), normalize_text(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def mean_loss(nll_sum: np.ndarray, n_tokens: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mean token negative log-likelihood of the references: each example's tokens weighted by its queries."""
    w = _rows(w)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w @ np.asarray(nll_sum, float)) / (w @ np.asarray(n_tokens, float))


def perplexity(nll_sum: np.ndarray, n_tokens: np.ndarray, w: np.ndarray) -> np.ndarray:
    """exp(mean token loss)."""
    return np.exp(mean_loss(nll_sum, n_tokens, w))


def resample_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) how often each of ``n`` examples is drawn in each resample (with replacement)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float)


def bootstrap_weights(w: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) example weights of ``n_boot`` resamples of the examples, each keeping its own weight ``w``."""
    w = np.asarray(w, float)
    return resample_counts(len(w), n_boot, seed) * w


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of the finite bootstrap values; (NaN, NaN) when none is finite."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    tail = (100 - level * 100) / 2  # 2.5 exactly for 0.95 ((1 - 0.95) / 2 * 100 is 2.500000000000002)
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_ci(stat: Stat, w: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
                 ) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` (a function of example weights) over resampled examples."""
    return percentile_interval(stat(bootstrap_weights(w, n_boot, seed)), level)


def paired_bootstrap_delta(stat_a: Stat, stat_b: Stat, w: np.ndarray, n_boot: int = 1000, seed: int = 0,
                           level: float = 0.95) -> tuple[float, float, float]:
    """``stat_b - stat_a`` on the same examples and its interval: both models see the same resamples, so the
    example-to-example spread they share cancels (a paired test, not two overlapping intervals)."""
    w = np.asarray(w, float)
    delta = float(stat_b(w[None, :])[0] - stat_a(w[None, :])[0])
    counts = bootstrap_weights(w, n_boot, seed)
    return (delta, *percentile_interval(stat_b(counts) - stat_a(counts), level))
