"""Per-segment evaluation: every model on the run's held-out test split, weighted by who asked what.

::

    from adaptive_ft.evaluate import evaluate
    result = evaluate("adaptive_ft.duckdb", ["base", "runs/r1", "export/r1/int8"], "eval.json")

Models: ``base`` (the run's base model), a train RUN folder (base + adapter), an HF folder (an export variant)
or a ``.gguf`` file. Each answers the test prompts greedily, formatted as training formatted them.

Scores per example: for label tasks (the run's ``task == "label"``, e.g. Banking77 intents) the answer's first
line is matched to the label set; for free text, the reference's loss under the model plus exact match and token
F1 of the answer. Cells: overall, per segment, per domain, per segment x domain. In a segment's cell each test
example counts as often as that segment's users asked it (``impression`` events in the store), so the
``n`` of a cell is queries; ``n_examples`` is distinct examples. A cell with fewer than ``min_count`` queries
or ``min_examples`` examples reports ``enough: false`` and no value. Intervals are percentile bootstraps over
examples (:mod:`adaptive_ft.metrics`), with the same resamples for every model, so base vs fine-tuned is paired.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tqdm import tqdm

from adaptive_ft.artifacts.run import is_run
from adaptive_ft.config import EvaluateConfig
from adaptive_ft.errors import InputError
from adaptive_ft.lm.answers import generate, label_responses, parse_label, reference_nll
from adaptive_ft.lm.models import load_any, read_run, resolve_variant
from adaptive_ft.lm.tokens import format_for_model
from adaptive_ft.metrics import (
    bootstrap_weights,
    exact_match,
    macro_prf,
    mean_loss,
    paired_bootstrap_delta,
    percentile_interval,
    token_f1,
    weighted_mean,
)
from adaptive_ft.store import Store
from adaptive_ft.store.traffic import load_traffic

LABEL_METRICS = ("accuracy", "precision", "recall", "f1")
TEXT_METRICS = ("loss", "perplexity", "exact_match", "token_f1")
LOWER_IS_BETTER = {"loss", "perplexity"}
PRIMARY = {"label": "accuracy", "text": "token_f1"}


@dataclass
class EvalResult:
    """What :func:`evaluate` wrote: ``eval.json`` (``data``) and the per-example outputs beside it."""

    path: Path
    outputs_path: Path
    data: dict[str, Any]


@dataclass
class ModelScores:
    """One model's per-example results on the test split (arrays aligned with the test frame)."""

    responses: list[str]
    correct: np.ndarray | None = None      # label task: answer == reference
    pred_idx: np.ndarray | None = None     # label task: index into the label set, -1 when no label
    exact: np.ndarray | None = None        # text task
    f1: np.ndarray | None = None
    nll_sum: np.ndarray | None = None
    n_tokens: np.ndarray | None = None
    true_idx: np.ndarray | None = None     # label task: the references' label indices (set per cell)


# ------------------------------------------------------------------------------------------- entry point


def evaluate(store: str | Path | None, models: list[str], out: str | Path, cfg: EvaluateConfig | None = None,
             run: str | Path | None = None) -> EvalResult:
    """Score ``models`` on the test split of ``run`` (default: the first RUN among ``models``) and write ``out``."""
    cfg = cfg or EvaluateConfig()
    problems = cfg.problems()  # the config's own checks, for callers that built an EvaluateConfig in code
    if problems:
        raise InputError("evaluate: " + "; ".join(problems))
    if not models:
        raise InputError("evaluate: no models given; e.g. --models base,runs/r1,export/r1/int8")
    missing = [m for m in models if m != "base" and not resolve_variant(Path(m)).exists()]
    if missing:
        raise InputError(f"evaluate: model(s) not found: {', '.join(missing)} (no such folder or file). --models "
                         f"takes base, RUN folders, EXPORT folders, EXPORT/<variant> and .gguf files")
    models = expand_models(models)
    run_dir = find_run(models, run)
    manifest = read_run(run_dir)
    split = _read_split(run_dir)
    test = split.filter(pl.col("split") == "test").unique("example_id").sort("example_id")
    if test.height == 0:
        raise InputError(f"{run_dir}/split.parquet has no test rows; train with train.test_fraction > 0")
    if 0 < cfg.max_examples < test.height:  # a seeded subset: the same examples for every model and every rerun
        test = test.sample(cfg.max_examples, seed=cfg.seed).sort("example_id")
    task = manifest.get("task", "label")
    traffic = load_traffic(store, cfg.query_events)
    if cfg.weighting == "cells":
        traffic = cell_traffic(store, cfg.query_events, test)
    labels = sorted(split["reference"].unique().to_list()) if task == "label" else []
    scored = {}
    for spec in models:
        scored[spec] = score_model(spec, run_dir, manifest, test, task, labels, cfg)
    data = summarize(test, split, traffic, scored, task, labels, cfg)
    data["run"] = str(run_dir)
    data["split_sha256"] = manifest.get("split_sha256")  # which split was scored: report matches eval to run by it
    data["variants"] = variant_figures(models)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    outputs_path = out.with_name(out.stem + ".outputs.parquet")
    data["outputs"] = outputs_path.name
    outputs_frame(test, scored, task).write_parquet(outputs_path)
    out.write_text(json.dumps(data, indent=2))
    return EvalResult(path=out, outputs_path=outputs_path, data=data)


