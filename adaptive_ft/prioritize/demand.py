"""Demand and failure from the interaction log, scored by collaborative filtering.

The pipeline of this module, top to bottom:

1. :func:`load_interactions` aggregates the store's events into one row per (user, example) pair
   (DuckDB joins the events to dense user / example indices and sorts them by pair; numpy sums each
   pair's run of events, never a Python loop): a confidence weight (sum of the configured per-event
   weights), the pair's impressions and negative / positive signal counts, and when it started.
2. :func:`fit_factors` factorizes the user x example confidence matrix with ``implicit`` (ALS, BPR or
   logistic MF), BLAS pinned to one thread and the random state fixed, so the same input gives the same
   factors.
3. :func:`segment_demand`: predicted affinity averaged over a segment's users, normalized per segment to a
   distribution over examples -- the share of that segment's attention each example is expected to get,
   including examples the segment never touched; :func:`blend_demand` shrinks each segment's observed
   traffic shares toward it (CF fills what a segment has not asked, and carries small segments).
4. :func:`example_failure`: the share of an example's interactions that drew a negative signal, smoothed
   by a Beta prior whose mean comes from the example's nearest neighbours in item-factor space, so an
   example with little feedback inherits from its look-alikes.
5. :func:`priorities` = sum over segments of segment weight x demand x failure: the expected unmet need.
6. :func:`sampling_weights`: two levels -- each domain's share from its total priority (``temperature``),
   examples within a domain from their priorities flattened by ``example_temperature`` -- then a floor per
   domain and a cap per cluster of near-duplicate examples.
"""

from __future__ import annotations

import re
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from threadpoolctl import threadpool_limits

from adaptive_ft.config import EVENT_TYPES, PrioritizeConfig
from adaptive_ft.errors import InputError, PlanError

EPS = 1e-12


# --------------------------------------------------------------------------------------- reading the store


@dataclass
class Interactions:
    """The aggregated log: index tables and one row per (user, example) pair.

    ``users`` has columns uix, user_id, segment; ``items`` has iix, example_id, domain, prompt.
    ``pairs`` has uix, iix, conf (float32), neg (0/1: the pair drew a negative signal), pos (0/1: a
    positive one; optional), t0 (epoch seconds of the pair's first event), hits (how many times the user
    asked it: impressions, at least 1; optional), neg_n / pos_n (how many negative / positive signal
    events; optional). Row ``uix`` of every matrix built from it is user ``uix``.
    """

    users: pl.DataFrame
    items: pl.DataFrame
    pairs: pl.DataFrame
    source: str = "store"

    @property
    def shape(self) -> tuple[int, int]:
        return self.users.height, self.items.height

    def matrix(self, mask: np.ndarray | None = None) -> sp.csr_matrix:
        """users x examples confidence matrix (float32 CSR), optionally only the pairs where ``mask``.

        ``pairs`` is sorted by (uix, iix) (see :func:`check_interactions`), so the CSR arrays are the
        columns themselves: no COO conversion or index sort over millions of entries, and a column
        already of the CSR's type is copied once at most (by ``mask``, or where it is read-only).
        """
        uix = self.pairs["uix"].to_numpy()
        iix = self.pairs["iix"].to_numpy().astype(np.int32, copy=False)
        conf = self.pairs["conf"].to_numpy().astype(np.float32, copy=False)
        if mask is not None:
            uix, iix, conf = uix[mask], iix[mask], conf[mask]
        else:  # implicit's solvers take writable buffers: copy only what polars lends read-only
            iix, conf = _writable(iix), _writable(conf)
        indptr = np.zeros(self.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(uix, minlength=self.shape[0]), out=indptr[1:])
        m = sp.csr_matrix((conf, iix, indptr), shape=self.shape)
        m.has_sorted_indices = True
        return m


# Event types whose value is a rating: a low one is a negative signal, a high one a positive signal.
RATED_EVENTS = ("rating", "review")


def _negative_sql(cfg: PrioritizeConfig) -> str:
    """SQL predicate for 'this event is a negative signal' (events listed in the config, or a low rating)."""
    events = ", ".join(f"'{e}'" for e in cfg.negative_events)
    rated = ", ".join(f"'{e}'" for e in RATED_EVENTS)
    return (f"(e.event IN ({events}) OR (e.event IN ({rated}) AND e.value IS NOT NULL "
            f"AND e.value <= {float(cfg.low_rating)}))")


def _positive_sql(cfg: PrioritizeConfig) -> str:
    """SQL predicate for 'this event says the answer worked' (configured events, or a high rating)."""
    events = ", ".join(f"'{e}'" for e in cfg.positive_events) or "NULL"
    rated = ", ".join(f"'{e}'" for e in RATED_EVENTS)
    return (f"(e.event IN ({events}) OR (e.event IN ({rated}) AND e.value IS NOT NULL "
            f"AND e.value >= {float(cfg.high_rating)}))")


# The index tables :func:`load_interactions` registers on the connection for :func:`pairs_sql` and
# :func:`pair_events_sql` to join (the event-type table only for the latter).
_USER_IX, _ITEM_IX, _EVENT_IX = "_aft_user_ix", "_aft_item_ix", "_aft_event_ix"


