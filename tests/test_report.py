"""The report: sections follow the inputs given, the numbers in the artifacts appear, nothing external is referenced.

Artifacts are built in-process (a Plan dataclass, a metrics.jsonl, an eval.json and an export manifest in the
shapes of docs/contracts.md), with values chosen so that each figure the report prints can be checked by hand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from adaptive_ft.errors import InputError
from adaptive_ft.prioritize.plan import DomainScore, LayerPlan, Plan
from adaptive_ft.report import (ReportInputs, build_report, layer_grid, read_metrics, recommender_rows,
                                traffic_tables)

SEGMENTS = ["free", "pro", "enterprise"]
DOMAINS = ["card_arrival", "exchange_rate", "top_up_failed", "transfer_timing", "pin_blocked", "refund_status"]
MODELS = ["base", "runs/r1", "export/int8", "export/nf4"]
# accuracy per model and segment; enterprise drops under the fine-tune (the flagged segment)
SEG_ACC = {"base": [0.50, 0.60, 0.70], "runs/r1": [0.74, 0.78, 0.62], "export/int8": [0.735, 0.775, 0.615],
           "export/nf4": [0.70, 0.75, 0.60]}
N_LAYERS = 12


def make_plan(folder: Path) -> Path:
    """A plan as prioritize writes it: top domains with a 'why', a 6 x 12 layer matrix half measured (in
    ``layer_matrix``), and recommender metrics as ``{method: {"overall": {...}, "segments": {...}}}``."""
    rng = np.random.default_rng(0)
    domains = [DomainScore(d, priority=round(0.4 / (i + 1), 4), demand=round(0.9 - 0.1 * i, 3),
                           failure=round(0.45 - 0.05 * i, 3), share=round(0.3 / (i + 1), 4),
                           why=f"free users drive {70 - 5 * i}% of the need; {45 - 5 * i}% expected failure")
               for i, d in enumerate(DOMAINS)]
    values = rng.random((len(DOMAINS), N_LAYERS))
    measured = (np.add.outer(np.arange(len(DOMAINS)), np.arange(N_LAYERS)) % 2).astype(bool)
    scores = [{"layer": j, "score": float(values[:, j].mean()), "measured": bool(measured[:, j].all())}
              for j in range(N_LAYERS)]
    rec = {"k": 10, "users_evaluated": 300}
    for method, scale in (("model", 1.0), ("popularity", 0.6)):
        rec[method] = {"overall": {"users": 300, "precision": 0.22 * scale, "recall": 0.35 * scale,
                                   "ndcg": 0.41 * scale, "map": 0.18 * scale, "coverage": 0.5 * scale},
                       "segments": {s: {"users": 100, "precision": (0.2 + 0.02 * i) * scale,
                                        "ndcg": (0.3 + 0.05 * i) * scale} for i, s in enumerate(SEGMENTS)}}
    plan = Plan(domains=domains, layers=LayerPlan(selected=[6, 7, 8, 10], rank_pattern={"6": 16}, scores=scores,
                                                  spearman_vs_full=0.83),
                recommender=rec, segments=[{"segment": s, "weight": w, "traffic_share": w}
                                           for s, w in zip(SEGMENTS, [0.6, 0.3, 0.1])],
                inputs={"store": "abc123", "seed": 0}, created="2026-11-26T14:00:00Z",
                extra={"layer_matrix": {"domains": DOMAINS, "values": values.tolist(),
                                        "measured": measured.tolist()}})
    return plan.save(folder / "plan.json")


def make_run(folder: Path, best_step: int = 80) -> Path:
    """metrics.jsonl of 120 steps (validation every 20, lowest at ``best_step``) and a manifest."""
    run = folder / "runs" / "r1"
    run.mkdir(parents=True)
    lines = []
    for step in range(1, 121):
        row = {"step": step, "epoch": step / 60, "train_loss": 3.0 / (1 + step / 30), "lr": 2e-4,
               "tokens_per_s": 150.0 + step % 3}
        if step % 20 == 0:
            row["val_loss"] = 1.0 + abs(step - best_step) / 100
        lines.append(json.dumps(row))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    manifest = {"base_model": "smollm2", "task": "label", "seed": 0, "layers": [6, 7, 8, 10], "best_step": best_step,
                "stopped_early": True, "stop_reason": "no validation improvement for 2 evaluations",
                "timings": {"train_seconds": 412.5}, "peak_memory_bytes": 2_500_000_000}
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def _metric_rows() -> list[dict]:
    rows = []
    for m in MODELS:
        seg = SEG_ACC[m]
        rows.append(_row(m, "overall", None, None, sum(seg) / 3, 900))
        for s, v in zip(SEGMENTS, seg):
            rows.append(_row(m, "segment", s, None, v, 300))
        for j, d in enumerate(DOMAINS):
            rows.append(_row(m, "domain", None, d, seg[0] + 0.01 * j, 150))
            for s, v in zip(SEGMENTS, seg):
                enough = not (s == "enterprise" and d == "refund_status")
                rows.append(_row(m, "segment_domain", s, d, v + 0.01 * j, 50 if enough else 4, enough))
    return rows


def _row(model, scope, segment, domain, value, n, enough=True) -> dict:
    return {"model": model, "scope": scope, "segment": segment, "domain": domain, "metric": "accuracy",
            "value": round(value, 4), "ci_low": round(value - 0.04, 4), "ci_high": round(value + 0.04, 4),
            "n": n, "enough": enough}


def make_eval(folder: Path) -> Path:
    doc = {"task": "label", "models": MODELS, "primary_metric": "accuracy", "n_test_examples": 300,
           "n_test_queries": 900, "metrics": _metric_rows(),
           "worst_segment": {"model": "runs/r1", "segment": "enterprise", "metric": "accuracy", "value": 0.62},
           "largest_gap": {"model": "runs/r1", "metric": "accuracy", "best": "pro", "worst": "enterprise",
                           "gap": 0.16},
           "finetuned_model": "runs/r1",
           "deltas": [{"model": "runs/r1", "segment": s, "metric": "accuracy", "base": b, "finetuned": t,
                       "delta": round(t - b, 4), "ci_low": round(t - b - 0.05, 4), "ci_high": round(t - b + 0.05, 4),
                       "n": 300} for s, b, t in zip(SEGMENTS, SEG_ACC["base"], SEG_ACC["runs/r1"])],
           "flags": [{"segment": "enterprise", "metric": "accuracy", "base": 0.70, "finetuned": 0.62,
                      "delta": -0.08, "ci_low": -0.13, "ci_high": -0.03, "reason": "dropped from base to fine-tuned"}],
           "representation": [{"kind": "segment", "name": s, "train_share": t, "traffic_share": f,
                               "underserved": t < 0.5 * f}
                              for s, t, f in zip(SEGMENTS, [0.7, 0.27, 0.03], [0.6, 0.3, 0.1])],
           "variants": {"export/int8": {"size_bytes": 180_000_000, "ms_per_token": 21.0},
                        "export/nf4": {"size_bytes": 120_000_000, "ms_per_token": 30.0}}}
    path = folder / "eval.json"
    path.write_text(json.dumps(doc))
    return path


def make_export(folder: Path) -> Path:
    export = folder / "export"
    export.mkdir()
    variants = [("merged", "hf", 540_000_000, 1.0), ("int8", "hf", 180_000_000, 0.99),
                ("nf4", "hf", 120_000_000, 0.95), ("gguf-q8_0", "gguf", 145_000_000, 0.995),
                ("gguf-f16", "gguf", 272_000_000, 1.0)]
    doc = {"run": "runs/r1", "base_model": "smollm2", "variants": [
        {"name": n, "path": n if f == "hf" else f"model-{n[5:]}.gguf", "format": f, "size_bytes": size,
         "load_seconds": 1.5, "ms_per_token": 20.0, "agreement": agree} for n, f, size, agree in variants]}
    (export / "manifest.json").write_text(json.dumps(doc))
    return export


def make_all(folder: Path) -> ReportInputs:
    return ReportInputs(plan=make_plan(folder), run=make_run(folder), eval=make_eval(folder),
                        export=make_export(folder))