def _json(path: Path) -> dict[str, Any]:
    """A manifest as a dict ({} when it is not a JSON object), for telling runs and exports apart."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def expand_models(models: list[str]) -> list[str]:
    """An EXPORT folder stands for each variant in its manifest (``EXPORT/merged``, ``EXPORT/int8``...)."""
    out = []
    for spec in models:
        manifest = Path(spec) / "manifest.json"
        if spec != "base" and manifest.is_file() and not is_run(Path(spec)):
            variants = json.loads(manifest.read_text()).get("variants")
            if variants is not None:
                out += [str(Path(spec) / v["path"]) for v in variants]
                continue
        out.append(spec)
    return out


def find_run(models: list[str], run: str | Path | None) -> Path:
    """The train run whose split and base model the evaluation uses."""
    if run is not None:
        return Path(run)
    for spec in models:
        path = Path(spec)
        if is_run(path):
            return path
        if spec != "base" and (path / "manifest.json").is_file() and "base_model" in _json(path / "manifest.json") \
                and not isinstance(_json(path / "manifest.json").get("variants"), list):
            raise InputError(f"{path}: a train run without its adapter/ (was training interrupted? continue it with "
                             f"`adaptive-ft train --resume --out {path} ...`)")
        # An EXPORT folder, or a variant inside one (EXPORT/int8, EXPORT/model-q8_0.gguf): its manifest names the run.
        for candidate in (path / "manifest.json", path.parent / "manifest.json"):
            doc = _json(candidate) if candidate.is_file() else {}
            if isinstance(doc.get("variants"), list) and doc.get("run"):
                return Path(doc["run"])
    raise InputError("evaluate: none of the models is a train run or an export of one; pass --run RUN "
                     "(the folder with split.parquet)")


def _read_split(run_dir: Path) -> pl.DataFrame:
    path = run_dir / "split.parquet"
    if not path.is_file():
        raise InputError(f"{path}: missing; the train run saves its data split there (adaptive-ft train)")
    return pl.read_parquet(path)




def cell_traffic(store: str | Path | None, query_events: list[str], test: pl.DataFrame) -> pl.DataFrame:
    """``weighting: cells``: each test example stands for its domain's unseen queries. Segment s's weight on a
    test example of domain d is the log's queries of (s, d) spread evenly over d's test examples.

    Per-query weighting (the default) counts each test example as often as the log asked it; on Zipf-popular
    traffic that leaves an effective sample of a few dozen examples however large the test split (a few
    popular examples carry most of the weight), so the figures and their intervals swing with whether those
    few were answered right. Cell weighting keeps every segment x domain cell's share of real traffic and
    spreads it over every held-out example of the domain.
    """
    if store is None:
        return load_traffic(None, query_events)
    with Store.open(store, read_only=True) as s:
        events = s.events().select("example_id", "segment", "event")
        domains = s.examples().select("example_id", "domain")
    return spread_cells(events, domains, query_events, test)


def spread_cells(events: pl.DataFrame, domains: pl.DataFrame, query_events: list[str], test: pl.DataFrame
                 ) -> pl.DataFrame:
    """(example_id, segment, n) for the test examples: each (segment, domain)'s queries in ``events`` divided
    evenly among the domain's test examples (see :func:`cell_traffic`)."""
    queries = events.filter(pl.col("event").is_in(query_events))
    if queries.height == 0:
        queries = events
    per_cell = (queries.join(domains, on="example_id", how="left").group_by("segment", "domain")
                .agg(total=pl.len().cast(pl.Float64)))
    k = test.group_by("domain").agg(k=pl.len())
    return (test.select("example_id", "domain").join(per_cell, on="domain").join(k, on="domain")
            .select("example_id", "segment", n=pl.col("total") / pl.col("k")))


