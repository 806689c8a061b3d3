"""Ranking metrics: exact values by hand, and agreement with implicit's own evaluation where definitions agree."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from adaptive_ft.prioritize.metrics import (
    evaluate_recommender,
    per_user_metrics,
    popularity_recs,
    summarize,
    time_split,
    top_k_unseen,
)


def _csr(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    r = [u for u, items in enumerate(rows) for _ in items]
    c = [i for items in rows for i in items]
    return sp.csr_matrix((np.ones(len(c), dtype=np.float32), (r, c)), shape=(len(rows), n_items))


def test_metrics_match_hand_computed_values():
    # user 0 held out {1, 4}, recommended [1, 2, 4]: hits at ranks 1 and 3
    # user 1 held out {5}, recommended [0, 3, none]: no hit
    test = _csr([[1, 4], [5]], 6)
    recs = np.array([[1, 2, 4], [0, 3, -1]])
    pu = per_user_metrics(recs, test, np.array([0, 1]), k=3)
    out = summarize(pu, recs, n_items=6)
    ndcg0 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert out["precision"] == pytest.approx((2 / 3 + 0) / 2)
    assert out["recall"] == pytest.approx((1 + 0) / 2)
    assert out["ndcg"] == pytest.approx(ndcg0 / 2)
    assert out["map"] == pytest.approx(((1 / 1 + 2 / 3) / 2 + 0) / 2)
    # implicit's precision: all hits / sum of min(k, |held-out|) = 2 / (2 + 1), not the mean of hits / k
    assert out["implicit_precision"] == pytest.approx(2 / 3)
    assert out["coverage"] == pytest.approx(5 / 6)
    assert out["users"] == 2


def test_precision_definitions_differ_when_few_items_are_relevant():
    # one relevant item found at rank 1 with k=3: usual precision 1/3, implicit's 1/min(3, 1) = 1
    pu = per_user_metrics(np.array([[0, 1, 2]]), _csr([[0]], 3), np.array([0]), k=3)
    out = summarize(pu, np.array([[0, 1, 2]]), 3)
    assert out["precision"] == pytest.approx(1 / 3)
    assert out["implicit_precision"] == pytest.approx(1.0)


def test_popularity_never_recommends_seen_items():
    train = _csr([[0, 1], [0], [0, 2], [3]], 5)  # popularity: 0 (3 users), then 1, 2, 3 (1 each), 4 (0)
    recs = popularity_recs(train, np.array([0, 1, 3]), k=2)
    assert recs[0].tolist() == [2, 3]
    assert recs[1].tolist() == [1, 2]
    assert recs[2].tolist()[0] == 0


def test_time_split_holds_out_the_latest_pairs():
    t0 = np.arange(100, dtype=float)
    train = time_split(t0, 0.1)
    assert train.sum() == 90 and not train[90:].any()
    assert time_split(np.zeros(10), 0.2).all()  # no time order: nothing held out
    assert time_split(t0, 0.0).all()


def test_agrees_with_implicit_ranking_metrics_at_k():
    import implicit
    from implicit.evaluation import ranking_metrics_at_k

    rng = np.random.default_rng(0)
    n_users, n_items = 200, 60
    # two user groups that like different halves of the catalogue
    group = rng.integers(0, 2, n_users)
    dense = np.zeros((n_users, n_items), dtype=np.float32)
    for u in range(n_users):
        lo = 0 if group[u] == 0 else n_items // 2
        dense[u, rng.choice(np.arange(lo, lo + n_items // 2), 8, replace=False)] = 1
    full = sp.csr_matrix(dense)
    held = rng.random(full.nnz) < 0.25
    coo = full.tocoo()
    train = sp.csr_matrix((coo.data * ~held, (coo.row, coo.col)), shape=full.shape)
    train.eliminate_zeros()
    test = sp.csr_matrix((coo.data * held, (coo.row, coo.col)), shape=full.shape)
    test.eliminate_zeros()
    with threadpool_limits(1, "blas"):
        model = implicit.als.AlternatingLeastSquares(factors=4, iterations=5, random_state=0, num_threads=1)
        model.fit(train, show_progress=False)
    ours = evaluate_recommender(model, train, test, group, ["a", "b"], k=10, max_users=10_000, seed=0)
    theirs = ranking_metrics_at_k(model, train, test, K=10, show_progress=False, num_threads=1)
    o = ours["model"]["overall"]
    assert o["ndcg"] == pytest.approx(theirs["ndcg"], rel=1e-6)
    assert o["map"] == pytest.approx(theirs["map"], rel=1e-6)
    assert o["implicit_precision"] == pytest.approx(theirs["precision"], rel=1e-6)
    assert o["precision"] != pytest.approx(theirs["precision"])  # different definitions, both reported
    # the planted two-group structure: CF must beat popularity
    assert o["ndcg"] > ours["popularity"]["overall"]["ndcg"]
    assert set(ours["model"]["segments"]) == {"a", "b"}


def test_top_k_unseen_is_each_users_best_unseen_items_whatever_the_block():
    """Against a per-user sort by (score desc, id asc): seen items left out, ties (here on purpose: scores
    rounded to a few values) broken by the lower id also at the k-th place, -1 where fewer than k are unseen,
    and the same answer for every block size (blocks of users are scored separately)."""
    rng = np.random.default_rng(3)
    n_users, n_items, k = 37, 23, 5
    users = np.round(rng.standard_normal((n_users, 2)), 1).astype(np.float32)
    items = np.round(rng.standard_normal((n_items, 2)), 1).astype(np.float32)
    dense = rng.random((n_users, n_items)) < 0.3
    dense[0] = True  # a user who has seen everything, and one with only 2 items unseen
    dense[1, 2:], dense[1, :2] = True, False
    seen = sp.csr_matrix(dense.astype(np.float32))
    scores = users.astype(np.float64) @ items.T.astype(np.float64)
    want = np.full((n_users, k), -1)
    for u in range(n_users):
        unseen = [i for i in range(n_items) if not dense[u, i]]
        best = sorted(unseen, key=lambda i: (-scores[u, i], i))[:k]
        want[u, :len(best)] = best
    assert (want[0] == -1).all() and (want[1, 2:] == -1).all() and (want[1, :2] >= 0).all()
    for block in (None, 1, 4, 16, 1000):
        assert top_k_unseen(users, items, seen, k, block=block).tolist() == want.tolist(), block
