"""The report's sections and its summary: one builder per section, each reading :class:`Artifacts` and
returning a :class:`Section` (or None when its input is absent), so the report has a section for each input.

Builders never draw on missing data: a plot function returns None without its numbers, and the section
keeps its table. Everything a section shows is also put in its ``data`` for report.json.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from adaptive_ft.artifacts.eval import EvalView, as_number, is_rate
from adaptive_ft.files import file_sha256
from adaptive_ft.report import plots
from adaptive_ft.report.inputs import Artifacts
from adaptive_ft.report.page import (
    TOP_WHY,
    Bullet,
    Cell,
    Figure,
    Section,
    Summary,
    Table,
    Tile,
    fmt_bytes,
    fmt_delta,
    fmt_value,
    tone_of,
)

# ----------------------------------------------------------------------------------------------- summary


def summary(arts: Artifacts) -> Summary:
    """The top card: trained on what and why, what improved for whom, flags, worst segment, quantized size."""
    s = Summary()
    _summary_store(arts, s)
    _summary_plan(arts, s)
    _summary_eval(arts, s)
    _summary_size(arts, s)
    _summary_run(arts, s)
    return s


def _summary_store(arts: Artifacts, s: Summary) -> None:
    if arts.store is None:
        return
    seg, dom = traffic_tables(arts.store.get("counts") or [])
    total = sum(r["events"] for r in seg)
    s.data["store"] = {"events": total, "users": arts.store.get("users")}
    worst = max((r for r in dom if r["negative_rate"] is not None), key=lambda r: r["negative_rate"], default=None)
    text = f"Logs: {_n(total, 'event')} from {_n(arts.store.get('users'), 'user')}"
    if worst:
        text += f"; most negative feedback on **{worst['name']}** ({worst['negative_rate']:.0%})"
    s.bullets.append(text + ".")


def _summary_plan(arts: Artifacts, s: Summary) -> None:
    if arts.plan is None:
        return
    top = arts.plan.domains[:TOP_WHY]
    s.data["trained_on"] = [{"domain": d.domain, "priority": d.priority, "why": d.why} for d in top]
    n = len(arts.plan.domains)
    head = (f"Trained on {n} domain{'s' if n != 1 else ''}, led by (expected unmet need, highest first):"
            if n > len(top) else "Trained on (expected unmet need, highest first):")
    s.bullets.append(Bullet(head, [f"**{d.domain}**" + (f" — {d.why}" if d.why else "") for d in top]))
    if arts.plan.layers:
        s.data["layers"] = arts.plan.layers.selected
        sel = arts.plan.layers.selected
        s.bullets.append(f"LoRA on layer{'s' if len(sel) != 1 else ''} {_ranges(sel)}, chosen by the plan.")


def _summary_eval(arts: Artifacts, s: Summary) -> None:
    ev = arts.eval
    if ev is None:
        return
    b, t = ev.value(ev.base, "overall"), ev.value(ev.tuned, "overall")
    d = None if b is None or t is None else t - b
    s.data.update(primary_metric=ev.metric, base_model=ev.base, finetuned_model=ev.tuned,
                  overall={"base": b, "finetuned": t, "delta": d})
    s.tiles.append(Tile(f"{ev.metric} · fine-tuned" if t is not None else f"{ev.metric} · base",
                        fmt_value(t if t is not None else b, ev.pct),
                        f"{fmt_value(b, ev.pct)} base → {fmt_delta(d, ev.pct)}" if d is not None else "overall",
                        tone_of(d, ev.metric)))
    per_seg = {seg: _segment_delta(ev, seg) for seg in ev.names("segment")}
    s.data["segment_delta"] = per_seg
    flagged = {f.get("segment") for f in ev.flags()}
    s.chips = [Tile(seg, fmt_delta(dl, ev.pct), "flagged" if seg in flagged else "",
                    "bad" if seg in flagged else tone_of(dl, ev.metric))
               for seg, dl in per_seg.items() if dl is not None]
    parts = [f"{seg} {fmt_delta(dl, ev.pct)}" for seg, dl in per_seg.items() if dl is not None]
    if parts:
        s.bullets.append(Bullet(f"{ev.metric.capitalize()} from {ev.label(ev.base)} to {ev.label(ev.tuned)}, "
                                f"per segment: " + ", ".join(parts) + ".", text_only=True))
    if ev.names("segment") or ev.flags():
        _summary_flags(ev, s)
    else:
        s.bullets.append("No per-segment results: the evaluation had no traffic to split the test set by segment "
                         "(run `adaptive-ft evaluate` with --store).")
    worst = ev.doc.get("worst_segment") or {}
    if worst.get("segment") is not None:
        s.data["worst_segment"] = worst
        s.tiles.append(Tile("worst segment", str(worst["segment"]),
                            f"{fmt_value(as_number(worst.get('value')), ev.pct)} {worst.get('metric', ev.metric)}"
                            f" ({ev.label(worst.get('model'))})", "warn"))
    gap = ev.doc.get("largest_gap") or {}
    if as_number(gap.get("gap")) is not None:
        s.data["largest_gap"] = gap
        s.bullets.append(f"Largest gap between segments: {fmt_delta(as_number(gap['gap']), ev.pct).lstrip('+')} "
                         f"({gap.get('best')} vs {gap.get('worst')}, {ev.label(gap.get('model'))}).")


def _segment_delta(ev: EvalView, segment: str) -> float | None:
    """evaluate's paired-bootstrap delta when it wrote one, else the difference of the two point estimates."""
    paired = as_number((ev.paired_delta(segment) or {}).get("delta"))
    return paired if paired is not None else ev.delta("segment", segment)


def _summary_flags(ev: EvalView, s: Summary) -> None:
    flags = ev.flags()
    s.data["flags"] = flags
    if flags:
        names = ", ".join(f"{f.get('segment')} ({fmt_delta(as_number(f.get('delta')), ev.pct)})" for f in flags)
        s.bullets.append(f"⚠ Flagged: {names} — worse than base with a 95% interval that excludes zero.")
        s.tiles.append(Tile("flagged segments", str(len(flags)), names, "bad"))
    else:
        s.bullets.append("No segment got measurably worse (no drop whose 95% interval excludes zero).")
        s.tiles.append(Tile("flagged segments", "0", "no measurable drop", "good"))