# ------------------------------------------------------------------------------------------- running models


def score_model(spec: str, run_dir: Path, manifest: dict[str, Any], test: pl.DataFrame, task: str,
                labels: list[str], cfg: EvaluateConfig) -> ModelScores:
    """Load ``spec``, answer every test prompt greedily and score each answer."""
    model, tokenizer = load_any(manifest["base_model_path"] if spec == "base" else spec)
    prompts = [format_for_model(tokenizer, p, manifest) for p in test["prompt"].to_list()]
    refs = test["reference"].to_list()
    if task == "label" and not cfg.decode_all:
        responses = label_responses(model, tokenizer, prompts, refs, labels, cfg.batch_size, cfg.max_new_tokens,
                                    cfg.decode_rejected, desc=spec)
    else:
        responses = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, desc=spec)
    if task == "label":
        index = {label: i for i, label in enumerate(labels)}
        answers = [parse_label(r, index) for r in responses]
        pred_idx = np.array([index.get(a, -1) if a is not None else -1 for a in answers])
        correct = np.array([a == ref for a, ref in zip(answers, refs)], dtype=float)
        return ModelScores(responses, correct=correct, pred_idx=pred_idx)
    nll, ntok = reference_nll(model, tokenizer, prompts, refs)
    return ModelScores(responses, exact=np.array([exact_match(r, t) for r, t in zip(responses, refs)]),
                  f1=np.array([token_f1(r, t) for r, t in zip(responses, refs)]), nll_sum=nll, n_tokens=ntok)










# ------------------------------------------------------------------------------------------- scoring cells


def metric_fn(s: ModelScores, task: str, n_labels: int, label_mask: np.ndarray | None):
    """A function of example weights ``(B, n)`` -> {metric: (B,)} for one model on one cell's examples."""
    if task == "label":
        def stats(w: np.ndarray) -> dict[str, np.ndarray]:
            p, r, f = macro_prf(s.true_idx, s.pred_idx, n_labels, w, label_mask)
            return {"accuracy": weighted_mean(s.correct, w), "precision": p, "recall": r, "f1": f}
    else:
        def stats(w: np.ndarray) -> dict[str, np.ndarray]:
            loss = mean_loss(s.nll_sum, s.n_tokens, w)
            return {"loss": loss, "perplexity": np.exp(loss), "exact_match": weighted_mean(s.exact, w),
                    "token_f1": weighted_mean(s.f1, w)}
    return stats


def _subset(s: ModelScores, idx: np.ndarray, true_idx: np.ndarray | None) -> ModelScores:
    """The model's results on the examples ``idx`` (``true_idx`` rides along for macro metrics)."""
    out = ModelScores([s.responses[i] for i in idx])
    for name in ("correct", "pred_idx", "exact", "f1", "nll_sum", "n_tokens"):
        value = getattr(s, name)
        setattr(out, name, None if value is None else value[idx])
    out.true_idx = None if true_idx is None else true_idx[idx]
    return out


def cell_weights(test: pl.DataFrame, traffic: pl.DataFrame) -> tuple[dict[tuple, np.ndarray], list[str], list[str]]:
    """Query-count weights per cell ``(scope, segment, domain)`` over the test examples, in test order."""
    ids = test["example_id"].to_list()
    domains = np.array(test["domain"].to_list())
    pos = {e: i for i, e in enumerate(ids)}
    seg_w: dict[str, np.ndarray] = {}
    for row in traffic.filter(pl.col("example_id").is_in(ids)).iter_rows(named=True):
        seg_w.setdefault(row["segment"], np.zeros(len(ids)))[pos[row["example_id"]]] += row["n"]
    # No traffic for the test split (no store given): every example counts once, in one segment "all".
    overall = sum(seg_w.values()) if seg_w else np.ones(len(ids))
    segments = sorted(seg_w) if seg_w else []
    domain_names = sorted(set(domains.tolist()))
    cells: dict[tuple, np.ndarray] = {("overall", None, None): overall}
    for seg in segments:
        cells[("segment", seg, None)] = seg_w[seg]
    for dom in domain_names:
        cells[("domain", None, dom)] = overall * (domains == dom)
    for seg in segments:
        for dom in domain_names:
            cells[("segment_domain", seg, dom)] = seg_w[seg] * (domains == dom)
    return cells, segments, domain_names


