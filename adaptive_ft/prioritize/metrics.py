"""Ranking quality of the recommender on a time-based hold-out, beside a popularity baseline.

Definitions (binary relevance; ``rel_u`` = the examples user u first touched after the cut-off, ``hits_u``
= how many of u's top-k recommendations are in ``rel_u``; every mean is over evaluated users, i.e. users
with at least one held-out interaction):

- precision@k  = mean_u hits_u / k                      (the usual definition; sklearn, RecBole, TorchMetrics)
- recall@k     = mean_u hits_u / |rel_u|
- NDCG@k       = mean_u DCG_u / IDCG_u, DCG = sum over ranks j < k of hit_j / log2(j + 2),
                 IDCG = the DCG of min(k, |rel_u|) hits in the first ranks
- MAP@k        = mean_u (sum_j hit_j * precision@(j+1)) / min(k, |rel_u|)
- coverage@k   = distinct examples recommended to anyone / examples in the catalogue
- implicit_precision@k = sum_u hits_u / sum_u min(k, |rel_u|): what ``implicit.evaluation.
  ranking_metrics_at_k`` calls "precision" (a micro-average, divided by min(k, |rel|)); reported so the
  figures can be compared with implicit's, never instead of precision@k.

NDCG@k and MAP@k agree with implicit's definitions exactly. Recommendations never include an example the
user already touched before the cut-off (as ``implicit``'s ``filter_already_liked_items``).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

METRICS = ("precision", "recall", "ndcg", "map")
DEFINITIONS = {
    "precision": "mean over users of hits/k",
    "recall": "mean over users of hits/|held-out|",
    "ndcg": "mean over users of DCG/IDCG, gain 1/log2(rank+1), IDCG over min(k, |held-out|) hits",
    "map": "mean over users of sum(hit_j * precision@j) / min(k, |held-out|)",
    "coverage": "distinct examples recommended / examples in the catalogue",
    "implicit_precision": "sum of hits / sum of min(k, |held-out|) (implicit's 'precision')",
}


def time_split(t0: np.ndarray, holdout_fraction: float) -> np.ndarray:
    """True for the pairs before the cut-off: the latest ``holdout_fraction`` of pairs (by first event) are held out.

    Ties at the cut-off time go to training, so the held-out share can be a little under the fraction.
    """
    if holdout_fraction <= 0 or len(t0) == 0:
        return np.ones(len(t0), dtype=bool)
    cut = np.quantile(t0, 1.0 - holdout_fraction, method="higher")
    train = t0 < cut
    if train.all() or not train.any():  # all events at one instant: no time order to split on
        return np.ones(len(t0), dtype=bool)
    return train


def per_user_metrics(recs: np.ndarray, test: sp.csr_matrix, users: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per-user metric arrays from ``recs`` ((n, k) item ids, -1 for none) against rows ``users`` of ``test``."""
    t = test[users]
    t.data = np.ones_like(t.data)
    n = len(users)
    rows = np.repeat(np.arange(n), k)
    cols = recs[:, :k].ravel()
    valid = cols >= 0
    hit = np.zeros(n * k, dtype=np.float64)
    if valid.any():
        hit[valid] = np.asarray(t[rows[valid], cols[valid]]).ravel() > 0
    hit = hit.reshape(n, k)
    nrel = np.diff(t.indptr).astype(np.float64)
    hits = hit.sum(axis=1)
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    idcg = np.cumsum(disc)[np.minimum(k, nrel).astype(int) - 1]
    prec_at = np.cumsum(hit, axis=1) / np.arange(1, k + 1)
    return {
        "precision": hits / k,
        "recall": hits / nrel,
        "ndcg": (hit * disc).sum(axis=1) / idcg,
        "map": (hit * prec_at).sum(axis=1) / np.minimum(k, nrel),
        "hits": hits,
        "min_k_rel": np.minimum(k, nrel),
    }


def summarize(per_user: dict[str, np.ndarray], recs: np.ndarray, n_items: int, mask: np.ndarray | None = None
              ) -> dict[str, float]:
    """Means over the (masked) users, coverage and implicit's micro precision, as plain floats."""
    m = np.ones(len(per_user["hits"]), dtype=bool) if mask is None else mask
    out: dict[str, float] = {"users": int(m.sum())}
    if not m.any():
        return out
    for name in METRICS:
        out[name] = float(per_user[name][m].mean())
    out["implicit_precision"] = float(per_user["hits"][m].sum() / per_user["min_k_rel"][m].sum())
    r = recs[m]
    out["coverage"] = float(len(np.unique(r[r >= 0])) / max(n_items, 1))
    return out


def popularity_recs(train: sp.csr_matrix, users: np.ndarray, k: int) -> np.ndarray:
    """Top-k most popular (most users in training) examples each user has not touched yet; ties by id."""
    from implicit.cpu.topk import topk

    pop = np.diff(train.tocsc().indptr)
    order = np.lexsort((np.arange(len(pop)), -pop))  # most popular first, ties by lower id
    score = np.empty(len(pop), dtype=np.float32)
    score[order] = np.arange(len(pop), 0, -1)  # distinct integer scores: exact in float32, no ties left
    # a 1-factor "model": every user's score for an item is its popularity; implicit's topk does the
    # per-user filtering of already-seen items exactly as it does for the CF model
    ids, _ = topk(score[:, None], np.ones((len(users), 1), dtype=np.float32), k,
                  filter_query_items=train[users], num_threads=1)
    return _clean(ids, len(pop))


def model_recs(model, train: sp.csr_matrix, users: np.ndarray, k: int) -> np.ndarray:
    """Top-k recommendations of a fitted ``implicit`` model, already-seen examples filtered out."""
    ids, _ = model.recommend(users, train[users], N=k, filter_already_liked_items=True)
    return _clean(np.asarray(ids), train.shape[1])


def _clean(ids: np.ndarray, n_items: int) -> np.ndarray:
    """implicit pads with -1 or out-of-range ids when fewer than k items remain; normalize those to -1."""
    ids = ids.astype(np.int64)
    ids[(ids < 0) | (ids >= n_items)] = -1
    return ids


def evaluate_recommender(model, train: sp.csr_matrix, test: sp.csr_matrix, user_segment: np.ndarray,
                         segments: list[str], k: int, max_users: int, seed: int) -> dict:
    """Model vs popularity, overall and per segment, on users with held-out interactions."""
    users = np.flatnonzero(np.diff(test.indptr) > 0).astype(np.int32)
    if len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False)).astype(np.int32)
    if len(users) == 0:
        return {"k": k, "note": "no held-out interactions (all events share one timestamp, or holdout_fraction=0)"}
    out: dict = {"k": k, "users_evaluated": int(len(users)), "definitions": DEFINITIONS}
    for name, recs in (("model", model_recs(model, train, users, k)), ("popularity", popularity_recs(train, users, k))):
        pu = per_user_metrics(recs, test, users, k)
        out[name] = {"overall": summarize(pu, recs, train.shape[1]),
                     "segments": {s: summarize(pu, recs, train.shape[1], user_segment[users] == i)
                                  for i, s in enumerate(segments)}}
    return out