def _summary_size(arts: Artifacts, s: Summary) -> None:
    variants = _variant_records(arts)
    quant = [v for v in variants if v["name"] != "merged" and v.get("size_bytes")]
    if not quant:
        return
    small = min(quant, key=lambda v: v["size_bytes"])
    merged = next((v["size_bytes"] for v in variants if v["name"] == "merged" and v.get("size_bytes")), None)
    ratio = small["size_bytes"] / merged if merged else None
    s.data["smallest_variant"] = {"name": small["name"], "size_bytes": small["size_bytes"], "vs_merged": ratio}
    detail = f"{small['name']}" + (f", {ratio:.0%} of merged" if ratio else "")
    s.tiles.append(Tile("quantized size", fmt_bytes(small["size_bytes"]), detail, "info"))


def _summary_run(arts: Artifacts, s: Summary) -> None:
    man = arts.run_manifest or {}
    if not man and not arts.run_metrics:
        return
    best = _best_step(arts)
    s.data["run"] = {"base_model": man.get("base_model"), "best_step": best, "stop_reason": man.get("stop_reason")}
    if man.get("base_model"):
        stop = f", {man['stop_reason']}" if man.get("stop_reason") else ""
        s.bullets.append(f"Fine-tuned {man['base_model']} with LoRA; best step "
                         f"{f'{best:g}' if best is not None else '—'}{stop}.")


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5] -> '0–2, 5'."""
    out, xs = [], sorted(xs)
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}–{xs[j]}")
        i = j + 1
    return ", ".join(out)


# ----------------------------------------------------------------------------------------------- plan


def _plan_section(arts: Artifacts) -> Section | None:
    plan = arts.plan
    if plan is None:
        return None
    doms = plan.domains
    sec = Section("plan", "What we trained on, and why",
                  intro="The plan ranks domains by expected unmet need: how much each segment asks for a domain "
                        "(demand, from collaborative filtering) times how often the answers fail (failure).")
    png = plots.priority_bars([d.domain for d in doms], [d.priority for d in doms], [d.demand for d in doms],
                              [d.failure for d in doms])
    if png:
        sec.figures.append(Figure(png, "Domain priority, demand and failure",
                                  _top_note(len(doms), "domains by priority")))
    rows = [[d.domain, f"{d.priority:.3f}", f"{d.demand:.3f}", f"{d.failure:.1%}", f"{d.share:.1%}", d.why or "—"]
            for d in doms]
    sec.tables.append(Table(["domain", "priority", "demand", "failure", "share of sample", "why"], rows))
    if plan.segments:
        sec.tables.append(_segments_table(plan.segments))
    sec.data = {"domains": [_domain_dict(d) for d in doms], "segments": plan.segments, "inputs": plan.inputs,
                "created": plan.created, "n_examples": plan.example_weights().height}
    _plan_consistency(arts, sec)
    return sec


def _domain_dict(d: Any) -> dict[str, Any]:
    return {"domain": d.domain, "priority": d.priority, "demand": d.demand, "failure": d.failure,
            "share": d.share, "why": d.why, "segments": d.segments}


def _segments_table(segments: list[dict[str, Any]]) -> Table:
    keys = dict.fromkeys(k for s in segments for k, v in s.items()
                         if k != "segment" and isinstance(v, (int, float, str)) and not isinstance(v, bool))
    cols = ["segment"] + [k.replace("_", " ") for k in keys]
    rows = [[str(s.get("segment", "?"))] + [_fmt_any(s.get(k)) for k in keys] for s in segments]
    return Table(cols, rows, "Segment weights used by the plan")


def _fmt_any(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "—" if v is None else str(v)


def _top_note(n: int, what: str) -> str:
    return f"The top {plots.MAX_ROWS} of {n} {what}; the table has all of them." if n > plots.MAX_ROWS else ""


def _plan_consistency(arts: Artifacts, sec: Section) -> None:
    """Say whether the run was trained on this plan and whether the store changed since the plan."""
    man = arts.run_manifest or {}
    if arts.plan_path is not None and man.get("plan_sha256"):
        same = man["plan_sha256"] == file_sha256(arts.plan_path)
        sec.data["run_used_this_plan"] = same
        sec.callouts.append(("good", "The run was trained on this plan (same sha256).") if same else
                            ("warn", "The run's plan_sha256 differs from this plan.json: it was trained on "
                                     "another version of the plan."))
    if arts.store is not None and arts.plan is not None and arts.plan.inputs.get("store"):
        same = arts.plan.inputs["store"] == arts.store.get("fingerprint")
        sec.data["store_unchanged_since_plan"] = same
        if not same:
            sec.callouts.append(("info", "The store has been ingested into since this plan was made; "
                                         "`adaptive-ft prioritize` would see newer data."))


# ----------------------------------------------------------------------------------------------- layers


def _layers_section(arts: Artifacts) -> Section | None:
    lay = arts.plan.layers if arts.plan else None
    if lay is None:
        return None
    warmup = (arts.plan.extra.get("layer_matrix") or {}).get("method") == "warmup"
    how = ("Every domain × layer cell is measured: a short LoRA warm-up on all layers, then each layer's adapter "
           "switched off in turn; a cell is how much that domain's held-out loss rises." if warmup else
           "A fraction of the domain × layer cells is measured by a probe; the rest is completed by matrix "
           "factorization.")
    sec = Section("layers", "Which layers get adapters",
                  intro=f"Selected: layer{'s' if len(lay.selected) != 1 else ''} {_ranges(lay.selected)}. " + how)
    grid = layer_matrix(arts.plan.extra.get("layer_matrix")) or layer_grid(lay.scores)
    if grid is not None:
        rows, layers, score, measured = grid
        png = plots.layer_heatmap(rows, layers, score, measured, lay.selected)
        if png:
            sec.figures.append(Figure(png, "Domain × layer scores, measured vs completed"))
        sec.data["grid"] = {"rows": rows, "layers": layers, "score": _nan_to_none(score),
                            "measured": measured.tolist()}
        sec.data["measured_fraction"] = float(measured[np.isfinite(score)].mean()) if np.isfinite(score).any() \
            else None
    if lay.spearman_vs_full is not None:
        sec.callouts.append(("info", f"Completed scores against fully measured cells: Spearman ρ = "
                                     f"{lay.spearman_vs_full:.2f}."))
    if lay.scores:
        sec.tables.append(_layer_table(lay))
    sec.data.update(selected=lay.selected, rank_pattern=lay.rank_pattern, spearman_vs_full=lay.spearman_vs_full)
    return sec


def _layer_table(lay: Any) -> Table:
    """One row per scored layer: its score, how many of its cells were measured, selected or not, its rank."""
    rows = []
    for r in sorted((r for r in lay.scores if isinstance(r, dict) and isinstance(r.get("layer"), int)),
                    key=lambda r: r["layer"]):
        measured = (f"{r['measured_cells']} of {r['cells']}" if "measured_cells" in r and "cells" in r
                    else ("yes" if r.get("measured") else "no"))
        chosen = r["layer"] in lay.selected
        rows.append([str(r["layer"]), _fmt_num(r.get("score", r.get("value")), 4), measured,
                     Cell("selected", tone="good") if chosen else "",
                     str(lay.rank_pattern.get(str(r["layer"]), "—" if not chosen else "default"))])
    return Table(["layer", "score", "measured", "", "LoRA rank"], rows, "Layer scores")


def layer_matrix(doc: Any) -> tuple[list[str], list[int], np.ndarray, np.ndarray] | None:
    """The grid from plan.json's ``layer_matrix`` (domains, values (D, L), measured (D, L)), as prioritize writes."""
    if not isinstance(doc, dict) or not doc.get("values") or not doc.get("domains"):
        return None
    score = np.array([[np.nan if as_number(v) is None else v for v in row] for row in doc["values"]], dtype=float)
    measured = np.array(doc.get("measured") or np.zeros_like(score), dtype=bool)
    if score.ndim != 2 or score.shape[0] != len(doc["domains"]) or measured.shape != score.shape:
        return None
    return [str(d) for d in doc["domains"]], list(range(score.shape[1])), score, measured


