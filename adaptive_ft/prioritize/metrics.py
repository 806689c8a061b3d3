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

from concurrent.futures import ThreadPoolExecutor

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


# Entries in one block of scores: ~4 MB of float32, so a block and the temporaries of its top-k stay in
# cache and reuse the memory the previous block freed. Blocks of 2048 users x 20k items (164 MB) were
# fresh allocations each time, and their page faults made the whole top-k ~3x slower.
BLOCK_ENTRIES = 1 << 20
# Threads sharing the blocks of :func:`top_k_unseen` (the cores of the 2-core machines this is tuned on).
TOP_K_THREADS = 2


def top_k_unseen(user_vecs: np.ndarray, item_vecs: np.ndarray, seen: sp.csr_matrix, k: int,
                 block: int | None = None) -> np.ndarray:
    """(n, k) ids of the highest-scoring items per user, items in row u of ``seen`` excluded; -1 pads.

    Scores are user_vecs @ item_vecs.T, computed ``block`` users at a time (default: as many as fit
    :data:`BLOCK_ENTRIES` scores); ties go to the lower id, and the result does not depend on the block.
    Vectorized end to end (implicit's batched ``recommend`` slices the filter matrix one user at a time,
    which made it the slowest step of prioritize at scale; its C++ ``topk`` with a filter matrix took
    3.5 s for 10k users x 20k items). The blocks are shared by :data:`TOP_K_THREADS` threads, each
    writing its own rows of the answer: a block's work is whole-array numpy (product, partition,
    lexsort) that releases the GIL, so on two cores two blocks run at once.
    """
    n, n_items = user_vecs.shape[0], item_vecs.shape[0]
    k_eff = min(k, n_items)
    out = np.full((n, k), -1, dtype=np.int64)
    seen = seen.tocsr()
    if block is None:
        block = max(1, BLOCK_ENTRIES // max(n_items, 1))

    def score(starts: range) -> None:
        for start in starts:
            stop = min(start + block, n)
            scores = user_vecs[start:stop] @ item_vecs.T  # (B, I)
            sub = seen[start:stop]
            rows = np.repeat(np.arange(stop - start), np.diff(sub.indptr))
            scores[rows, sub.indices] = -np.inf
            ids, top = _top_k(scores, k_eff)
            ids[~np.isfinite(top)] = -1  # fewer than k unseen items
            out[start:stop, :k_eff] = ids

    starts = range(0, n, block)
    threads = min(TOP_K_THREADS, len(starts))
    if threads <= 1:
        score(starts)
    else:  # thread j takes every threads-th block from the j-th: neighbouring blocks cost alike
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for done in [pool.submit(score, starts[j::threads]) for j in range(threads)]:
                done.result()
    return out


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores) of the k largest per row, best first; ties ordered by lower id, also at the k-th place.

    Numpy only: the k-th largest value of each row by ``np.partition`` (values, not indices: ~3x faster
    than ``argpartition`` on wide rows), every entry at or above it as a candidate, then one lexsort of the
    few candidates by (row, score desc, id asc) and the first k of each row. (torch.topk was a little
    faster per block but importing torch cost 2-5 s, more than the whole top-k.)
    """
    n, m = scores.shape
    kth = np.partition(scores, m - k, axis=1)[:, m - k]
    r, c = np.nonzero(scores >= kth[:, None])
    v = scores[r, c]
    order = np.lexsort((c, -v, r))
    r, c, v = r[order], c[order], v[order]
    rank = np.arange(len(r)) - np.searchsorted(r, np.arange(n))[r]
    keep = rank < k
    ids = np.empty((n, k), dtype=np.int64)
    top = np.empty((n, k), dtype=scores.dtype)
    ids[r[keep], rank[keep]] = c[keep]
    top[r[keep], rank[keep]] = v[keep]
    return ids, top


def popularity_recs(train: sp.csr_matrix, users: np.ndarray, k: int) -> np.ndarray:
    """Top-k most popular (most users in training) examples each user has not touched yet; ties by id."""
    pop = np.bincount(train.indices, minlength=train.shape[1])
    seen = train[users]
    # every user's list comes from the same ranking: only its first k + (most items any user has seen)
    # entries can matter, so score just those (a 1-factor "model" whose score is the rank)
    m = min(len(pop), k + int(np.diff(seen.indptr).max(initial=0)))
    cand = np.lexsort((np.arange(len(pop)), -pop))[:m]
    score = np.arange(m, 0, -1, dtype=np.float32)[:, None]
    ids = top_k_unseen(np.ones((len(users), 1), dtype=np.float32), score, seen[:, cand], k)
    return np.where(ids >= 0, cand[np.maximum(ids, 0)], -1)


def model_recs(model, train: sp.csr_matrix, users: np.ndarray, k: int) -> np.ndarray:
    """Top-k recommendations of a fitted ``implicit`` model, already-seen examples filtered out."""
    return top_k_unseen(np.asarray(model.user_factors)[users], np.asarray(model.item_factors), train[users], k)


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