def _seed(cfg: EvaluateConfig, key: tuple) -> int:
    """One seed per cell, the same for every model, so their resamples pair up."""
    return (cfg.seed * 1_000_003 + zlib.crc32(repr(key).encode())) % 2**32


def score_cells(test: pl.DataFrame, traffic: pl.DataFrame, scored: dict[str, ModelScores], task: str, labels: list[str],
                cfg: EvaluateConfig) -> list[dict[str, Any]]:
    """Every metric of every model in every cell, with its bootstrap interval, ``n`` and ``enough``."""
    cells, _, _ = cell_weights(test, traffic)
    index = {label: i for i, label in enumerate(labels)}
    true_idx = np.array([index.get(r, -1) for r in test["reference"].to_list()]) if task == "label" else None
    names = LABEL_METRICS if task == "label" else TEXT_METRICS
    rows = []
    for key, w in tqdm(cells.items(), desc="scoring cells", unit="cell", disable=None):
        idx = np.flatnonzero(w > 0)
        n, n_ex = int(w.sum()), len(idx)
        enough = n >= cfg.min_count and n_ex >= cfg.min_examples
        counts = bootstrap_weights(w[idx], cfg.bootstrap, _seed(cfg, key)) if enough else None
        mask = _label_mask(true_idx[idx], len(labels)) if task == "label" else None
        for model, s in scored.items():
            stats = metric_fn(_subset(s, idx, true_idx), task, len(labels), mask)
            point = stats(w[idx][None, :]) if enough else {}
            boot = stats(counts) if enough else {}
            for m in names:
                rows.append(_row(model, key, m, point.get(m), boot.get(m), n, n_ex, enough))
    return rows


def _label_mask(true_idx: np.ndarray, n_labels: int) -> np.ndarray:
    """Macro averages run over the labels the cell's references contain (a domain cell has a few of 77)."""
    mask = np.zeros(n_labels, dtype=bool)
    mask[true_idx[true_idx >= 0]] = True
    return mask


def _row(model: str, key: tuple, metric: str, point: np.ndarray | None, boot: np.ndarray | None, n: int,
         n_ex: int, enough: bool) -> dict[str, Any]:
    scope, segment, domain = key
    row = {"model": model, "scope": scope, "segment": segment, "domain": domain, "metric": metric,
           "value": None, "ci_low": None, "ci_high": None, "n": n, "n_examples": n_ex, "enough": enough}
    if enough and point is not None and np.isfinite(point[0]):
        row["value"] = round(float(point[0]), 6)
        low, high = percentile_interval(boot)  # metrics.bootstrap_ci's interval, on resamples shared by models
        if np.isfinite(low):
            row["ci_low"], row["ci_high"] = round(low, 6), round(high, 6)
    return row


# ------------------------------------------------------------------------------------------- summaries


def summarize(test: pl.DataFrame, split: pl.DataFrame, traffic: pl.DataFrame, scored: dict[str, ModelScores], task: str,
              labels: list[str], cfg: EvaluateConfig) -> dict[str, Any]:
    """The eval.json body (docs/contracts.md, "Evaluation")."""
    primary = PRIMARY[task]
    rows = score_cells(test, traffic, scored, task, labels, cfg)
    models = list(scored)
    tuned = next((m for m in models if m not in ("base", cfg.baseline)), models[0])
    worst = [w for m in models if (w := worst_segment(rows, m, primary))]
    gaps = [g for m in models if (g := largest_gap(rows, m, primary))]
    cells, _, _ = cell_weights(test, traffic)
    return {
        "task": task, "models": models, "primary_metric": primary, "finetuned_model": tuned,
        "n_test_examples": test.height, "n_test_queries": int(cells[("overall", None, None)].sum()),
        "labels": labels, "metrics": rows,
        "worst_segment": next((w for w in worst if w["model"] == tuned), None), "worst_segments": worst,
        "largest_gap": next((g for g in gaps if g["model"] == tuned), None), "largest_gaps": gaps,
        **segment_deltas(test, traffic, scored, task, labels, cfg),
        "representation": representation(split, traffic, cfg.underserved_ratio),
        "settings": {"bootstrap": cfg.bootstrap, "min_count": cfg.min_count, "min_examples": cfg.min_examples,
                     "seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens, "query_events": cfg.query_events,
                     "max_examples": cfg.max_examples},
    }