def _float_weights(cfg: PrioritizeConfig) -> dict[str, str]:
    """Each configured event type's weight as a SQL float literal."""
    return {e: repr(float(w)) for e, w in cfg.event_weights.items() if e in EVENT_TYPES}


def _weight_sql(literals: dict[str, str], zero: str) -> str:
    """A SQL expression of ``e.event``: its weight literal, ``zero`` for any other event type.

    Event names were validated against EVENT_TYPES by the config, so inlining them is safe.
    """
    whens = " ".join(f"WHEN '{e}' THEN {v}" for e, v in literals.items())
    return f"CASE e.event {whens} ELSE {zero} END" if whens else zero


def pairs_sql(cfg: PrioritizeConfig) -> str:
    """The one aggregation over ``events`` as SQL: (uix, iix, conf, t0, hits, neg_n, pos_n), rows sorted
    by (uix, iix).

    The definition of a pair's columns, kept as the reference that :func:`pair_events_sql` plus
    :func:`aggregate_pairs` (what :func:`load_interactions` runs, cheaper at scale) must reproduce, and
    tests compare them on the same store. Ids become dense indices by joining the users and items index
    tables :func:`load_interactions` registers (``_aft_user_ix`` / ``_aft_item_ix``).
    """
    weight = _weight_sql(_float_weights(cfg), "0.0")
    # round(): the sum's float order varies between DuckDB threads; rounding keeps the matrix bit-identical.
    return f"""
    SELECT u.uix, i.iix,
           round(sum({weight}), 6)::FLOAT AS conf,
           epoch(min(e.ts))::DOUBLE AS t0,
           greatest(count(*) FILTER (WHERE e.event = 'impression'), 1)::INTEGER AS hits,
           count(*) FILTER (WHERE {_negative_sql(cfg)})::INTEGER AS neg_n,
           count(*) FILTER (WHERE {_positive_sql(cfg)})::INTEGER AS pos_n
    FROM events e JOIN {_USER_IX} u ON e.user_id = u.user_id JOIN {_ITEM_IX} i ON e.example_id = i.example_id
    GROUP BY u.uix, i.iix
    ORDER BY u.uix, i.iix
    """


# pair_events_sql packs a pair's three 0/1 signal counts into one UBIGINT per event, 16 bits each, so that
# the pair's sums are the three low 16-bit words of one 64-bit sum (aggregate_pairs falls back to one
# count at a time for a pair with 2**16 events or more, where a word could carry into the next).
_FLAG_BITS = 16


def _micro_weights(cfg: PrioritizeConfig) -> dict[str, int] | None:
    """Each event type's weight in millionths, when every configured weight is a whole number of them
    (then a pair's weight sum is exact in integers and equals the SQL's ``round(sum, 6)``); else None."""
    micro = {}
    for e in EVENT_TYPES:
        w = float(cfg.event_weights.get(e, 0.0))
        if round(w, 6) != w or abs(w) >= 1e6:
            return None
        micro[e] = int(round(w * 1e6))
    return micro


def event_types(cfg: PrioritizeConfig) -> pl.DataFrame:
    """One row per event type for :func:`pair_events_sql` to join: its weight (``w``: millionths as
    int64 when :func:`_micro_weights` allows, else float), whether it is an impression, a negative or a
    positive signal by type, and whether its value is a rating (:data:`RATED_EVENTS`)."""
    micro = _micro_weights(cfg)
    weights = ([micro[e] for e in EVENT_TYPES] if micro is not None
               else [float(cfg.event_weights.get(e, 0.0)) for e in EVENT_TYPES])
    return pl.DataFrame({
        "event": list(EVENT_TYPES), "w": pl.Series(weights, dtype=pl.Int64 if micro is not None else pl.Float64),
        "impression": [e == "impression" for e in EVENT_TYPES],
        "negative": [e in cfg.negative_events for e in EVENT_TYPES],
        "positive": [e in cfg.positive_events for e in EVENT_TYPES],
        "rated": [e in RATED_EVENTS for e in EVENT_TYPES]})


def pair_events_sql(cfg: PrioritizeConfig, n_items: int) -> str:
    """Every event as (k, t, w, flags), sorted by the pair key ``k = uix * n_items + iix``: the input of
    :func:`aggregate_pairs`.

    ``t`` is the event time in epoch microseconds; ``w`` its type's configured weight (:func:`event_types`);
    ``flags`` packs three 0/1 counts, impression at bit 0, negative signal at bit ``_FLAG_BITS``,
    positive signal at ``2 * _FLAG_BITS``: the predicates of :func:`pairs_sql`, the by-type part read
    from the joined event-type table (a hash join on a dozen rows is cheaper than string ``CASE`` and
    ``IN`` tests on every event), the rating part from the value. DuckDB joins and sorts, both on all
    cores, and a pair's events come out as one run, so every per-pair sum is a difference of prefix sums
    in numpy and its first event a minimum over the run. The one integer sort key (not uix, iix and
    time) keeps the sort cheap; with float weights the run is also sorted by weight, so that its float
    sum is taken in the same order every time. On 10M events into 8.3M pairs (2 cores) this avoids the
    ``GROUP BY`` of :func:`pairs_sql`, whose hash table of 8.3M groups and re-sort of its output
    dominated reading the store.
    """
    def signal(by_type: str, compare: str) -> str:
        return f"coalesce(x.{by_type} OR (x.rated AND e.value {compare}), false)::UBIGINT"

    order = "k" if _micro_weights(cfg) is not None else "k, w"
    return f"""
    SELECT u.uix::BIGINT * {int(n_items)} + i.iix AS k, epoch_us(e.ts) AS t, coalesce(x.w, 0) AS w,
           coalesce(x.impression, false)::UBIGINT
           + ({signal("negative", f"<= {float(cfg.low_rating)}")} << {_FLAG_BITS})
           + ({signal("positive", f">= {float(cfg.high_rating)}")} << {2 * _FLAG_BITS}) AS flags
    FROM events e JOIN {_USER_IX} u ON e.user_id = u.user_id JOIN {_ITEM_IX} i ON e.example_id = i.example_id
         LEFT JOIN {_EVENT_IX} x ON e.event = x.event
    ORDER BY {order}
    """