def layer_grid(scores: list[dict[str, Any]]) -> tuple[list[str], list[int], np.ndarray, np.ndarray] | None:
    """(row names, layers, score matrix with NaN for no value, measured mask) from the plan's score records.

    Records without a ``domain`` form one row, "all domains".
    """
    recs = [r for r in scores if isinstance(r, dict) and isinstance(r.get("layer"), int)]
    if not recs:
        return None
    rows = list(dict.fromkeys(str(r.get("domain", "all domains")) for r in recs))
    layers = sorted({r["layer"] for r in recs})
    score = np.full((len(rows), len(layers)), np.nan)
    measured = np.zeros_like(score, dtype=bool)
    for r in recs:
        i, j = rows.index(str(r.get("domain", "all domains"))), layers.index(r["layer"])
        v = as_number(r.get("score", r.get("value")))
        score[i, j] = np.nan if v is None else v
        measured[i, j] = bool(r.get("measured", False))
    return rows, layers, score, measured


def _nan_to_none(a: np.ndarray) -> list[list[float | None]]:
    return [[None if not np.isfinite(x) else float(x) for x in row] for row in a]


# ----------------------------------------------------------------------------------------------- recommender

_RANK_WORDS = ("precision", "recall", "ndcg", "map", "mrr", "coverage", "hit")
_SEGMENT_KEYS = ("segments", "per_segment", "by_segment")


def recommender_rows(rec: Any) -> list[dict[str, Any]]:
    """Flatten the plan's recommender metrics into rows (group, method, metric, value).

    The contract leaves the nesting to ``prioritize``; this reads the shapes it may reasonably take:
    ``{"overall": {"model": {...}, "popularity": {...}}, "segments": {"free": {...}}}``, lists of
    ``{"segment", "method", "metric", "value"}`` records, or a mix. ``group`` is "overall" or a segment;
    ``method`` is "popularity" for anything named like a popularity/baseline, else the model.
    """
    out: list[dict[str, Any]] = []
    _walk(rec, {"group": "overall", "method": "model", "in_segments": False}, out)
    dedup = {(r["group"], r["method"], r["metric"]): r for r in out}
    return list(dedup.values())


def _is_metric_key(key: str) -> bool:
    k = key.lower()
    return "@" in k or any(k.startswith(w) for w in _RANK_WORDS)


def _walk(node: Any, ctx: dict[str, Any], out: list[dict[str, Any]]) -> None:
    if isinstance(node, list):
        for item in node:
            _walk(item, ctx, out)
        return
    if not isinstance(node, dict):
        return
    ctx = dict(ctx)
    if isinstance(node.get("segment"), str):
        ctx["group"] = node["segment"]
    for key in ("method", "model", "baseline", "recommender"):
        if isinstance(node.get(key), str):
            ctx["method"] = _method_name(node[key])
    if isinstance(node.get("metric"), str) and as_number(node.get("value")) is not None:
        out.append({"group": ctx["group"], "method": ctx["method"], "metric": node["metric"],
                    "value": as_number(node["value"])})
        return
    for key, value in node.items():
        if key in ("segment", "method", "model", "baseline", "recommender", "metric") and isinstance(value, str):
            continue  # consumed as context above
        if _is_metric_key(key) and as_number(value) is not None:
            out.append({"group": ctx["group"], "method": ctx["method"], "metric": key, "value": as_number(value)})
        elif isinstance(value, (dict, list)):
            _walk(value, _child_ctx(ctx, key), out)