def _segment_values(rows: list[dict[str, Any]], model: str, metric: str) -> list[tuple[str, float]]:
    return [(r["segment"], r["value"]) for r in rows if r["model"] == model and r["scope"] == "segment"
            and r["metric"] == metric and r["value"] is not None]


def worst_segment(rows: list[dict[str, Any]], model: str, metric: str) -> dict[str, Any] | None:
    """The segment (with enough traffic) where ``model`` does worst on ``metric``."""
    values = _segment_values(rows, model, metric)
    if not values:
        return None
    pick = max if metric in LOWER_IS_BETTER else min
    seg, value = pick(values, key=lambda sv: sv[1])
    return {"model": model, "segment": seg, "metric": metric, "value": value}


def largest_gap(rows: list[dict[str, Any]], model: str, metric: str) -> dict[str, Any] | None:
    """Best minus worst segment of ``model`` on ``metric`` (needs two segments with enough traffic)."""
    values = sorted(_segment_values(rows, model, metric), key=lambda sv: sv[1],
                    reverse=metric not in LOWER_IS_BETTER)
    if len(values) < 2:
        return None
    return {"model": model, "metric": metric, "best": values[0][0], "worst": values[-1][0],
            "gap": round(abs(values[0][1] - values[-1][1]), 6)}


def segment_deltas(test: pl.DataFrame, traffic: pl.DataFrame, scored: dict[str, ModelScores], task: str,
                   labels: list[str], cfg: EvaluateConfig) -> dict[str, Any]:
    """Paired bootstrap of (model - baseline) on the primary metric per segment; ``flags`` where it surely dropped.

    The baseline is ``cfg.baseline`` when that model was scored (the loop compares v2 against the deployed
    v1), else "base". The same is done per domain (``domain_deltas``, ``domain_flags``) and overall
    (``overall_deltas``): "harmed no one" is asked of domains as well as of segments.
    """
    ref = cfg.baseline if cfg.baseline in scored else "base"
    if ref not in scored:
        return {"deltas": [], "flags": []}
    cells, segments, domains = cell_weights(test, traffic)
    seg_keys = [("segment", seg, None) for seg in segments] or [("overall", None, None)]
    deltas, flags = _paired_deltas(test, cells, seg_keys, scored, ref, task, labels, cfg)
    dom_deltas, dom_flags = _paired_deltas(test, cells, [("domain", None, d) for d in domains], scored, ref, task,
                                           labels, cfg)
    overall, _ = _paired_deltas(test, cells, [("overall", None, None)], scored, ref, task, labels, cfg)
    return {"deltas": deltas, "flags": flags, "baseline": ref, "domain_deltas": dom_deltas,
            "domain_flags": dom_flags, "overall_deltas": overall}


