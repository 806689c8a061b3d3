"""The prioritize stage: the store's interactions in, ``plan.json`` out.

One public entry, :func:`prioritize`; :func:`score_interactions` is its store-free core, so tests and benchmarks
can feed it an in-memory log. The math it calls lives in :mod:`.demand`, :mod:`.metrics` and :mod:`.layers`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
from threadpoolctl import threadpool_limits

from adaptive_ft.artifacts.plan import DomainScore, LayerPlan, Plan
from adaptive_ft.config import Config, config_to_dict
from adaptive_ft.errors import InputError
from adaptive_ft.prioritize import demand as dm
from adaptive_ft.prioritize.layers import LayerScores, probe_layers
from adaptive_ft.prioritize.metrics import evaluate_recommender, time_split
from adaptive_ft.store import Store


@dataclass
class InteractionScores:
    """Everything the plan is written from."""

    examples: pl.DataFrame          # example_id, domain, priority, demand, failure, exposures, negatives, cluster, weight
    segments: pl.DataFrame          # segment, users, traffic_share, failure, weight
    contributions: np.ndarray       # (S, I) w_s x demand x failure
    recommender: dict
    failure_prior: dict
    notes: list[str] = field(default_factory=list)


@dataclass
class PrioritizeResult:
    """What :func:`prioritize` produced: the plan (already saved at ``path``), timings and notes."""

    plan: Plan
    path: Path
    timings: dict[str, float]
    notes: list[str]
    layer_scores: LayerScores | None = None


# ------------------------------------------------------------------------------------------------ scoring

# An exact (Cholesky) ALS solve costs about f^2 + f per stored entry and a CG step about 4f, so with implicit's
# 3 CG steps (plus the residual) the exact iteration is the cheaper one up to f ~ 16; 8 keeps a margin
# for the f^3 factorization per row. Above it the refit stays with CG.
EXACT_REFIT_MAX_FACTORS = 8


def _fit_with_holdout(inter: dm.Interactions, cfg: Config, user_segment: np.ndarray, segments: list[str],
                      timings: dict[str, float], progress: bool) -> tuple[dm.Factors, dict]:
    """Fit on the pairs before the time cut, score the hold-out, then fit on everything.

    ALS continues from the hold-out fit for ``refit_iterations`` (warm start: ALS keeps its factors
    between ``fit`` calls), so measuring the recommender costs a few iterations, not a second fit. The
    hold-out fit runs ``iterations - refit_iterations`` of them (at least 1), so the final factors have
    had ``iterations`` in all, as a plain fit would: the ranking metrics describe the model before its last
    ``refit_iterations`` (recorded as ``evaluated_after_iterations``). With up to
    :data:`EXACT_REFIT_MAX_FACTORS` factors the refit's iterations solve each least-squares problem
    exactly (``exact`` in :func:`~adaptive_ft.prioritize.demand.fit_factors`): as converged as CG
    iterations or more, and cheaper there.
    """
    pc = cfg.prioritize
    t = time.perf_counter()
    train_mask = time_split(inter.pairs["t0"].to_numpy(), pc.holdout_fraction)
    if train_mask.all():
        factors = dm.fit_factors(inter.matrix(), pc, cfg.seed, progress=progress)
        timings["fit"] = time.perf_counter() - t
        return factors, {"k": pc.k, "note": "no hold-out: holdout_fraction is 0 or every event has the same time"}
    train, test = inter.matrix(train_mask), inter.matrix(~train_mask)
    warm = pc.algorithm == "als"
    first = max(pc.iterations - pc.refit_iterations, 1) if warm else pc.iterations
    factors = dm.fit_factors(train, pc, cfg.seed, iterations=first, progress=progress)
    timings["fit"] = time.perf_counter() - t
    t = time.perf_counter()
    rec = evaluate_recommender(factors.model, train, test, user_segment, segments, pc.k, pc.eval_users, cfg.seed)
    rec.update(train_pairs=int(train_mask.sum()), test_pairs=int((~train_mask).sum()), evaluated_after_iterations=first)
    timings["evaluate"] = time.perf_counter() - t
    t = time.perf_counter()
    full = inter.matrix()
    if warm:
        factors = dm.fit_factors(full, pc, cfg.seed, model=factors.model, iterations=pc.refit_iterations,
                                 exact=pc.factors <= EXACT_REFIT_MAX_FACTORS)
    else:
        factors = dm.fit_factors(full, pc, cfg.seed, progress=progress)
    timings["refit"] = time.perf_counter() - t
    return factors, rec


def score_interactions(inter: dm.Interactions, cfg: Config, progress: bool = False,
                       timings: dict[str, float] | None = None, labelled: set[str] | None = None
                       ) -> InteractionScores:
    """Demand, failure, priorities and sampling weights of every example in ``inter``.

    ``labelled`` (the example ids with a reference answer; None: all) limits the sampling weights to what
    training can use: an example without a reference keeps its priority but gets no weight, and a domain
    with none at all gets no share (noted), its share going to the other domains.

    BLAS is held to one thread throughout (the fits already are, see
    :func:`~adaptive_ft.prioritize.demand.fit_factors`): every product here has the few latent factors as
    its inner dimension, so each is small and memory-bound, and a multi-threaded BLAS only adds its
    threads' start-up and spinning -- many times the work itself when another job shares the cores
    (the hold-out top-k's blocks of scores most of all).
    """
    with threadpool_limits(1, "blas"):
        return _score_interactions(inter, cfg, progress, {} if timings is None else timings, labelled)


def _score_interactions(inter: dm.Interactions, cfg: Config, progress: bool, timings: dict[str, float],
                        labelled: set[str] | None) -> InteractionScores:
    """:func:`score_interactions`' work, BLAS already limited."""
    pc = cfg.prioritize
    inter = dm.check_interactions(inter)
    uix, iix = inter.pairs["uix"].to_numpy(), inter.pairs["iix"].to_numpy()
    neg = inter.pairs["neg"].to_numpy()  # 0/1 per pair, as stored (no float copy: only the fallbacks use it)
    dm.check_feedback(float(inter.pairs["neg"].sum()), pc, inter.source)
    segments, user_segment = dm.segment_index(inter.users)
    n_users, n_items = inter.shape
    factors, rec = _fit_with_holdout(inter, cfg, user_segment, segments, timings, progress)
    rec.update(algorithm=pc.algorithm, factors=pc.factors, holdout_fraction=pc.holdout_fraction)
    t = time.perf_counter()
    hits = inter.pairs["hits"].to_numpy().astype(np.float64) if "hits" in inter.pairs.columns else np.ones(len(uix))
    # every per-pair sum below is taken per (segment, example) cell in one pass over the pairs; the
    # per-example and per-segment totals are that small matrix's column and row sums
    cell = user_segment[uix] * n_items + iix
    n_cells = len(segments) * n_items
    observed = np.bincount(cell, weights=hits, minlength=n_cells).reshape(len(segments), n_items)
    predicted = dm.segment_demand(factors, user_segment, len(segments))
    demand = dm.blend_demand(predicted, observed, pc.demand_prior)
    known, failed, basis, notes = _outcomes(inter.pairs, neg, hits, pc)
    known_cells = np.bincount(cell, weights=known, minlength=n_cells).reshape(len(segments), n_items)
    failed_cells = np.bincount(cell, weights=failed, minlength=n_cells).reshape(len(segments), n_items)
    del cell, known, failed
    exposures, negatives = known_cells.sum(axis=0), failed_cells.sum(axis=0)
    domain_ix = np.unique(inter.items["domain"].to_numpy(), return_inverse=True)[1]
    neighbours = dm.item_neighbours(factors.item, pc.neighbours, groups=domain_ix)
    fail = dm.example_failure(exposures, negatives, neighbours, pc.prior_strength, groups=domain_ix)
    floor = dm.signal_floor(exposures, negatives, pc.noise_floor_quantile, 2 * pc.prior_strength)
    raw_global = fail.global_rate
    if floor > 0:
        fail.rate, fail.prior = dm.remove_floor(fail.rate, floor), dm.remove_floor(fail.prior, floor)
        fail.global_rate = float(dm.remove_floor(fail.global_rate, floor))
    if negatives.sum() == 0:  # only reachable with no_feedback=demand: plan by demand alone
        fail.rate = np.ones(n_items)
        notes.append("no negative feedback: failure taken as 1 everywhere, so priority = demand")
    # traffic in queries (impressions), the unit demand is counted in: counting (user, example) pairs
    # instead under-weighted segments whose users ask the same things again
    traffic = observed.sum(axis=1)
    seg_known, seg_neg = known_cells.sum(axis=1), failed_cells.sum(axis=1)
    seg_fail = dm.remove_floor((seg_neg + pc.prior_strength * raw_global) / (seg_known + pc.prior_strength), floor)
    seg_w = dm.segment_weights(segments, traffic, seg_fail, pc)
    prio, contrib = dm.priorities(demand, fail.rate, seg_w)
    timings["score"] = time.perf_counter() - t
    examples = inter.items.select("example_id", "domain").with_columns(
        priority=pl.Series(prio), demand=pl.Series((seg_w[:, None] * demand).sum(axis=0)),
        failure=pl.Series(fail.rate), failure_prior=pl.Series(fail.prior),
        exposures=pl.Series(np.round(exposures).astype(np.int64)),
        negatives=pl.Series(np.round(negatives).astype(np.int64)))
    examples, contrib, sample_notes = _sample(examples, contrib, inter, neighbours, exposures, pc, labelled)
    notes += sample_notes
    seg_users = np.bincount(user_segment, minlength=len(segments))
    seg_frame = pl.DataFrame({"segment": segments, "users": seg_users.astype(np.int64),
                              "traffic_share": traffic / traffic.sum(), "failure": seg_fail, "weight": seg_w})
    prior = {"global_rate": fail.global_rate, "strength": pc.prior_strength, "neighbours": pc.neighbours,
             "basis": basis, "noise_floor": floor,
             "neighbours_within": "domain"}
    return InteractionScores(examples, seg_frame, contrib, rec, prior, notes)


def _outcomes(pairs: pl.DataFrame, neg: np.ndarray, hits: np.ndarray, pc
              ) -> tuple[np.ndarray, np.ndarray, str, list[str]]:
    """Per pair: the queries whose outcome counts in the failure rate's denominator, how many of them
    failed, and the basis used.

    The unit is the query (impression), as for demand. A pair asked ``h`` times with ``n-`` negative and
    ``n+`` positive signal events counts ``h`` judged queries of which ``h * n- / (n- + n+)`` failed.
    (Counting the pair once as failed when *any* signal was negative biased the rate upward for examples
    users ask repeatedly: with enough repeats nearly every pair carries a stray negative signal, so
    domains with a concentrated popularity looked worse than they were.) Frames without the event counts
    (``neg_n``, ``pos_n``; in-memory logs) fall back to the pair's flags.

    ``feedback`` basis: queries with a verdict (a negative or a positive signal), so the rate is the share
    of judged answers that failed, not diluted by how often users bother to react. Logs with no positive
    signal at all fall back to every query (``exposure`` basis), with a note; a failed query is then a
    negative signal event, at most ``h`` per pair.
    """
    counts = "neg_n" in pairs.columns and "pos_n" in pairs.columns
    if "pos" in pairs.columns and float(pairs["pos"].sum()) > 0:
        if counts:  # few passes, in place where possible: this runs over millions of pairs
            n_neg = pairs["neg_n"].to_numpy()
            judged = n_neg + pairs["pos_n"].to_numpy()
            known = hits * (judged > 0)
            np.maximum(judged, 1, out=judged)  # a pair without a verdict has n- = 0: it fails 0 / 1
            failed = np.divide(n_neg, judged)
            failed *= hits
        else:
            failed, known = neg * hits, np.maximum(neg, pairs["pos"].to_numpy()) * hits
    else:
        failed = np.minimum(pairs["neg_n"].to_numpy(), hits) if counts else neg * hits
        return hits.copy(), failed, "exposure", ["no positive signal in the log: failure is negatives over all exposures"]
    if pc.failure_basis == "exposure":
        return hits.copy(), failed, "exposure", []
    return known, failed, "feedback", []


def _sample(examples: pl.DataFrame, contrib: np.ndarray, inter: dm.Interactions, neighbours, exposures: np.ndarray,
            pc, labelled: set[str] | None = None) -> tuple[pl.DataFrame, np.ndarray, list[str]]:
    """Keep the top domains (when asked) and attach near-duplicate clusters and sampling weights (only examples
    in ``labelled`` get weight; see :func:`score_interactions`)."""
    clusters = dm.duplicate_clusters(inter.items, neighbours, exposures, pc.duplicate_threshold,
                                     pc.duplicate_min_exposures)
    examples = examples.with_columns(cluster=pl.Series(clusters.astype(np.int64)))
    if pc.top_domains > 0:
        keep = (examples.group_by("domain").agg(pl.col("priority").sum())
                .sort(["priority", "domain"], descending=[True, False]).head(pc.top_domains)["domain"])
        mask = examples["domain"].is_in(keep.implode()).to_numpy()
        examples, contrib = examples.filter(pl.Series(mask)), contrib[:, mask]
    ok = np.ones(examples.height, dtype=bool) if labelled is None else \
        examples["example_id"].is_in(pl.Series(sorted(labelled), dtype=pl.String).implode()).to_numpy()
    notes = _untrainable_notes(examples, ok)
    weights = np.zeros(examples.height)
    if ok.any():
        sub = examples.filter(pl.Series(ok))
        _, domain_ix = np.unique(sub["domain"].to_numpy(), return_inverse=True)
        _, cluster_ix = np.unique(sub["cluster"].to_numpy(), return_inverse=True)
        weights[ok], more = dm.sampling_weights(sub["priority"].to_numpy(), domain_ix, cluster_ix, pc,
                                                demand=sub["demand"].to_numpy())
        notes += more
    return examples.with_columns(weight=pl.Series(weights)), contrib, notes


def _untrainable_notes(examples: pl.DataFrame, ok: np.ndarray) -> list[str]:
    """A note per domain with no example training can use (no reference answer), and a count for the rest."""
    frame = examples.select("domain", "priority").with_columns(ok=pl.Series(ok))
    by = frame.group_by("domain").agg(n=pl.len(), usable=pl.col("ok").sum(), priority=pl.col("priority").sum())
    total = max(float(frame["priority"].sum()), 1e-300)
    notes = [f"domain {d!r} has no example with a reference answer ({n} examples, {p / total:.1%} of the "
             f"priority): nothing to train on, so it gets no share and its share goes to the other domains; "
             f"ingest its reference answers to train it"
             for d, n, _, p in by.filter(pl.col("usable") == 0).sort("domain").iter_rows()]
    partial = int((~ok).sum()) - int(by.filter(pl.col("usable") == 0)["n"].sum())
    if partial:
        notes.append(f"{partial} examples in trainable domains have no reference answer: they get no weight")
    return notes


# ---------------------------------------------------------------------------------------------- the plan


def _why(seg_rows: list[dict], failure: float, global_rate: float, demand_share: float) -> str:
    """One line: who drives the need and how often it fails compared with the whole log."""
    top = seg_rows[0]
    return (f"{top['segment']} users drive {top['contribution']:.0%} of the need; "
            f"{failure:.0%} expected failure vs {global_rate:.0%} overall; {demand_share:.0%} of weighted demand")


def domain_scores(scored: InteractionScores) -> list[DomainScore]:
    """Domains sorted by priority (ties by name), with demand, failure, share and the segments behind them."""
    ex = scored.examples
    names = ex["domain"].to_list()
    segs = scored.segments["segment"].to_list()
    out = []
    total_demand = float(ex["demand"].sum())
    for dom in sorted(set(names)):
        mask = (ex["domain"] == dom).to_numpy()
        prio = float(ex["priority"].filter(mask).sum())
        dem = float(ex["demand"].filter(mask).sum())
        by_seg = scored.contributions[:, mask].sum(axis=1)
        rows = [{"segment": s, "contribution": float(c / max(prio, 1e-300))} for s, c in zip(segs, by_seg)]
        rows.sort(key=lambda r: (-r["contribution"], r["segment"]))
        fail = prio / dem if dem > 0 else 0.0
        share = float(ex["weight"].filter(mask).sum())
        why = _why(rows, fail, scored.failure_prior["global_rate"], dem / max(total_demand, 1e-300))
        trainable = share > 0
        out.append(DomainScore(
            domain=dom, priority=prio, demand=dem, failure=fail, share=share, segments=rows, trainable=trainable,
            why=why if trainable else why + "; cannot be trained: no example has a reference answer"))
    out.sort(key=lambda d: (-d.priority, d.domain))
    return out


def _config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()


def build_plan(scored: InteractionScores, cfg: Config, inputs: dict, layers: LayerScores | None = None,
               extra_notes: list[str] | None = None) -> Plan:
    """The :class:`Plan` for ``scored`` (no NaN anywhere: checked before it is returned)."""
    layer_plan = None
    if layers is not None:
        layer_plan = LayerPlan(
            selected=layers.selected, rank_pattern=layers.rank_pattern,
            scores=[{"layer": i, "score": float(s), "measured": bool(layers.measured[:, i].all()),
                     "measured_cells": int(layers.measured[:, i].sum()), "cells": len(layers.domains)}
                    for i, s in enumerate(layers.layer_score)],
        )
    segments = scored.segments.to_dicts()
    notes = list(scored.notes) + list(extra_notes or [])
    weights = scored.examples.select("example_id", "domain", "weight", "priority", "demand", "failure",
                                     "exposures", "negatives", "cluster")
    plan = Plan(
        domains=domain_scores(scored), examples=weights, layers=layer_plan, recommender=scored.recommender,
        segments=segments, inputs={**inputs, "config": _config_hash(cfg), "seed": cfg.seed},
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        extra={"failure_prior": scored.failure_prior, "notes": notes,
               "sampling": {"temperature": cfg.prioritize.temperature, "domain_floor": cfg.prioritize.domain_floor,
                            "replay": cfg.prioritize.replay,
                            "example_cap": cfg.prioritize.example_cap,
                            "cap_applies_to": "each cluster of near-duplicate examples (a lone example is its own)",
                            "clusters": int(weights["cluster"].n_unique())}},
    )
    if layers is not None:
        plan.extra["layer_matrix"] = {"domains": layers.domains, "values": layers.values.tolist(),
                                      "measured": layers.measured.tolist(), "depth_fraction": layers.depth_fraction,
                                      "probe_seconds": layers.probe_seconds, "method": layers.method}
    return plan


# ------------------------------------------------------------------------------------------------ entry


def prioritize(store_path: str | Path, cfg: Config, out: str | Path, model: str | None = None,
               progress: bool = False) -> PrioritizeResult:
    """Read the store, score domains / examples (and layers when ``model`` is given), write ``out``."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    store_path = Path(store_path)
    if not store_path.exists():
        raise InputError(f"store not found: {store_path}. Ingest logs first: "
                         f"`adaptive-ft ingest logs.jsonl --store {store_path}`.")
    with Store.open(store_path, read_only=True) as s:
        inter = dm.load_interactions(s, cfg.prioritize, source=str(store_path))
        active = set(inter.users["segment"].to_list())
        silent = [x for x in s.sql(dm.USER_SEGMENTS_SQL)["segment"].to_list() if x not in active]
        fingerprint = s.fingerprint()
        refs = s.examples()
    labelled = set(refs.filter(pl.col("reference").is_not_null() & (pl.col("reference") != ""))["example_id"])
    timings["read"] = time.perf_counter() - t
    scored = score_interactions(inter, cfg, progress=progress, timings=timings, labelled=labelled)
    notes = [f"segment {name!r} has users but no events: it gets no weight" for name in silent]
    scored.segments = _add_silent(scored.segments, silent)
    layers = None
    if model:
        t = time.perf_counter()
        layers = _plan_layers(scored, refs, cfg, model, progress)
        timings["layers"] = time.perf_counter() - t
        n_model = int(np.asarray(layers.values).shape[1])
        if cfg.prioritize.layers_k > n_model:
            notes.append(f"prioritize.layers_k={cfg.prioritize.layers_k} is more than the model's {n_model} layers: "
                         f"at most {n_model} could be selected ({len(layers.selected)} were)")
    t = time.perf_counter()
    plan = build_plan(scored, cfg, {"store": fingerprint, "store_path": str(store_path), "model": model},
                      layers, notes)
    path = plan.save(out)
    timings["write"] = time.perf_counter() - t
    return PrioritizeResult(plan, path, timings, plan.extra["notes"], layers)


def _add_silent(segments: pl.DataFrame, silent: list[str]) -> pl.DataFrame:
    """Segments known from the users table but absent from the events: listed with zero weight."""
    silent = [s for s in silent if s not in segments["segment"].to_list()]
    if not silent:
        return segments
    zeros = pl.DataFrame({"segment": silent, "users": [0] * len(silent), "traffic_share": [0.0] * len(silent),
                          "failure": [0.0] * len(silent), "weight": [0.0] * len(silent)}, schema=segments.schema)
    return pl.concat([segments, zeros])


def _plan_layers(scored: InteractionScores, refs: pl.DataFrame, cfg: Config, model_spec: str, progress: bool) -> LayerScores:
    """Probe the top domains' layer sensitivity on the model, from each domain's top examples with a reference."""
    import torch  # deferred: torch and transformers load only when layers are probed

    from adaptive_ft.lm.models import load_model  # deferred with them

    pc = cfg.prioritize
    ranked = domain_scores(scored)
    ex = scored.examples.join(refs.select("example_id", "prompt", "reference"), on="example_id", how="left")
    ex = ex.filter(pl.col("reference").is_not_null() & pl.col("prompt").is_not_null())
    examples: dict[str, list[tuple[str, str]]] = {}
    shares = []
    for d in ranked:
        if len(examples) >= pc.layer_domains:
            break
        top = ex.filter(pl.col("domain") == d.domain).sort(["priority", "example_id"], descending=[True, False])
        if top.height:
            examples[d.domain] = list(zip(top["prompt"].head(pc.probe_examples), top["reference"].head(pc.probe_examples)))
            shares.append(d.share)
    if not examples:
        raise InputError("--model given, but no planned example has both a prompt and a reference answer "
                         "to probe layers with; ingest an examples file with `reference`, or drop --model.")
    torch.manual_seed(cfg.seed)
    model, tok = load_model(model_spec)
    warmup = pc.layer_probe == "warmup"  # the warm-up imitates the run: its lr, rank and batch size
    return probe_layers(model, tok, examples, np.array(shares), fraction=pc.probe_fraction,
                        rank=cfg.train.lora.r if warmup else pc.probe_rank, steps=pc.probe_steps,
                        lr=cfg.train.lr if warmup else 1e-3, targets=cfg.train.lora.target_modules,
                        completion_rank=pc.completion_rank, k=pc.layers_k, cost_weight=pc.layer_cost_weight,
                        base_rank=cfg.train.lora.r, by_score=pc.rank_by_score, seed=cfg.seed, progress=progress,
                        method=pc.layer_probe, batch_size=cfg.train.batch_size)