def _child_ctx(ctx: dict[str, Any], key: str) -> dict[str, Any]:
    sub = dict(ctx, in_segments=False)
    low = key.lower()
    if "pop" in low or "baseline" in low:
        sub["method"] = "popularity"
    elif ctx["in_segments"]:
        sub["group"] = key
    elif low in _SEGMENT_KEYS:
        sub["in_segments"] = True
    elif low in ("model", "cf", "als", "bpr", "lmf", "recommender"):
        sub["method"] = "model"
        sub["in_segments"] = ctx["in_segments"]
    return sub


def _method_name(name: str) -> str:
    low = name.lower()
    return "popularity" if "pop" in low or "baseline" in low else "model"


def _recommender_section(arts: Artifacts) -> Section | None:
    rec = arts.plan.recommender if arts.plan else None
    rows = recommender_rows(rec) if rec else []
    if not rows:
        return None
    k = rec.get("k") if isinstance(rec, dict) else None
    for r in rows:  # prioritize writes "ndcg"; say "ndcg@10" as readers know it
        if k and "@" not in r["metric"] and r["metric"] != "coverage":
            r["metric"] = f"{r['metric']}@{k}"
    algo = rec.get("algorithm") if isinstance(rec, dict) else None
    label = f"collaborative filtering ({algo})" if algo else "collaborative filtering"
    groups = list(dict.fromkeys(r["group"] for r in rows))
    groups = ["overall"] + [g for g in groups if g != "overall"] if "overall" in groups else groups
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    methods = [m for m in ("model", "popularity") if any(r["method"] == m for r in rows)]
    values = {(r["group"], r["metric"], r["method"]): r["value"] for r in rows}
    sec = Section("recommender", "Is the recommender any good?",
                  intro="Held-out interactions (the latest ones) ranked by the factorization model and by a "
                        "popularity baseline; higher is better for every metric shown.")
    names = {"model": label, "popularity": "popularity baseline"}
    png = plots.recommender_bars(groups, metrics, {(g, m, names[k]): v for (g, m, k), v in values.items()},
                                 [names[m] for m in methods])
    if png:
        sec.figures.append(Figure(png, "Recommender quality per segment against the popularity baseline"))
    sec.tables.append(_recommender_table(groups, metrics, methods, values, names))
    sec.data = {"rows": rows, "algorithm": algo}
    return sec


def _recommender_table(groups: list[str], metrics: list[str], methods: list[str], values: dict,
                       names: dict[str, str]) -> Table:
    lift = methods == ["model", "popularity"]
    cols, rows = ["group", "metric"] + [names[m] for m in methods] + (["vs baseline"] if lift else []), []
    for g in groups:
        for m in metrics:
            vals = [values.get((g, m, k)) for k in methods]
            if all(v is None for v in vals):
                continue
            cells: list[Cell | str] = [g, m]
            best = max((v for v in vals if v is not None), default=None)
            for v in vals:
                cells.append(Cell(f"{v:.3f}" if v is not None else "—",
                                  tone="good" if v is not None and v == best and len(methods) > 1 else ""))
            if lift:
                cells.append(f"×{vals[0] / vals[1]:.2f}" if vals[0] is not None and vals[1] else "—")
            rows.append(cells)
    return Table(cols, rows)


# ----------------------------------------------------------------------------------------------- run


def _best_step(arts: Artifacts) -> float | None:
    man = arts.run_manifest or {}
    if as_number(man.get("best_step")) is not None:
        return as_number(man["best_step"])
    val = [(r["step"], r["val_loss"]) for r in arts.run_metrics if as_number(r.get("val_loss")) is not None
           and as_number(r.get("step")) is not None]
    return float(min(val, key=lambda p: p[1])[0]) if val else None


def _run_section(arts: Artifacts) -> Section | None:
    if arts.run_path is None:
        return None
    man, rows = arts.run_manifest or {}, arts.run_metrics
    train = [(float(r["step"]), float(r["train_loss"])) for r in rows
             if as_number(r.get("step")) is not None and as_number(r.get("train_loss")) is not None]
    val = [(float(r["step"]), float(r["val_loss"])) for r in rows
           if as_number(r.get("step")) is not None and as_number(r.get("val_loss")) is not None]
    best = _best_step(arts)
    stop = man.get("stop_reason") or ("stopped early" if man.get("stopped_early") else None)
    sec = Section("training", "Training", intro=f"Run {arts.run_path}.")
    png = plots.loss_curves(train, val, best, stop)
    if png:
        sec.figures.append(Figure(png, "Train and validation loss", "The dashed line marks the kept (best) step."))
    if man.get("stopped_early"):
        sec.callouts.append(("info", f"Early stopping: {stop}. The adapter kept is the one from step {best:g}."
                             if best is not None else f"Early stopping: {stop}."))
    if man and not rows:
        sec.callouts.append(("warn", "metrics.jsonl is missing: no loss curves."))
    if not man:
        sec.callouts.append(("warn", "manifest.json is missing: the run is still training or crashed."))
    facts = _run_facts(man, rows, best, val)
    sec.tables.append(Table(["fact", "value"], [[k, v] for k, v in facts.items()], "Run facts", kind="facts"))
    sec.data = {"best_step": best, "stopped_early": man.get("stopped_early"), "stop_reason": man.get("stop_reason"),
                "train_loss": train, "val_loss": val, "facts": facts}
    return sec