def _paired_deltas(test: pl.DataFrame, cells: dict[tuple, np.ndarray], keys: list[tuple], scored: dict[str, ModelScores],
                   ref: str, task: str, labels: list[str], cfg: EvaluateConfig
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """For each cell key: every model's paired-bootstrap delta against ``ref``, and the rows that surely dropped."""
    primary = PRIMARY[task]
    sign = -1.0 if primary in LOWER_IS_BETTER else 1.0
    index = {label: i for i, label in enumerate(labels)}
    true_idx = np.array([index.get(r, -1) for r in test["reference"].to_list()]) if task == "label" else None
    deltas, flags = [], []
    for key in keys:
        w = cells[key]
        idx = np.flatnonzero(w > 0)
        if w.sum() < cfg.min_count or len(idx) < cfg.min_examples:
            continue
        mask = _label_mask(true_idx[idx], len(labels)) if task == "label" else None
        base = metric_fn(_subset(scored[ref], idx, true_idx), task, len(labels), mask)
        for model, s in scored.items():
            if model == ref:
                continue
            other = metric_fn(_subset(s, idx, true_idx), task, len(labels), mask)
            b0, m0 = base(w[idx][None, :])[primary][0], other(w[idx][None, :])[primary][0]
            # metrics.paired_bootstrap_delta: both models on the same resamples of this cell's examples
            _, low, high = paired_bootstrap_delta(lambda x, f=base: f(x)[primary], lambda x, f=other: f(x)[primary],
                                                  w[idx], cfg.bootstrap, _seed(cfg, key))
            where = {"domain": key[2]} if key[0] == "domain" else {"segment": key[1] if key[0] == "segment" else "all"}
            row = {"model": model, **where, "metric": primary,
                   "base": round(float(b0), 6), "finetuned": round(float(m0), 6), "delta": round(float(m0 - b0), 6),
                   "ci_low": round(float(low), 6), "ci_high": round(float(high), 6), "n": int(w.sum())}
            deltas.append(row)
            worse_bound = high * sign if sign > 0 else low * sign  # the CI end nearest "no worse"
            if worse_bound < 0:
                flags.append({**row, "reason": "dropped from base to fine-tuned" if ref == "base"
                              else f"dropped from {ref} to {model}"})
    return deltas, flags


def representation(split: pl.DataFrame, traffic: pl.DataFrame, ratio: float) -> list[dict[str, Any]]:
    """Each segment's and domain's share of the training sample beside its share of traffic.

    The training sample is what the run drew: each training example weighs its sampling probability
    (``weight`` in RUN/split.parquet), or the same for every example when the split has no weights.
    """
    train = split.filter(pl.col("split") == "train")
    if train.height == 0 or traffic.height == 0:
        return []
    total = traffic["n"].sum()
    out = []
    # A training example serves each segment in proportion to that segment's share of its traffic.
    per_ex = traffic.with_columns(share=pl.col("n") / pl.col("n").sum().over("example_id"))
    # The run's sampling probability per training example (RUN/split.parquet's weight), else each example once.
    if "weight" in train.columns and train["weight"].sum() > 0:
        train = train.with_columns(w=pl.col("weight") / pl.col("weight").sum())
    else:
        train = train.with_columns(w=pl.lit(1.0 / train.height))
    seg_train = (train.select("example_id", "w").join(per_ex, on="example_id", how="inner")
                 .group_by("segment").agg((pl.col("share") * pl.col("w")).sum()))
    seg_traffic = traffic.group_by("segment").agg(pl.col("n").sum())
    served = {r["segment"]: r["share"] for r in seg_train.iter_rows(named=True)}
    n_attributed = max(sum(served.values()), 1e-12)
    for r in seg_traffic.sort("segment").iter_rows(named=True):
        out.append(_rep_row("segment", r["segment"], served.get(r["segment"], 0.0) / n_attributed, r["n"] / total,
                            ratio))
    dom_traffic = (traffic.join(split.select("example_id", "domain").unique("example_id"), on="example_id")
                   .group_by("domain").agg(pl.col("n").sum()))
    known = dom_traffic["n"].sum() or 1
    dom_train = dict(train.group_by("domain").agg(pl.col("w").sum()).iter_rows())
    for r in dom_traffic.sort("domain").iter_rows(named=True):
        out.append(_rep_row("domain", r["domain"], dom_train.get(r["domain"], 0.0), r["n"] / known, ratio))
    return out


def _rep_row(kind: str, name: str, train_share: float, traffic_share: float, ratio: float) -> dict[str, Any]:
    return {"kind": kind, "name": name, "train_share": round(train_share, 6),
            "traffic_share": round(traffic_share, 6), "underserved": bool(train_share < ratio * traffic_share)}


def variant_figures(models: list[str]) -> dict[str, dict[str, Any]]:
    """Size and latency of the models that are export variants, from their EXPORT/manifest.json."""
    out = {}
    for spec in models:
        path = resolve_variant(Path(spec))  # EXPORT/<variant name> finds its figures too
        manifest = path.parent / "manifest.json"
        if spec == "base" or not manifest.is_file():
            continue
        data = json.loads(manifest.read_text())
        for v in data.get("variants", []):
            if v.get("path") == path.name:
                out[spec] = {k: v.get(k) for k in ("name", "size_bytes", "ms_per_token", "load_seconds",
                                                   "agreement")}
    return out


def outputs_frame(test: pl.DataFrame, scored: dict[str, ModelScores], task: str) -> pl.DataFrame:
    """One row per model x test example: the answer and its score (what ``review export`` samples from)."""
    frames = []
    for model, s in scored.items():
        score = s.correct if task == "label" else s.f1
        frames.append(test.select("example_id", "domain", "prompt", "reference").with_columns(
            model=pl.lit(model), response=pl.Series(s.responses, dtype=pl.String),
            score=pl.Series(score.astype(float))))
    return pl.concat(frames)