def _run_sums(values: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Sum of ``values`` (unsigned integers; overwritten) over each run (ends[j - 1], ends[j]], the first
    run starting at 0: differences of the prefix sums, computed in place, exact (wrap-around of the
    prefix sums cancels in the difference)."""
    np.cumsum(values, out=values)
    sums = values[ends]
    sums[1:] -= values[ends[:-1]]
    return sums


def _writable(a: np.ndarray) -> np.ndarray:
    """``a`` itself when it may be written to, else a copy (polars lends some columns' memory read-only)."""
    return a if a.flags.writeable else a.copy()


def _column(frame: pl.DataFrame, name: str) -> np.ndarray:
    """A column as a numpy array this code may overwrite (a copy only where polars lends its memory)."""
    return _writable(frame[name].to_numpy())


def _weight_sums(events: pl.DataFrame, ends: np.ndarray) -> np.ndarray:
    """Each run's weight sum as float32: exact in millionths (int64; |weight| < 1e6, so up to ~9e6 events
    a pair at the largest), or for weights that are not whole millionths a float sum rounded to 6 decimals
    like the SQL's."""
    w = _column(events, "w")
    if w.dtype.kind == "i":
        micro = _run_sums(w.view(np.uint64), ends).view(np.int64)
        return np.divide(micro, 1e6, out=np.empty(len(ends), dtype=np.float32))
    return np.round(np.add.reduceat(w, np.concatenate(([0], ends[:-1] + 1))), 6).astype(np.float32)


def _signal_counts(events: pl.DataFrame, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each run's (hits, neg_n, pos_n) as int32 from the packed ``flags``: the three low 16-bit words of
    one sum when no run has 2**16 events (no word can carry into the next), else one count at a time."""
    flags = _column(events, "flags")
    if int(np.diff(ends).max(initial=ends[0] + 1)) < 2**_FLAG_BITS:  # the longest run
        words = _run_sums(flags, ends).view(np.uint16).reshape(len(ends), 4)
        if sys.byteorder == "big":
            words = words[:, ::-1]
        hits, neg_n, pos_n = (words[:, b].astype(np.int32) for b in range(3))
    else:
        hits, neg_n, pos_n = (_run_sums((flags >> np.uint64(b * _FLAG_BITS)) & np.uint64(1), ends).astype(np.int32)
                              for b in range(3))
    np.maximum(hits, 1, out=hits)
    return hits, neg_n, pos_n


def _first_events(events: pl.DataFrame, last: np.ndarray, n_runs: int) -> np.ndarray:
    """Each run's earliest event time in epoch seconds (``last`` marks each run's last row): a minimum
    over the run, whatever order its events came in."""
    run = np.cumsum(last)
    run -= last  # the run of each row
    first = np.full(n_runs, np.iinfo(np.int64).max)
    np.minimum.at(first, run, events["t"].to_numpy())
    return np.divide(first, 1e6)


def aggregate_pairs(events: pl.DataFrame, n_items: int) -> pl.DataFrame:
    """One row per run of pair key ``k`` in ``events`` (the output of :func:`pair_events_sql`, sorted by
    ``k = uix * n_items + iix``): the columns of :func:`pairs_sql`, with the same types and values (tests
    compare them).

    ``conf`` is the run's weight sum (:func:`_weight_sums`); ``hits``, ``neg_n``, ``pos_n`` its signal
    counts (:func:`_signal_counts`); ``t0`` its first event (:func:`_first_events`), in epoch seconds.
    These are computed in three threads while this one splits the keys: each is a few whole-array numpy
    passes, which release the GIL, so on a machine with two cores or more they run side by side (each
    writes only its own arrays, so the result does not depend on the scheduling). Written to allocate
    little: on a 10M-event log every fresh array is tens of MB, and page faults on fresh memory cost as
    much as the arithmetic.
    """
    n = events.height
    if n == 0:
        return pl.DataFrame(schema={"uix": pl.Int32, "iix": pl.Int32, "conf": pl.Float32, "t0": pl.Float64,
                                    "hits": pl.Int32, "neg_n": pl.Int32, "pos_n": pl.Int32})
    k = events["k"].to_numpy()
    last = np.empty(n, dtype=bool)
    last[-1] = True
    np.not_equal(k[1:], k[:-1], out=last[:-1])
    ends = np.flatnonzero(last)
    with ThreadPoolExecutor(max_workers=3) as pool:
        conf = pool.submit(_weight_sums, events, ends)
        counts = pool.submit(_signal_counts, events, ends)
        t0 = pool.submit(_first_events, events, last, len(ends))
        key = k[ends]
        uix = key // n_items
        iix = (key - uix * n_items).astype(np.int32)
        hits, neg_n, pos_n = counts.result()
        return pl.DataFrame({"uix": uix.astype(np.int32), "iix": iix, "conf": conf.result(), "t0": t0.result(),
                             "hits": hits, "neg_n": neg_n, "pos_n": pos_n})


# Counted per (user, event segment) first, so the users table is joined to ~users rows, not to every event;
# an event without a segment takes its user's segment (coalesce order of docs/contracts.md).
USERS_SQL = """
WITH c AS (SELECT user_id, segment, count(*) AS n FROM events GROUP BY ALL),
s AS (SELECT c.user_id, coalesce(c.segment, us.segment, 'unknown') AS segment, sum(c.n) AS n
      FROM c LEFT JOIN users us ON c.user_id = us.user_id GROUP BY ALL)
SELECT user_id, first(segment ORDER BY n DESC, segment) AS segment
FROM s GROUP BY user_id ORDER BY user_id
"""

# One scan of events: the (example, domain) counts also give the distinct example ids.
ITEMS_SQL = """
WITH ed AS (SELECT example_id, domain, count(*) AS n FROM events GROUP BY ALL),
em AS (SELECT example_id, first(domain ORDER BY n DESC, domain) FILTER (WHERE domain IS NOT NULL) AS ev_domain
       FROM ed GROUP BY example_id)
SELECT em.example_id, coalesce(x.domain, em.ev_domain) AS domain, x.prompt
FROM em LEFT JOIN examples x ON em.example_id = x.example_id
ORDER BY em.example_id
"""

# Segments named in the users table; those with no events are reported, never silently given a weight.
USER_SEGMENTS_SQL = "SELECT DISTINCT segment FROM users WHERE segment IS NOT NULL ORDER BY 1"


def load_interactions(store, cfg: PrioritizeConfig, source: str = "store") -> Interactions:
    """Aggregate the store's events (``store`` is an open :class:`adaptive_ft.store.Store`).

    The users and items index tables are read first (numbered in id order) and lent to DuckDB for the
    pair aggregation to join, so the events are scanned for ids once per table, not again inside it;
    so is the event-type table (:func:`event_types`).
    The pairs are :func:`pair_events_sql` reduced by :func:`aggregate_pairs`: the values of
    :func:`pairs_sql`, computed more cheaply.
    """
    users = store.sql(USERS_SQL).with_row_index("uix").with_columns(pl.col("uix").cast(pl.Int32))
    if users.height == 0:
        raise InputError(f"{source}: the store has no events. Ingest logs first: "
                         "`adaptive-ft ingest logs.jsonl` (or `adaptive-ft simulate --out logs.jsonl`).")
    items = store.sql(ITEMS_SQL).with_row_index("iix").with_columns(pl.col("iix").cast(pl.Int32))
    store.con.register(_USER_IX, users.select("user_id", "uix").to_arrow())
    store.con.register(_ITEM_IX, items.select("example_id", "iix").to_arrow())
    store.con.register(_EVENT_IX, event_types(cfg).to_arrow())
    try:
        pairs = aggregate_pairs(store.sql(pair_events_sql(cfg, items.height)), items.height)
    finally:
        for name in (_USER_IX, _ITEM_IX, _EVENT_IX):
            store.con.unregister(name)
    pairs = pairs.with_columns(neg=(pl.col("neg_n") > 0).cast(pl.Int8), pos=(pl.col("pos_n") > 0).cast(pl.Int8))
    return check_interactions(Interactions(users, items, pairs, source))


def _sort_pairs(pairs: pl.DataFrame) -> pl.DataFrame:
    """``pairs`` in (uix, iix) order (unchanged when already so): the order every matrix is built in.

    One int64 key, one arg-sort and a numpy gather per column (a two-column frame sort took ~3x as long
    on 8M rows, and a polars gather over the many chunks a DuckDB result arrives in was ~5 s).
    """
    key = pairs["uix"].cast(pl.Int64) * (int(pairs["iix"].max() or 0) + 1) + pairs["iix"].cast(pl.Int64)
    if key.is_sorted():
        return pairs
    order = key.arg_sort().to_numpy()
    return pl.DataFrame({c: pairs[c].to_numpy()[order] for c in pairs.columns}, schema=pairs.schema)


def check_interactions(inter: Interactions) -> Interactions:
    """Refuse inputs collaborative filtering cannot use, saying what is wrong and what to do."""
    if inter.pairs.height == 0:
        raise InputError(f"{inter.source}: no events to prioritize from; ingest logs first (`adaptive-ft ingest`).")
    if inter.users.height < 2:
        raise InputError(
            f"{inter.source}: all events come from one user ({inter.users['user_id'][0]!r}); collaborative "
            "filtering needs at least 2 users to tell demand apart. Ingest logs from more users.")
    inter.pairs = _sort_pairs(inter.pairs)
    no_domain = inter.items.filter(pl.col("domain").is_null())
    if no_domain.height:
        ids = ", ".join(no_domain["example_id"].head(5).to_list())
        raise InputError(
            f"{inter.source}: {no_domain.height} example(s) have no domain (e.g. {ids}); every example needs "
            "one to be planned. Give the events a `domain` field or ingest an examples file that sets it.")
    return inter


# --------------------------------------------------------------------------------------------- factorizing


@dataclass
class Factors:
    """User and item factors (float32) and how a raw score becomes an affinity in [0, 1]-ish."""

    user: np.ndarray  # (U, F)
    item: np.ndarray  # (I, F)
    algorithm: str
    model: object = field(default=None, repr=False)

    def affinity(self, scores: np.ndarray) -> np.ndarray:
        """ALS predicts a preference near 1 for liked items: clip at 0. BPR/LMF give logits: a sigmoid."""
        if self.algorithm == "als":
            return np.clip(scores, 0.0, None)
        return 1.0 / (1.0 + np.exp(-np.clip(scores, -30, 30)))


def make_model(cfg: PrioritizeConfig, seed: int, iterations: int | None = None):
    """The configured ``implicit`` model, seeded and with an explicit thread count."""
    import implicit

    its = cfg.iterations if iterations is None else iterations
    common = dict(factors=cfg.factors, regularization=cfg.regularization, iterations=its,
                  random_state=seed, num_threads=cfg.threads)
    if cfg.algorithm == "als":
        return implicit.als.AlternatingLeastSquares(alpha=cfg.alpha, **common)
    if cfg.algorithm == "bpr":
        return implicit.bpr.BayesianPersonalizedRanking(**common)
    return implicit.lmf.LogisticMatrixFactorization(**common)


def fit_factors(matrix: sp.csr_matrix, cfg: PrioritizeConfig, seed: int, model=None,
                iterations: int | None = None, progress: bool = False, exact: bool = False) -> Factors:
    """Fit (or, for ALS given a fitted ``model``, continue fitting) on the users x items ``matrix``.

    BLAS is limited to one thread while fitting: implicit's own threads do the parallel work, and a
    multi-threaded OpenBLAS underneath it is both ~10x slower and a source of run-to-run differences.

    ``exact`` (ALS only): solve each user's and item's least squares exactly (Cholesky) instead of with
    implicit's default few conjugate-gradient steps, for this fit only. Each CG step moves toward that
    same solution, so an exact iteration is at least as converged as a CG one; with few factors it is
    also cheaper, which is why the warm refit after the hold-out uses it (see
    :func:`adaptive_ft.prioritize.stage.score_interactions`). The model keeps CG for any later fit.
    """
    with threadpool_limits(1, "blas"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*threads.*", category=RuntimeWarning)
        if model is None:
            model = make_model(cfg, seed, iterations)
        elif iterations is not None:
            model.iterations = iterations
        use_cg = getattr(model, "use_cg", None)
        if exact and use_cg is not None:
            model.use_cg = False
        try:
            model.fit(matrix, show_progress=progress)
        finally:
            if use_cg is not None:
                model.use_cg = use_cg
    return Factors(np.asarray(model.user_factors), np.asarray(model.item_factors), cfg.algorithm, model)


# ---------------------------------------------------------------------------------------- demand, failure


def segment_index(users: pl.DataFrame) -> tuple[list[str], np.ndarray]:
    """Sorted segment names and each user's segment index."""
    names = sorted(users["segment"].unique().to_list())
    lookup = {s: i for i, s in enumerate(names)}
    return names, np.array([lookup[s] for s in users["segment"].to_list()], dtype=np.int64)


def segment_demand(factors: Factors, user_segment: np.ndarray, n_segments: int) -> np.ndarray:
    """(S, I): each segment's expected share of attention per example; each row sums to 1.

    The mean affinity of a segment's users is (mean user factor) . (item factor) for ALS, whose score is
    linear; for BPR/LMF the sigmoid is applied to the mean score (an approximation, stated).
    """
    counts = np.bincount(user_segment, minlength=n_segments).astype(np.float64)
    sums = np.zeros((n_segments, factors.user.shape[1]))
    np.add.at(sums, user_segment, factors.user.astype(np.float64))
    mean_user = sums / np.maximum(counts, 1)[:, None]
    aff = factors.affinity(mean_user @ factors.item.astype(np.float64).T) + EPS
    return aff / aff.sum(axis=1, keepdims=True)


def blend_demand(predicted: np.ndarray, observed: np.ndarray, per_example: float) -> np.ndarray:
    """(S, I) demand: each segment's observed traffic shares, shrunk toward the CF prediction.

    demand[s, i] = (n[s, i] + a * I * p[s, i]) / (N_s + a * I), with n the segment's interactions
    (asks) per example, N_s their total, p the CF share (:func:`segment_demand`) and a = ``per_example``
    pseudo-interactions per example. A segment with much traffic keeps what it asked; an example a
    segment never touched gets the share CF predicts for it; a small segment leans on CF. Rows sum to 1.
    """
    prior = per_example * predicted.shape[1]
    total = observed.sum(axis=1, keepdims=True)
    return (observed + prior * predicted) / (total + prior)


def item_neighbours(item: np.ndarray, k: int, groups: np.ndarray | None = None, block: int = 2048
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most cosine-similar other items of each item: (indices (I, k), similarities (I, k)).

    With ``groups`` (the domain of each item) neighbours are searched within the item's own group only:
    a look-alike question of another domain says little about this domain's answers. Computed in blocks
    of rows so memory stays at block x group size; items with an all-zero factor get similarity 0 to
    everything; a group smaller than k + 1 pads with index 0 at similarity 0.
    """
    n = item.shape[0]
    groups = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups)
    norms = np.linalg.norm(item, axis=1)
    unit = (item / np.maximum(norms, EPS)[:, None]).astype(np.float32)
    idx = np.zeros((n, k), dtype=np.int64)
    sim = np.zeros((n, k), dtype=np.float64)
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        kk = min(k, len(members) - 1)
        if kk <= 0:
            continue
        gi, gs = _neighbours_within(unit[members], kk, block)
        idx[members, :kk] = members[gi]
        sim[members, :kk] = gs
    return idx, sim


def _neighbours_within(unit: np.ndarray, k: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k cosine neighbours among the rows of ``unit`` (unit vectors), self excluded, ties by index."""
    n = unit.shape[0]
    idx = np.empty((n, k), dtype=np.int64)
    sim = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, block):
        s = unit[start:start + block] @ unit.T  # (B, n)
        rows = np.arange(s.shape[0])
        s[rows, start + rows] = -np.inf  # never one's own neighbour
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        ps = np.take_along_axis(s, part, axis=1)
        order = np.lexsort((part, -ps), axis=1)  # by similarity, ties by index: deterministic
        idx[start:start + block] = np.take_along_axis(part, order, axis=1)
        sim[start:start + block] = np.take_along_axis(ps, order, axis=1)
    return idx, sim.astype(np.float64)


@dataclass
class Failure:
    """Per-example failure estimate and what it came from."""

    rate: np.ndarray        # (I,) posterior mean failure
    exposures: np.ndarray   # (I,) interactions (user, example pairs)
    negatives: np.ndarray   # (I,) interactions with a negative signal
    prior: np.ndarray       # (I,) the Beta prior mean each example was shrunk toward
    global_rate: float


def example_failure(exposures: np.ndarray, negatives: np.ndarray, neighbours: tuple[np.ndarray, np.ndarray],
                    strength: float, groups: np.ndarray | None = None) -> Failure:
    """Beta-smoothed failure, with the prior mean borrowed from look-alike examples.

    ``exposures`` are the interactions whose outcome is known (see ``prioritize.failure_basis``),
    ``negatives`` those that drew a negative signal. Step 1: every example's rate shrunk toward its
    group's (domain's) rate g_d with ``strength`` pseudo-interactions: r_i = (neg_i + s * g_d) /
    (exp_i + s). Step 2: the prior mean of example i is the similarity-weighted mean of its neighbours'
    r_j (positive similarities only; g_d where there are none), and the posterior is
    f_i = (neg_i + s * prior_i) / (exp_i + s). An example seen 3 times mostly inherits its look-alikes'
    failure; one seen 300 times mostly keeps its own.
    """
    exposures = exposures.astype(np.float64)
    negatives = negatives.astype(np.float64)
    groups = np.zeros(len(exposures), dtype=np.int64) if groups is None else np.asarray(groups)
    g = float(negatives.sum() / max(exposures.sum(), 1.0))
    g_neg = np.bincount(groups, weights=negatives)
    g_exp = np.bincount(groups, weights=exposures)
    # a group with no known outcome at all falls back to the global rate
    group_rate = np.where(g_exp > 0, (g_neg + strength * g) / (g_exp + strength), g)[groups]
    shrunk = (negatives + strength * group_rate) / (exposures + strength)
    idx, sim = neighbours
    prior = group_rate.copy()
    if idx.shape[1]:
        wts = np.clip(sim, 0.0, None)
        mass = wts.sum(axis=1)
        has = mass > EPS
        prior[has] = (wts[has] * shrunk[idx[has]]).sum(axis=1) / mass[has]
    rate = (negatives + strength * prior) / (exposures + strength)
    return Failure(rate, exposures, negatives, prior, g)


def signal_floor(exposures: np.ndarray, negatives: np.ndarray, quantile: float, min_queries: float,
                 cap: float = 0.2) -> float:
    """The failure rate that even the best-answered examples show: the rate of negative signals on right answers.

    Feedback is noisy: users sometimes thumb down or regenerate a right answer (and praise a wrong one), so an
    observed rate is about f + eps * (1 - 2f), not f. That additive floor inflates low failure rates the most
    (a domain failing 10% reads as ~17%), which lifts high-traffic, low-failure domains above smaller ones
    that fail far more. Estimated as the ``quantile`` of the raw rates of examples with at least
    ``min_queries`` judged queries (assumption, stated: the easiest examples are nearly always answered
    right), capped at ``cap`` so a model that fails everywhere is not read as noise; 0 when fewer than 10
    examples qualify or ``quantile`` is 0.
    """
    ok = exposures >= min_queries
    if quantile <= 0 or ok.sum() < 10:
        return 0.0
    return float(min(np.quantile(negatives[ok] / exposures[ok], quantile), cap))


def remove_floor(rate: np.ndarray | float, eps: float) -> np.ndarray:
    """Invert observed = f + eps * (1 - 2f): f = (observed - eps) / (1 - 2 eps), clipped to [0, 1]."""
    return np.clip((np.asarray(rate, dtype=np.float64) - eps) / (1.0 - 2.0 * eps), 0.0, 1.0)


def segment_weights(names: list[str], traffic: np.ndarray, seg_failure: np.ndarray,
                    cfg: PrioritizeConfig) -> np.ndarray:
    """Weights per segment, summing to 1: traffic share, uniform, under-served (traffic x failure), or explicit.

    ``traffic`` is the interactions per segment, ``seg_failure`` each segment's smoothed failure rate.
    """
    share = traffic / traffic.sum()
    if cfg.segment_weights:
        unknown = sorted(set(cfg.segment_weights) - set(names))
        silent = [s for s in names if cfg.segment_weights.get(s, 0) > 0 and traffic[names.index(s)] == 0]
        if unknown or silent:
            raise InputError(
                f"prioritize.segment_weights names segment(s) with no events: {unknown + silent} "
                f"(segments with events: {names}). Remove them or ingest their logs.")
        w = np.array([float(cfg.segment_weights.get(s, 0.0)) for s in names])
    elif cfg.segment_weighting == "uniform":
        w = (traffic > 0).astype(np.float64)
    elif cfg.segment_weighting == "underserved":
        # up-weight segments that fail more than average: traffic share x failure-rate ratio
        w = share * seg_failure / max(float((share * seg_failure).sum()), EPS)
    else:
        w = share.copy()
    if w.sum() <= 0:
        raise InputError("prioritize.segment_weights: every weight is 0; give at least one segment a weight > 0.")
    return w / w.sum()


def priorities(demand: np.ndarray, failure: np.ndarray, seg_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(priority per example (I,), contribution per segment and example (S, I)).

    contribution[s, i] = w_s x demand[s, i] x failure[i]; priority = its column sum: the expected share
    of all (weighted) traffic that lands on example i and fails.
    """
    contrib = seg_w[:, None] * demand * failure[None, :]
    return contrib.sum(axis=0), contrib


# ------------------------------------------------------------------------------------------ sampling weights


def _cluster_key(text: str | None) -> str:
    """Looser than the example-id rule (:func:`adaptive_ft.text.normalize_prompt`) on purpose: punctuation and
    symbols are ignored too, so near-identical prompts with distinct ids fall in one cluster."""
    return re.sub(r"[^a-z0-9]+", " ", (text or "").lower()).strip()


def duplicate_clusters(items: pl.DataFrame, neighbours: tuple[np.ndarray, np.ndarray], exposures: np.ndarray,
                       threshold: float, min_exposures: int) -> np.ndarray:
    """Cluster id per example: examples with the same normalized prompt, or item factors with cosine
    >= ``threshold`` where both have >= ``min_exposures`` interactions (well-estimated factors only:
    cold items all sit near the origin and would look alike), are one cluster of near-duplicates."""
    n = items.height
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    if "prompt" in items.columns:
        keys = [_cluster_key(p) for p in items["prompt"].to_list()]
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key:
                rows.append(np.array([i]))
                cols.append(np.array([first.setdefault(key, i)]))
    idx, sim = neighbours
    if idx.shape[1]:
        ok = (sim >= threshold) & (exposures[:, None] >= min_exposures) & (exposures[idx] >= min_exposures)
        r, c = np.nonzero(ok)
        rows.append(r)
        cols.append(idx[r, c])
    if not rows:
        return np.arange(n)
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = sp.coo_matrix((np.ones(len(r)), (r, c)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _cap_groups(w: np.ndarray, groups: np.ndarray, cap: float, frozen: np.ndarray | None = None) -> np.ndarray:
    """Water-filling: no group's total above ``cap``; the excess goes to the others pro rata."""
    w = w.copy()
    for _ in range(100):
        tot = np.bincount(groups, weights=w)
        over = tot > cap * (1 + 1e-9)
        if not over.any():
            break
        scale = np.where(over, cap / np.maximum(tot, EPS), 1.0)
        capped = over[groups]
        excess = (w[capped] * (1 - scale[groups][capped])).sum()
        w[capped] *= scale[groups][capped]
        free = ~capped & (tot[groups] < cap * (1 - 1e-9))
        if frozen is not None:
            free &= ~frozen
        if w[free].sum() <= EPS:
            break
        w[free] += excess * w[free] / w[free].sum()
    return w


def sampling_weights(prio: np.ndarray, domain_ix: np.ndarray, clusters: np.ndarray,
                     cfg: PrioritizeConfig, demand: np.ndarray | None = None) -> tuple[np.ndarray, list[str]]:
    """Training sampling weights (sum 1) from priorities, and notes on any constraint that had to give.

    Two levels. A domain d gets a share ∝ (Σ_{i in d} priority_i) ** (1 / temperature): where the unmet need
    is. Within d, example i gets ∝ priority_i ** (1 / example_temperature) of that share. Priorities follow
    traffic, which is heavy-tailed, so at example_temperature 1 a few popular examples would take most
    draws (on a simulated Banking77 log: an effective sample size of ~120 of 7,700 examples) and the model
    would memorize them instead of learning the domain; flattening inside a domain keeps the domain mix
    the plan chose while spreading its draws over many distinct examples (ESS ~6,700 at 4).

    ``replay`` of the mass (with ``demand``) is drawn by demand alone, domains in proportion to their
    traffic and examples flattened the same way: a fine-tune that puts nearly all its draws where the
    deployed model fails forgets what it already does well (DESIGN.md, "Closing the loop"), and the users
    of those domains are the ones it would harm. Mixing in what users ask, whether or not it failed, is
    experience replay in its plainest form.

    Then, alternately until both hold, each domain gets at least ``domain_floor`` of the mass (taken pro
    rata from the domains above the floor) and no cluster of near-duplicates (a singleton cluster is one
    example) gets more than ``example_cap``.
    """
    notes: list[str] = []
    n_dom = int(domain_ix.max()) + 1
    n_clu = int(clusters.max()) + 1
    floor, cap = cfg.domain_floor, cfg.example_cap
    if floor * n_dom > 1:
        floor = 1.0 / n_dom
        notes.append(f"domain_floor {cfg.domain_floor} x {n_dom} domains > 1: lowered to {floor:.4g}")
    if cap * n_clu < 1:
        cap = 1.0 / n_clu
        notes.append(f"example_cap {cfg.example_cap} x {n_clu} clusters < 1: raised to {cap:.4g}")
    w = _two_level(prio, domain_ix, n_dom, cfg.temperature, cfg.example_temperature)
    replay = getattr(cfg, "replay", 0.0)
    if replay > 0 and demand is not None and float(np.sum(demand)) > 0:
        w = (1 - replay) * w + replay * _two_level(demand, domain_ix, n_dom, 1.0, cfg.example_temperature)
    for _ in range(50):
        w = _apply_floor(w, domain_ix, n_dom, floor)
        w = _cap_groups(w, clusters, cap)
        dom = np.bincount(domain_ix, weights=w, minlength=n_dom)
        clu = np.bincount(clusters, weights=w, minlength=n_clu)
        if dom.min() >= floor * (1 - 1e-6) and clu.max() <= cap * (1 + 1e-6):
            break
    else:
        notes.append("domain floor and example cap could not both be met exactly; the cap was kept")
    return w / w.sum(), notes


def _two_level(score: np.ndarray, domain_ix: np.ndarray, n_dom: int, temperature: float,
               example_temperature: float) -> np.ndarray:
    """Weights (sum 1): domains ∝ (their summed score) ** (1 / temperature), examples within a domain
    ∝ score ** (1 / example_temperature)."""
    p = np.maximum(score, EPS) / max(float(score.max()), EPS)
    dom_total = np.bincount(domain_ix, weights=p, minlength=n_dom)
    dom_share = np.power(dom_total / dom_total.max(), 1.0 / temperature) * (dom_total > 0)
    dom_share /= dom_share.sum()
    within = np.power(p, 1.0 / example_temperature)
    within /= np.maximum(np.bincount(domain_ix, weights=within, minlength=n_dom), EPS)[domain_ix]
    w = dom_share[domain_ix] * within
    return w / w.sum()


def _apply_floor(w: np.ndarray, domain_ix: np.ndarray, n_dom: int, floor: float) -> np.ndarray:
    """Raise every domain below ``floor`` to it, scaling the domains above the floor down pro rata."""
    dom = np.bincount(domain_ix, weights=w, minlength=n_dom)
    low = dom < floor
    if not low.any() or floor <= 0:
        return w
    target = np.where(low, floor, dom)
    rest = 1.0 - floor * low.sum()
    high_mass = dom[~low].sum()
    target[~low] = dom[~low] * rest / max(high_mass, EPS)
    scale = target / np.maximum(dom, EPS)
    w = w * scale[domain_ix]
    # a domain whose examples all weigh 0 cannot be scaled up: spread its floor evenly instead
    empty = low & (dom <= EPS)
    if empty.any():
        sizes = np.bincount(domain_ix, minlength=n_dom)
        fill = empty[domain_ix]
        w[fill] = floor / sizes[domain_ix[fill]]
    return w


def check_feedback(neg_total: float, cfg: PrioritizeConfig, source: str) -> None:
    """No negative signal at all means failure cannot be estimated: stop unless told to plan by demand."""
    if neg_total > 0 or cfg.no_feedback == "demand":
        return
    raise PlanError(
        f"{source}: no negative feedback in the log (none of {', '.join(cfg.negative_events)}, nor a rating "
        f"<= {cfg.low_rating}), so failure cannot be estimated. Ingest feedback events, or set "
        "prioritize.no_feedback=demand to plan by demand alone.")