def _run_facts(man: dict[str, Any], rows: list[dict[str, Any]], best: float | None,
               val: list[tuple[float, float]]) -> dict[str, str]:
    """The run's key figures as label -> text, from the manifest (as train writes it) and metrics.jsonl."""
    facts: dict[str, str] = {}
    for key, label in (("base_model", "base model"), ("task", "task"), ("seed", "seed"),
                       ("init_adapter", "started from adapter"), ("teacher", "distilled from")):
        if man.get(key) is not None:
            facts[label] = str(man[key])
    if "layers" in man:
        layers = [x for x in man["layers"] or [] if isinstance(x, int)]
        of = f" of {man['n_layers']}" if man.get("n_layers") else ""
        facts["LoRA layers"] = f"{_ranges(layers)} ({len(layers)}{of})" if layers else f"all{of}"
    if all(as_number(man.get(k)) is not None for k in ("n_train", "n_val", "n_test")):
        facts["examples train / val / test"] = f"{man['n_train']:,} / {man['n_val']:,} / {man['n_test']:,}"
    steps = as_number(man.get("steps")) or (max(as_number(r.get("step")) or 0 for r in rows) if rows else None)
    if steps is not None:
        facts["steps"] = f"{steps:,.0f}" + (f" of {man['total_steps']:,}" if as_number(man.get("total_steps")) else "")
    if best is not None:
        facts["best step"] = f"{best:g}"
    if as_number(man.get("adapter_step")) is not None:
        facts["adapter kept from step"] = f"{man['adapter_step']:g}"
    if val:
        facts["best validation loss"] = f"{min(v for _, v in val):.4f}"
    tps = as_number(man.get("tokens_per_s")) or (statistics.median(
        [float(r["tokens_per_s"]) for r in rows if as_number(r.get("tokens_per_s"))] or [0]) or None)
    if tps:
        facts["tokens / s"] = f"{tps:,.0f}"
    for key, value in (man.get("timings") or {}).items() if isinstance(man.get("timings"), dict) else ():
        if as_number(value) is not None:  # train writes {"setup_s": 6.0, "train_s": 30.5, ...}
            name = key[:-2] if key.endswith("_s") else key
            facts[f"{name.replace('_', ' ')} time"] = _duration(value)
    facts.update(_peak_memory(man))
    return facts


def _peak_memory(man: dict[str, Any]) -> dict[str, str]:
    for key, value in man.items():
        if "peak" in key.lower() and as_number(value) is not None:
            if key.lower().endswith("_mb"):
                return {"peak memory": f"{value:,.0f} MiB"}
            return {"peak memory": fmt_bytes(value) if "byte" in key.lower() else f"{value:g}"}
    return {}


def _duration(seconds: float) -> str:
    """'42.0 s', '12 min 3 s', '2 h 05 min'."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


# ----------------------------------------------------------------------------------------------- eval


def _scope_values(ev: EvalView, scope: str, names: list[str]) -> dict[tuple[str, str], tuple]:
    key = "segment" if scope == "segment" else "domain"
    out = {}
    for name in names:
        for m in ev.models:
            row = ev.cell(m, scope, **{key: name})
            if row is not None and as_number(row.get("value")) is not None:
                out[(name, m)] = (as_number(row["value"]), as_number(row.get("ci_low")), as_number(row.get("ci_high")),
                                  bool(row.get("enough", True)))
    return out


def _overall_section(arts: Artifacts) -> Section | None:
    """Every metric eval.json has, overall, per model: the table a reader compares models by."""
    ev = arts.eval
    if ev is None:
        return None
    metrics = list(dict.fromkeys(r.get("metric") for r in ev.doc["metrics"] if r.get("scope") == "overall"))
    if not metrics:
        return None
    metrics.sort(key=lambda m: m != ev.metric)  # the primary metric first
    rows = []
    for m in ev.models:
        role = "fine-tuned" if m == ev.tuned else ("base" if m == ev.base and ev.label(m) != "base" else "")
        cells: list[Cell | str] = [Cell(ev.label(m), role)]
        for metric in metrics:
            row = ev.cell(m, "overall", metric=metric)
            cells.append(_metric_cell(row, is_rate(metric)))
        rows.append(cells)
    task = ev.doc.get("task")
    sec = Section("eval-overall", "Results overall",
                  intro=f"Every model on the same {ev.doc.get('n_test_examples', '?')} held-out test examples"
                        + (f" ({task} task; greedy decoding)" if task else "") + ", with bootstrap 95% intervals. "
                        f"The primary metric is {ev.metric}.")
    sec.tables.append(Table(["model", *metrics], rows))
    sec.data = {"metrics": metrics, "rows": [r for r in ev.doc["metrics"] if r.get("scope") == "overall"],
                "labels": ev.labels}
    return sec


def _segment_section(arts: Artifacts) -> Section | None:
    return _scope_section(arts.eval, "segment") if arts.eval else None


def _domain_section(arts: Artifacts) -> Section | None:
    return _scope_section(arts.eval, "domain") if arts.eval else None


def _scope_section(ev: EvalView, scope: str) -> Section | None:
    names = ev.names(scope)
    if not names:
        return None
    if scope == "domain":  # the domains that moved most first: that is what a reader looks for
        names.sort(key=lambda n: -abs(ev.delta("domain", domain=n) or 0.0))
    title = "Did it help? Per segment" if scope == "segment" else "Per domain"
    sec = Section(f"eval-{scope}", title,
                  intro=f"{ev.metric.capitalize()} of every model on the same held-out test split, with bootstrap 95% "
                        f"intervals. {ev.doc.get('n_test_examples', '?')} test examples, "
                        f"{ev.doc.get('n_test_queries', '?')} test queries.")
    if scope == "segment":
        _flag_callouts(ev, sec)
    values = {(name, ev.label(m)): v for (name, m), v in _scope_values(ev, scope, names).items()}
    png = plots.metric_dots(names, [ev.label(m) for m in ev.models], values, ev.metric, ev.pct)
    if png:
        sec.figures.append(Figure(png, f"{ev.metric} per {scope} and model with 95% intervals",
                                  _top_note(len(names), "domains, those that moved most first")
                                  if scope == "domain" else ""))
    sec.tables.append(_scope_table(ev, scope, names))
    sec.data = {"metric": ev.metric, "base": ev.base, "finetuned": ev.tuned,
                "rows": [r for r in ev.doc["metrics"] if r.get("scope") == scope],
                "delta": {n: ev.delta(scope, **{("segment" if scope == "segment" else "domain"): n})
                          for n in names}}
    return sec


def _flag_callouts(ev: EvalView, sec: Section) -> None:
    for f in ev.flags():
        sec.callouts.append(("bad", f"⚠ {f.get('segment')}: {f.get('metric', ev.metric)} "
                                    f"{fmt_value(as_number(f.get('base')), ev.pct)} → "
                                    f"{fmt_value(as_number(f.get('finetuned')), ev.pct)} "
                                    f"({fmt_delta(as_number(f.get('delta')), ev.pct)}, 95% CI "
                                    f"{fmt_delta(as_number(f.get('ci_low')), ev.pct)} to "
                                    f"{fmt_delta(as_number(f.get('ci_high')), ev.pct)}): "
                                    f"{f.get('reason', 'flagged')}."))
    if not ev.flags() and ev.tuned:
        sec.callouts.append(("good", f"No segment is worse under {ev.label(ev.tuned)} than under "
                                     f"{ev.label(ev.base)} with a 95% interval that excludes zero."))
    worst = ev.doc.get("worst_segment") or {}
    if worst.get("segment") is not None:
        value = fmt_value(as_number(worst.get("value")), ev.pct)
        sec.callouts.append(("warn", f"Worst segment: {worst['segment']} at {value} "
                                     f"({ev.label(worst.get('model'))})."))


def _scope_table(ev: EvalView, scope: str, names: list[str]) -> Table:
    key = "segment" if scope == "segment" else "domain"
    flagged = {f.get("segment") for f in ev.flags()} if scope == "segment" else set()
    cols = [key, "n"] + [ev.label(m) for m in ev.models] + (["Δ fine-tuned − base"] if ev.tuned else [])
    rows = []
    for name in names:
        cells: list[Cell | str] = [Cell(name, "⚠ flagged", "bad") if name in flagged else name]
        ns = [ev.cell(m, scope, **{key: name}) for m in ev.models]
        cells.append(str(next((r.get("n") for r in ns if r and r.get("n") is not None), "—")))
        cells += [_metric_cell(r, ev.pct) for r in ns]
        if ev.tuned:
            cells.append(_delta_cell(ev, scope, name))
        rows.append(cells)
    return Table(cols, rows)


def _delta_cell(ev: EvalView, scope: str, name: str) -> Cell:
    """Δ of the primary metric; for segments with evaluate's paired-bootstrap interval, which is what flags use."""
    paired = ev.paired_delta(name) if scope == "segment" else None
    d = as_number(paired.get("delta")) if paired else ev.delta(scope, **{scope: name})
    note = ""
    if paired and as_number(paired.get("ci_low")) is not None and as_number(paired.get("ci_high")) is not None:
        note = f"{fmt_delta(paired['ci_low'], ev.pct)} to {fmt_delta(paired['ci_high'], ev.pct)}"
    return Cell(fmt_delta(d, ev.pct), note, tone_of(d, ev.metric))


