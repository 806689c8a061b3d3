"""Metric functions against hand-computed values and scikit-learn; bootstrap intervals reproducible and near
their nominal coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from adaptive_ft.metrics import (
    accuracy,
    bootstrap_ci,
    exact_match,
    macro_precision_recall_f1,
    mean_loss,
    paired_bootstrap_delta,
    percentile_interval,
    perplexity,
    token_f1,
    weighted_mean,
)

Y_TRUE = ["a", "a", "a", "b", "b", "c"]
Y_PRED = ["a", "a", "b", "b", "c", "c"]


def test_macro_prf_by_hand():
    # a: tp 2, predicted 2, support 3 -> P 1, R 2/3, F1 0.8
    # b: tp 1, predicted 2, support 2 -> P 1/2, R 1/2, F1 1/2
    # c: tp 1, predicted 2, support 1 -> P 1/2, R 1, F1 2/3
    p, r, f = macro_precision_recall_f1(Y_TRUE, Y_PRED)
    assert p == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert r == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert f == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert accuracy(Y_TRUE, Y_PRED) == pytest.approx(4 / 6)


CASES = [
    (Y_TRUE, Y_PRED, None, None),
    (Y_TRUE, Y_PRED, None, [1, 2, 3, 1, 5, 2]),                       # query counts as weights
    (["x", "y", "y", "z"], ["x", "garbage", "y", "y"], ["x", "y", "z"], None),   # answer outside the labels
    (["x", "y", "q", "z"], ["x", "y", "y", "w"], ["x", "y", "z"], [2, 1, 4, 1]),  # true label outside too
    (["x"] * 5, ["y"] * 5, ["x", "y"], None),                          # zero division -> 0
]


@pytest.mark.parametrize("y_true,y_pred,labels,weights", CASES)
def test_macro_prf_matches_sklearn(y_true, y_pred, labels, weights):
    ours = macro_precision_recall_f1(y_true, y_pred, labels=labels, sample_weight=weights)
    theirs = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0,
                                             sample_weight=weights)[:3]
    assert ours == pytest.approx(theirs)
    assert accuracy(y_true, y_pred, weights) == pytest.approx(accuracy_score(y_true, y_pred, sample_weight=weights))


def test_random_cases_match_sklearn():
    rng = np.random.default_rng(3)
    for _ in range(20):
        labels = [f"l{i}" for i in range(rng.integers(2, 8))]
        y_true = list(rng.choice(labels, 40))
        y_pred = list(rng.choice(labels + ["junk"], 40))
        w = rng.integers(1, 6, 40).tolist()
        ours = macro_precision_recall_f1(y_true, y_pred, labels=labels, sample_weight=w)
        theirs = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0,
                                                 sample_weight=w)[:3]
        assert ours == pytest.approx(theirs)


def test_exact_match_and_token_f1_by_hand():
    assert exact_match("The Card arrived!", "card arrived") == 1.0
    assert exact_match("card arrived late", "card arrived") == 0.0
    # pred {card, has, not, arrived}, ref {my, card, has, arrived}: 3 common -> P 3/4, R 3/4, F1 3/4
    assert token_f1("card has not arrived", "my card has arrived") == pytest.approx(0.75)
    assert token_f1("nothing in common", "card") == 0.0
    assert token_f1("", "") == 1.0


def test_loss_and_perplexity_weight_tokens_by_queries():
    nll, ntok = np.array([2.0, 6.0]), np.array([1, 3])
    # example 2 asked twice: (2 + 2*6) / (1 + 2*3) = 2
    assert mean_loss(nll, ntok, np.array([1, 2]))[0] == pytest.approx(2.0)
    assert perplexity(nll, ntok, np.array([1, 2]))[0] == pytest.approx(math.e ** 2)
    assert weighted_mean(np.array([1.0, 0.0]), np.array([3, 1]))[0] == pytest.approx(0.75)


def test_percentile_interval_by_hand():
    # 1001 values 0..1000: the 2.5th and 97.5th percentiles are 25 and 975 exactly; non-finite values are dropped
    values = np.concatenate([np.arange(1001.0), [np.nan, np.inf]])
    assert percentile_interval(values) == (25.0, 975.0)
    assert percentile_interval(values, level=0.9) == (50.0, 950.0)
    assert all(math.isnan(v) for v in percentile_interval(np.array([np.nan])))


def test_bootstrap_is_reproducible_for_a_seed():
    rng = np.random.default_rng(0)
    correct = rng.random(100) < 0.7
    w = rng.integers(1, 5, 100)

    def stat(weights):
        return weighted_mean(correct, weights)

    assert bootstrap_ci(stat, w, 500, seed=7) == bootstrap_ci(stat, w, 500, seed=7)
    assert bootstrap_ci(stat, w, 500, seed=7) != bootstrap_ci(stat, w, 500, seed=8)
    low, high = bootstrap_ci(stat, w, 500, seed=7)
    assert low < stat(w[None, :])[0] < high


def test_bootstrap_covers_the_true_accuracy_at_about_the_nominal_rate():
    # 300 simulated test sets of 150 examples from a model with true accuracy 0.7; each example asked 1-4
    # times (weights independent of correctness, so the weighted population value is still 0.7).
    rng = np.random.default_rng(42)
    hits, trials = 0, 300
    for i in range(trials):
        correct = rng.random(150) < 0.7
        w = rng.integers(1, 5, 150)
        low, high = bootstrap_ci(lambda weights: weighted_mean(correct, weights), w, 400, seed=i)
        hits += low <= 0.7 <= high
    coverage = hits / trials
    # Binomial sd of the coverage estimate at 0.95 over 300 trials is ~0.013; allow ~3 sd on each side.
    assert 0.91 <= coverage <= 0.99, coverage


def test_paired_delta_detects_a_real_drop_and_not_a_null_one():
    rng = np.random.default_rng(1)
    base = rng.random(400) < 0.8
    worse = base & (rng.random(400) < 0.85)  # loses ~15% of base's right answers
    w = rng.integers(1, 4, 400)
    delta, low, high = paired_bootstrap_delta(lambda x: weighted_mean(base, x), lambda x: weighted_mean(worse, x), w,
                                              500, seed=0)
    assert delta < 0 and high < 0
    same = paired_bootstrap_delta(lambda x: weighted_mean(base, x), lambda x: weighted_mean(base, x), w, 200, 0)
    assert same == (0.0, 0.0, 0.0)