def _metric_cell(row: dict[str, Any] | None, pct: bool) -> Cell:
    if row is not None and not row.get("enough", True):  # evaluate writes value null for these
        return Cell("too few", f"n={row.get('n')}", "muted")  # plain: "too few (n=4)"
    if row is None or as_number(row.get("value")) is None:
        return Cell("—")
    lo, hi = as_number(row.get("ci_low")), as_number(row.get("ci_high"))
    ci = f"{fmt_value(lo, pct)}–{fmt_value(hi, pct)}" if lo is not None and hi is not None else ""
    return Cell(fmt_value(as_number(row["value"]), pct), ci)


def _cross_section(arts: Artifacts) -> Section | None:
    ev = arts.eval
    if ev is None or ev.tuned is None:
        return None
    segs, doms = ev.names("segment"), ev.names("domain")
    delta = np.full((len(segs), len(doms)), np.nan)
    enough = np.zeros_like(delta, dtype=bool)
    for i, s in enumerate(segs):
        for j, d in enumerate(doms):
            rb, rt = ev.cell(ev.base, "segment_domain", s, d), ev.cell(ev.tuned, "segment_domain", s, d)
            if rb and rt and as_number(rb.get("value")) is not None and as_number(rt.get("value")) is not None:
                delta[i, j] = rt["value"] - rb["value"]
                enough[i, j] = bool(rb.get("enough", True) and rt.get("enough", True))
    if not np.isfinite(delta).any():
        return None
    order = np.argsort(-np.nan_to_num(np.abs(np.where(enough, delta, 0)), nan=0).sum(axis=0), kind="stable")
    doms_sorted = [doms[j] for j in order]
    png = plots.delta_heatmap(segs, doms_sorted, delta[:, order], enough[:, order], ev.pct,
                              is_rate(ev.metric))
    sec = Section("eval-cross", "Segment × domain: where it changed",
                  intro=f"Change in {ev.metric} from {ev.label(ev.base)} to {ev.label(ev.tuned)} for each segment "
                        "on each domain; "
                        "cells with too little test traffic are left blank (n/a).")
    if png:
        sec.figures.append(Figure(png, "Change of the primary metric per segment and domain",
                                  _top_note(len(doms), "domains that moved most")))
    sec.tables.append(Table(["segment", *doms_sorted], [
        [seg] + [Cell(fmt_delta(delta[i, j], ev.pct), tone=tone_of(delta[i, j], ev.metric)) if enough[i, j]
                 else Cell("n/a", tone="muted") for j in order] for i, seg in enumerate(segs)],
        f"{ev.metric.capitalize()} change per segment and domain"))
    sec.data = {"segments": segs, "domains": doms, "delta": _nan_to_none(delta), "enough": enough.tolist()}
    return sec


def _representation_section(arts: Artifacts) -> Section | None:
    ev = arts.eval
    reps = [r for r in (ev.doc.get("representation") or []) if isinstance(r, dict)] if ev else []
    if not reps:
        return None
    sec = Section("representation", "Who the training data serves",
                  intro="Each segment's and domain's share of the training sample beside its share of traffic; "
                        "⚠ marks those the data under-serves.")
    for kind in ("segment", "domain"):
        rs = [r for r in reps if r.get("kind") == kind]
        png = plots.share_bars([str(r.get("name")) for r in rs], [as_number(r.get("train_share")) or 0.0 for r in rs],
                               [as_number(r.get("traffic_share")) or 0.0 for r in rs],
                               [bool(r.get("underserved")) for r in rs])
        if png:
            sec.figures.append(Figure(png, f"Training share vs traffic share per {kind}",
                                      _top_note(len(rs), f"{kind}s")))
    under = [r for r in reps if r.get("underserved")]
    if under:
        sec.callouts.append(("warn", "Under-served: " + ", ".join(f"{r.get('kind')} {r.get('name')}"
                                                                  for r in under) + "."))
    sec.tables.append(Table(["kind", "name", "share of training", "share of traffic", ""],
                            [[str(r.get("kind")), str(r.get("name")), fmt_value(as_number(r.get("train_share")), True),
                              fmt_value(as_number(r.get("traffic_share")), True),
                              Cell("under-served", tone="bad") if r.get("underserved") else ""] for r in reps]))
    sec.data = {"rows": reps}
    return sec


# ----------------------------------------------------------------------------------------------- export


def _variant_records(arts: Artifacts) -> list[dict[str, Any]]:
    """Export variants from EXPORT/manifest.json, else from eval.json's ``variants``; quality joined from eval."""
    recs: list[dict[str, Any]] = []
    if arts.export:
        recs = [dict(v) for v in arts.export["variants"] if isinstance(v, dict) and v.get("name")]
    elif arts.eval and isinstance(arts.eval.doc.get("variants"), dict):
        recs = [{"model": k, **v, "name": v.get("name") or Path(k).name}
                for k, v in arts.eval.doc["variants"].items() if isinstance(v, dict)]
    ev = arts.eval
    for v in recs:
        model = v.get("model") or (_match_model(ev, v) if ev else None)
        v["model"] = model
        v["quality"] = ev.value(model, "overall") if ev and model else None
        if ev and v["quality"] is None and v["name"] == "merged" and ev.tuned and not ev.is_variant(ev.tuned):
            # the merged model is the run with its adapter folded in: same weights up to float rounding
            v["quality"], v["quality_from"] = ev.value(ev.tuned, "overall"), ev.tuned
    return recs


def _match_model(ev: EvalView, variant: dict[str, Any]) -> str | None:
    names = {str(variant.get("name")), Path(str(variant.get("path", ""))).name}
    return next((m for m in ev.models if m in names or Path(m).name in names), None)


def _export_section(arts: Artifacts) -> Section | None:
    recs = _variant_records(arts)
    if not recs:
        return None
    ev = arts.eval
    merged = next((v.get("size_bytes") for v in recs if v["name"] == "merged" and v.get("size_bytes")), None)
    sec = Section("export", "Deployable variants: size vs quality",
                  intro="Each exported variant's size on disk, CPU speed, agreement with the merged model on the "
                        "probe set (top-1 next token)" + (f" and {ev.metric} on the test split" if ev else "") + ".")
    panels = [{"label": "top-1 agreement with merged", "values": [as_number(v.get("agreement")) for v in recs],
               "percent": True, "reference": None}]
    if ev is not None and any(v["quality"] is not None for v in recs):
        base = ev.value(ev.base, "overall")
        panels.insert(0, {"label": f"{ev.metric} on the test split", "values": [v["quality"] for v in recs],
                          "percent": ev.pct, "reference": (f"{ev.label(ev.base)} {fmt_value(base, ev.pct)}", base)})
    png = plots.size_quality([v["name"] for v in recs], [(v.get("size_bytes") or 0) / 1e6 for v in recs], panels)
    if png:
        sec.figures.append(Figure(png, "Size on disk against quality per variant"))
    if any(v.get("quality_from") for v in recs):
        sec.callouts.append(("info", f"merged is the fine-tuned run with its adapter folded in; its {ev.metric} "
                                     f"is the run's ({ev.label(ev.tuned)})."))
    sec.tables.append(_export_table(recs, merged, ev))
    sec.data = {"variants": recs, "merged_size_bytes": merged}
    return sec


def _export_table(recs: list[dict[str, Any]], merged: float | None, ev: EvalView | None) -> Table:
    cols = ["variant", "size", "vs merged", "load s", "ms / token", "agreement"] + ([ev.metric] if ev else [])
    rows = []
    for v in recs:
        size = v.get("size_bytes")
        ratio = f"{size / merged:.0%}" if size and merged else "—"
        row: list[Cell | str] = [v["name"], fmt_bytes(size), ratio, _fmt_num(v.get("load_seconds"), 2),
                                 _fmt_num(v.get("ms_per_token"), 1), fmt_value(as_number(v.get("agreement")), True)]
        if ev:
            row.append(fmt_value(v["quality"], ev.pct))
        rows.append(row)
    return Table(cols, rows)


def _fmt_num(v: Any, digits: int) -> str:
    x = as_number(v)
    return "—" if x is None else f"{x:.{digits}f}"


# ----------------------------------------------------------------------------------------------- store


def _store_section(arts: Artifacts) -> Section | None:
    facts = arts.store
    if facts is None:
        return None
    seg, dom = traffic_tables(facts.get("counts") or [])
    total = sum(r["events"] for r in seg)
    sec = Section("store", "The interaction data",
                  intro=f"{_n(total, 'event')} from {_n(facts.get('users', 0), 'user')} on "
                        f"{_n(facts.get('examples', 0), 'example')}, "
                        f"in {_n(len(facts.get('batches') or []), 'ingested batch')}. "
                        "Negative feedback = thumbs-down, escalations, regenerations and abandons over those plus "
                        "thumbs-up and resolutions.")
    png = plots.traffic_bars(*traffic_matrix(facts.get("counts") or [], [r["name"] for r in dom],
                                             [r["name"] for r in seg]), [r["negative_rate"] for r in dom])
    if png:
        sec.figures.append(Figure(png, "Events per domain by segment, and negative-feedback rate",
                                  _top_note(len(dom), "domains by traffic")))
    rejected = (facts.get("rejected") or {}).get("total", 0)
    if rejected:
        sec.callouts.append(("warn", f"{rejected:,} rows were rejected at ingest; see "
                                     "`adaptive-ft stats`."))
    sec.tables.append(Table(["segment", "events", "share", "negative feedback"], [
        [r["name"], f"{r['events']:,}", f"{r['share']:.1%}", fmt_value(r["negative_rate"], True)] for r in seg],
        "Traffic per segment"))
    sec.tables.append(Table(["domain", "events", "share", "negative feedback"], [
        [r["name"], f"{r['events']:,}", f"{r['share']:.1%}", fmt_value(r["negative_rate"], True)] for r in dom],
        "Traffic per domain, busiest first"))
    sec.data = {"events": total, "users": facts.get("users"), "examples": facts.get("examples"),
                "batches": len(facts.get("batches") or []), "rejected": rejected,
                "fingerprint": facts.get("fingerprint"), "segments": seg, "domains": dom}
    return sec


def _n(count: int | None, noun: str) -> str:
    """'1 user', '2,034 users', 'ingested batches'."""
    count = int(count or 0)
    plural = noun + ("es" if noun.endswith(("ch", "sh", "s", "x")) else "s")
    return f"{count:,} {noun if count == 1 else plural}"


def traffic_matrix(counts: list[dict[str, Any]], domains: list[str], segments: list[str]
                   ) -> tuple[list[str], list[str], np.ndarray]:
    """(domains, segments, events (D, S)) from the store's segment x domain x event counts."""
    m = np.zeros((len(domains), len(segments)))
    di, si = {d: i for i, d in enumerate(domains)}, {s: j for j, s in enumerate(segments)}
    for r in counts:
        d, s = str(r.get("domain") or "unknown"), str(r.get("segment") or "unknown")
        if d in di and s in si:
            m[di[d], si[s]] += int(r.get("n") or 0)
    return domains, segments, m


NEGATIVE = {"thumbs_down", "escalate", "regenerate", "abandon"}
POSITIVE = {"thumbs_up", "resolve"}


def traffic_tables(counts: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per segment and per domain: events, share of events, and negative / (negative + positive) feedback."""
    out = []
    for key in ("segment", "domain"):
        agg: dict[str, dict[str, float]] = {}
        for r in counts:
            a = agg.setdefault(str(r.get(key) or "unknown"), {"events": 0, "neg": 0, "pos": 0})
            n = int(r.get("n") or 0)
            a["events"] += n
            a["neg"] += n if r.get("event") in NEGATIVE else 0
            a["pos"] += n if r.get("event") in POSITIVE else 0
        total = sum(a["events"] for a in agg.values()) or 1
        out.append(sorted(({"name": k, "events": int(a["events"]), "share": a["events"] / total,
                            "negative_rate": a["neg"] / (a["neg"] + a["pos"]) if a["neg"] + a["pos"] else None}
                           for k, a in agg.items()), key=lambda r: -r["events"]))
    return out[0], out[1]


def _loop_section(arts: Artifacts) -> Section | None:
    """The v1 -> v2 view of a loop turn (eval.json's baseline is the deployed v1, not the raw base): where v1
    failed according to its logs, what the plan drew there and why, what v2 fixed, and who got worse."""
    ev = arts.eval
    if ev is None or ev.tuned is None or ev.doc.get("baseline") in (None, "base") or ev.base != ev.doc["baseline"]:
        return None
    plan_doms = {d.domain: d for d in arts.plan.domains} if arts.plan is not None else {}
    dom_delta = {d.get("domain"): d for d in ev.doc.get("domain_deltas") or []
                 if isinstance(d, dict) and d.get("model") == ev.tuned}
    names = ev.names("domain")
    names.sort(key=lambda n: -(plan_doms[n].failure if n in plan_doms else 0.0))
    rows = []
    for name in names:
        pd_, dd = plan_doms.get(name), dom_delta.get(name)
        d = as_number(dd.get("delta")) if dd else ev.delta("domain", domain=name)
        worse = bool(dd) and as_number(dd.get("ci_high")) is not None and dd["ci_high"] < 0
        ci = f"{fmt_delta(dd['ci_low'], ev.pct)} to {fmt_delta(dd['ci_high'], ev.pct)}" if dd else ""
        rows.append([Cell(name, "⚠ worse", "bad") if worse else name,
                     fmt_value(pd_.failure, True) if pd_ else "—", fmt_value(pd_.share, True) if pd_ else "—",
                     _metric_cell(ev.cell(ev.base, "domain", domain=name), ev.pct),
                     _metric_cell(ev.cell(ev.tuned, "domain", domain=name), ev.pct),
                     Cell(fmt_delta(d, ev.pct), ci, tone_of(d, ev.metric))])
    sec = Section("loop", "v1 → v2: what the loop fixed, and whom it harmed",
                  intro=f"{ev.label(ev.base)} is the deployed model whose own answers drew the feedback; "
                        f"{ev.label(ev.tuned)} was trained from its adapter on the plan. Domains in the order of "
                        "the failure the plan read from the logs; Δ with evaluate's paired 95% interval "
                        "(both models on the same resamples of the same held-out queries).")
    harmed = [f"segment {f.get('segment')}" for f in ev.flags() if f.get("model") == ev.tuned]
    harmed += [f"domain {f.get('domain')}" for f in ev.doc.get("domain_flags") or []
               if isinstance(f, dict) and f.get("model") == ev.tuned]
    if harmed:
        sec.callouts.append(("bad", "Significantly worse under v2 than v1: " + ", ".join(harmed) + "."))
    else:
        sec.callouts.append(("good", "Harmed no one measurable: no segment or domain is worse under "
                                     "v2 with a 95% paired interval that excludes zero."))
    sec.tables.append(Table(["domain", "failure read from v1's logs", "share of v2's draws", ev.label(ev.base),
                             ev.label(ev.tuned), "Δ v2 − v1"], rows))
    sec.data = {"v1": ev.base, "v2": ev.tuned, "domain_deltas": list(dom_delta.values()),
                "harmed": harmed, "overall_deltas": ev.doc.get("overall_deltas") or []}
    return sec


BUILDERS = [_loop_section, _plan_section, _layers_section, _recommender_section, _run_section, _overall_section, _segment_section,
            _domain_section, _cross_section, _representation_section, _export_section, _store_section]
