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

from adaptive_ft.artifacts.plan import DomainScore, LayerPlan, Plan
from adaptive_ft.errors import InputError
from adaptive_ft.report import ReportInputs, build_report, read_metrics
from adaptive_ft.report.sections import layer_grid, recommender_rows, traffic_tables

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
    scores = [{"layer": j, "score": float(values[:, j].mean()), "measured": bool(measured[:, j].all()),
               "measured_cells": int(measured[:, j].sum()), "cells": len(DOMAINS)} for j in range(N_LAYERS)]
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
                "timings": {"setup_s": 6.0, "train_s": 412.5}, "peak_memory_bytes": 2_500_000_000}
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def _metric_rows() -> list[dict]:
    rows = []
    for m in MODELS:
        seg = SEG_ACC[m]
        rows.append(_row(m, "overall", None, None, sum(seg) / 3, 900))
        rows.append(_row(m, "overall", None, None, sum(seg) / 3 - 0.1, 900) | {"metric": "f1"})  # macro F1
        for s, v in zip(SEGMENTS, seg):
            rows.append(_row(m, "segment", s, None, v, 300))
        for j, d in enumerate(DOMAINS):
            rows.append(_row(m, "domain", None, d, seg[0] + 0.01 * j, 150))
            for s, v in zip(SEGMENTS, seg):
                enough = not (s == "enterprise" and d == "refund_status")
                rows.append(_row(m, "segment_domain", s, d, v + 0.01 * j, 50 if enough else 4, enough))
    return rows


def _row(model, scope, segment, domain, value, n, enough=True) -> dict:
    """A metric cell as evaluate writes it: a cell with too little traffic has no value, only its count."""
    if not enough:
        return {"model": model, "scope": scope, "segment": segment, "domain": domain, "metric": "accuracy",
                "value": None, "ci_low": None, "ci_high": None, "n": n, "enough": False}
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


# ----------------------------------------------------------------------------------------------- whole report


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("full")
    result = build_report(make_all(folder), folder / "out" / "report.html")
    return result, result.html.read_text(), json.loads(result.json.read_text()), result.markdown.read_text()


def test_full_report_has_every_section_in_order(full) -> None:
    result, html, doc, md = full
    assert result.sections == ["plan", "layers", "recommender", "training", "eval-overall", "eval-segment",
                               "eval-domain", "eval-cross", "representation", "export"]
    assert [s["id"] for s in doc["sections"]] == result.sections
    assert doc["title"] == "smollm2 fine-tune r1" and "<title>smollm2 fine-tune r1</title>" in html
    # one inline PNG per plot, and every section's title in all three renderings
    assert html.count('src="data:image/png;base64,') == result.figures == 9
    for sec in doc["sections"]:
        assert sec["title"] in md and sec["title"].replace("'", "&#x27;") in html


def test_summary_figures_are_the_artifacts_numbers(full) -> None:
    _, html, doc, md = full
    summary = doc["summary"]
    # overall accuracy = mean of the three segments (0.5+0.6+0.7)/3 = 0.6 base, (0.74+0.78+0.62)/3 fine-tuned
    assert summary["overall"]["base"] == pytest.approx(0.6)
    assert summary["overall"]["finetuned"] == pytest.approx(0.7133)
    assert summary["finetuned_model"] == "runs/r1" and summary["base_model"] == "base"
    assert summary["segment_delta"] == pytest.approx({"free": 0.24, "pro": 0.18, "enterprise": -0.08})
    assert [f["segment"] for f in summary["flags"]] == ["enterprise"]
    assert summary["worst_segment"]["segment"] == "enterprise"
    assert summary["smallest_variant"] == {"name": "nf4", "size_bytes": 120_000_000,
                                           "vs_merged": pytest.approx(120 / 540)}
    assert [d["domain"] for d in summary["trained_on"]] == DOMAINS[:3]
    assert summary["run"]["best_step"] == 80
    for text in ("71.3%", "+11.3 pts", "120 MB", "22% of merged", "free users drive 70% of the need"):
        assert text in html and text in md, text
    # per-segment change: a sentence in Markdown, chips (toned, the flag spelled out) in HTML
    assert "per segment: free +24.0 pts, pro +18.0 pts, enterprise -8.0 pts." in md
    assert '<span class="chip good"><span class="chip-seg">free</span><strong>+24.0 pts</strong>' in html
    assert ('<span class="chip bad"><span class="chip-seg">enterprise</span><strong>-8.0 pts</strong>'
            "<em>⚠ flagged</em>") in html
    assert "per segment: free" not in html  # said once, by the chips


def test_html_references_nothing_outside_itself(full) -> None:
    _, html, _, _ = full
    assert re.search(r"(?i)https?:|//[a-z0-9.-]+\.[a-z]{2,}/|ftp:", html) is None
    assert "<script" not in html and "<link" not in html and "@import" not in html and "url(" not in html
    # every src/href is a data: URI or an in-page anchor
    for attr in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert attr.startswith(("data:image/png;base64,", "#")), attr[:40]


def test_segment_table_shows_ci_delta_and_flag(full) -> None:
    _, html, doc, md = full
    seg = next(s for s in doc["sections"] if s["id"] == "eval-segment")
    table = seg["tables"][0]
    assert table["columns"] == ["segment", "n", *MODELS, "Δ fine-tuned − base"]
    enterprise = next(r for r in table["rows"] if r[0].startswith("enterprise"))
    # base 70.0% [66.0, 74.0]; paired delta -8.0 pts with CI -13.0 to -3.0 pts (from eval.json "deltas")
    assert enterprise == ["enterprise (⚠ flagged)", "300", "70.0% (66.0%–74.0%)", "62.0% (58.0%–66.0%)",
                          "61.5% (57.5%–65.5%)", "60.0% (56.0%–64.0%)", "-8.0 pts (-13.0 pts to -3.0 pts)"]
    assert "| enterprise (⚠ flagged) | 300 | 70.0% (66.0%–74.0%) |" in md
    assert any(c["tone"] == "bad" and "enterprise" in c["text"] for c in seg["callouts"])


def test_overall_table_has_every_metric_per_model(full) -> None:
    _, _, doc, _ = full
    table = next(s for s in doc["sections"] if s["id"] == "eval-overall")["tables"][0]
    assert table["columns"] == ["model", "accuracy", "f1"]
    assert table["rows"][0] == ["base", "60.0% (56.0%–64.0%)", "50.0% (46.0%–54.0%)"]
    assert table["rows"][1][0] == "runs/r1 (fine-tuned)"


def test_layer_table_marks_selected_layers_and_measured_cells(full) -> None:
    _, _, doc, md = full
    table = next(s for s in doc["sections"] if s["id"] == "layers")["tables"][0]
    assert [r[0] for r in table["rows"]] == [str(j) for j in range(N_LAYERS)]
    assert [r[0] for r in table["rows"] if r[3] == "selected"] == ["6", "7", "8", "10"]
    assert table["rows"][6][2] == "3 of 6" and table["rows"][6][4] == "16" and table["rows"][7][4] == "default"
    assert "| 6 |" in md


def test_thin_cells_say_so_instead_of_a_number(full) -> None:
    _, _, doc, _ = full
    cross = next(s for s in doc["sections"] if s["id"] == "eval-cross")["data"]
    i, j = cross["segments"].index("enterprise"), cross["domains"].index("refund_status")
    assert cross["enough"][i][j] is False and cross["delta"][i][j] is None
    assert cross["enough"][0][0] is True and cross["delta"][0][0] == pytest.approx(0.24)


def test_export_section_joins_quality_from_eval(full) -> None:
    _, _, doc, _ = full
    data = next(s for s in doc["sections"] if s["id"] == "export")["data"]
    by_name = {v["name"]: v for v in data["variants"]}
    assert by_name["int8"]["quality"] == pytest.approx(0.7083, abs=1e-4)  # mean of 0.735, 0.775, 0.615
    assert by_name["merged"]["quality"] == pytest.approx(0.7133) and by_name["merged"]["quality_from"] == "runs/r1"
    assert by_name["gguf-q8_0"]["quality"] is None and by_name["gguf-q8_0"]["agreement"] == 0.995


def test_training_section_marks_best_step_and_plan_match(tmp_path: Path) -> None:
    from adaptive_ft.files import file_sha256

    plan = make_plan(tmp_path)
    run = make_run(tmp_path, best_step=60)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["plan_sha256"] = file_sha256(plan)
    (run / "manifest.json").write_text(json.dumps(manifest))
    doc = json.loads(build_report(ReportInputs(plan=plan, run=run), tmp_path / "r.html", draw=False)
                     .json.read_text())
    training = next(s for s in doc["sections"] if s["id"] == "training")["data"]
    assert training["best_step"] == 60 and training["stopped_early"] is True
    assert len(training["train_loss"]) == 120 and len(training["val_loss"]) == 6
    assert training["facts"]["LoRA layers"] == "6–8, 10 (4)" and training["facts"]["steps"] == "120"
    assert training["facts"]["tokens / s"] == "151"  # median of 150, 151, 152 per step
    assert training["facts"]["train time"] == "6 min 52 s" and training["facts"]["setup time"] == "6.0 s"
    assert training["facts"]["best validation loss"] == "1.0000" and training["facts"]["peak memory"] == "2.5 GB"
    plan_sec = next(s for s in doc["sections"] if s["id"] == "plan")
    assert plan_sec["data"]["run_used_this_plan"] is True


# ----------------------------------------------------------------------------------------------- subsets


@pytest.mark.parametrize(("given", "sections"), [
    (("plan",), ["plan", "layers", "recommender"]),
    (("run",), ["training"]),
    (("export",), ["export"]),
    (("eval",), ["eval-overall", "eval-segment", "eval-domain", "eval-cross", "representation", "export"]),
    (("plan", "export"), ["plan", "layers", "recommender", "export"]),
])
def test_sections_follow_the_inputs_given(tmp_path: Path, given: tuple[str, ...], sections: list[str]) -> None:
    every = make_all(tmp_path)
    inputs = ReportInputs(**{k: getattr(every, k) for k in given})
    result = build_report(inputs, tmp_path / "sub.html", draw=False)  # structure only: plots are tested above
    assert result.figures == 0
    assert result.sections == sections
    html = result.html.read_text()
    assert ("Did it help?" in html) == ("eval" in given)
    assert ('id="training"' in html) == ("run" in given)


def test_best_step_falls_back_to_lowest_validation_loss(tmp_path: Path) -> None:
    run = make_run(tmp_path, best_step=40)
    (run / "manifest.json").unlink()  # a run still training has no manifest yet
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 121, "train_lo')  # torn last line of a file being written
    doc = json.loads(build_report(ReportInputs(run=run), tmp_path / "r.html", draw=False).json.read_text())
    sec = doc["sections"][0]
    assert sec["data"]["best_step"] == 40
    assert any("manifest.json is missing" in c["text"] for c in sec["callouts"])


def test_plots_are_left_out_without_their_data(tmp_path: Path) -> None:
    plan = Plan(domains=[DomainScore("billing", priority=0.3, demand=0.5, failure=0.6)])
    path = plan.save(tmp_path / "plan.json")
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"base_model": "tiny"}))
    result = build_report(ReportInputs(plan=path, run=run), tmp_path / "r.html")
    assert result.sections == ["plan", "training"]  # no layers, no recommender: no such sections
    assert result.figures == 1  # the priority bars; no loss curve without metrics.jsonl
    doc = json.loads(result.json.read_text())
    assert any("metrics.jsonl is missing" in c["text"] for c in doc["sections"][1]["callouts"])


def test_bad_inputs_say_what_and_where(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nothing to report on"):
        build_report(ReportInputs(), tmp_path / "r.html")
    with pytest.raises(InputError, match="eval.json not found"):
        build_report(ReportInputs(eval=tmp_path / "missing.json"), tmp_path / "r.html")
    bad = tmp_path / "eval.json"
    bad.write_text('{"models": ["base"]}')
    with pytest.raises(InputError, match="needs 'models' and 'metrics'"):
        build_report(ReportInputs(eval=bad), tmp_path / "r.html")
    with pytest.raises(InputError, match="should end in .html"):
        build_report(ReportInputs(export=make_export(tmp_path)), tmp_path / "r.pdf")


def test_read_metrics_rejects_a_bad_line_in_the_middle(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train_loss": 2.0}\nnot json\n{"step": 2, "train_loss": 1.5}\n')
    with pytest.raises(InputError, match=r"metrics.jsonl:2"):
        read_metrics(path)
    path.write_text('{"step": 1, "train_loss": 2.0}\n\n{"step": 2, "train_loss": 1.5}\n{"step": 3')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


# ----------------------------------------------------------------------------------------------- pieces


def test_recommender_rows_read_each_shape() -> None:
    prioritize_shape = {"k": 10, "users_evaluated": 5, "definitions": {"ndcg": "text"},
                        "model": {"overall": {"users": 5, "ndcg": 0.4, "implicit_precision": 0.3},
                                  "segments": {"free": {"ndcg": 0.5}}},
                        "popularity": {"overall": {"ndcg": 0.2}, "segments": {"free": {"ndcg": 0.1}}}}
    got = {(r["group"], r["method"], r["metric"]): r["value"] for r in recommender_rows(prioritize_shape)}
    assert got == {("overall", "model", "ndcg"): 0.4, ("free", "model", "ndcg"): 0.5,
                   ("overall", "popularity", "ndcg"): 0.2, ("free", "popularity", "ndcg"): 0.1}
    nested = {"overall": {"model": {"ndcg@10": 0.41}, "popularity": {"ndcg@10": 0.25}},
              "per_segment": {"pro": {"model": {"precision@10": 0.2}, "popularity": {"precision@10": 0.1}}}}
    got = {(r["group"], r["method"], r["metric"]): r["value"] for r in recommender_rows(nested)}
    assert got == {("overall", "model", "ndcg@10"): 0.41, ("overall", "popularity", "ndcg@10"): 0.25,
                   ("pro", "model", "precision@10"): 0.2, ("pro", "popularity", "precision@10"): 0.1}
    records = [{"segment": "free", "method": "popularity", "metric": "map@5", "value": 0.3},
               {"segment": "free", "method": "als", "metric": "map@5", "value": 0.6}]
    got = {(r["group"], r["method"], r["metric"]): r["value"] for r in recommender_rows(records)}
    assert got == {("free", "popularity", "map@5"): 0.3, ("free", "model", "map@5"): 0.6}


def test_layer_grid_places_scores_and_measured_cells() -> None:
    recs = [{"domain": "a", "layer": 2, "score": 0.5, "measured": True},
            {"domain": "b", "layer": 0, "score": 0.1, "measured": False},
            {"domain": "a", "layer": 0, "score": 0.9, "measured": False}]
    rows, layers, score, measured = layer_grid(recs)
    assert rows == ["a", "b"] and layers == [0, 2]
    np.testing.assert_array_equal(score, [[0.9, 0.5], [0.1, np.nan]])
    assert measured.tolist() == [[False, True], [False, False]]
    rows, layers, _, _ = layer_grid([{"layer": 3, "score": 1.0}])
    assert rows == ["all domains"] and layers == [3]
    assert layer_grid([]) is None


def test_traffic_tables_negative_feedback_rate() -> None:
    counts = [{"segment": "free", "domain": "billing", "event": "impression", "n": 10},
              {"segment": "free", "domain": "billing", "event": "thumbs_down", "n": 3},
              {"segment": "free", "domain": "cards", "event": "thumbs_up", "n": 1},
              {"segment": "pro", "domain": "billing", "event": "resolve", "n": 6},
              {"segment": "pro", "domain": "cards", "event": "escalate", "n": 2}]
    seg, dom = traffic_tables(counts)
    assert [(r["name"], r["events"]) for r in seg] == [("free", 14), ("pro", 8)]
    assert seg[0]["negative_rate"] == pytest.approx(3 / 4) and seg[1]["negative_rate"] == pytest.approx(2 / 8)
    billing = next(r for r in dom if r["name"] == "billing")
    assert billing["events"] == 19 and billing["share"] == pytest.approx(19 / 22)
    assert billing["negative_rate"] == pytest.approx(3 / 9)


def test_store_section_through_the_read_api(tmp_path: Path) -> None:
    store_mod = pytest.importorskip("adaptive_ft.store", reason="the store module is not available")
    log = tmp_path / "logs.jsonl"
    events = [("u1", "free", "e1", "billing", "impression"), ("u1", "free", "e1", "billing", "thumbs_down"),
              ("u2", "pro", "e2", "cards", "impression"), ("u2", "pro", "e2", "cards", "thumbs_up"),
              ("u3", "pro", "e1", "billing", "impression")]
    log.write_text("\n".join(json.dumps({"ts": f"2026-01-01T00:00:0{i}Z", "user_id": u, "segment": s,
                                         "example_id": e, "domain": d, "prompt": f"prompt {e}", "event": ev})
                             for i, (u, s, e, d, ev) in enumerate(events)) + "\n")
    store = tmp_path / "s.duckdb"
    store_mod.ingest([log], store=store)
    doc = json.loads(build_report(ReportInputs(store=store), tmp_path / "r.html", draw=False).json.read_text())
    data = doc["sections"][0]["data"]
    assert doc["sections"][0]["id"] == "store"
    assert (data["events"], data["users"], data["examples"], data["batches"]) == (5, 3, 2, 1)
    assert {r["name"]: r["events"] for r in data["segments"]} == {"free": 2, "pro": 3}
    assert {r["name"]: r["negative_rate"] for r in data["domains"]} == {"billing": 1.0, "cards": 0.0}


def test_cli_writes_the_three_files(tmp_path: Path) -> None:
    from adaptive_ft.cli import cli

    every = make_all(tmp_path)
    out = tmp_path / "rep" / "report.html"
    res = CliRunner().invoke(cli, ["report", "--plan", str(every.plan), "--eval", str(every.eval), "--out", str(out),
                                   "--no-plots"])
    assert res.exit_code == 0, res.output
    assert out.is_file() and out.with_suffix(".md").is_file() and out.with_suffix(".json").is_file()
    assert "Flagged: enterprise" in res.output and "wrote" in res.output
    assert "<img" not in out.read_text()  # --no-plots
    res = CliRunner().invoke(cli, ["report", "--out", str(out)])
    assert res.exit_code == 1 and "nothing to report on" in res.output and "Traceback" not in res.output


def test_lower_is_better_metrics_read_as_improvements(tmp_path: Path) -> None:
    """A text task's perplexity falling from 20 to 15 is an improvement (green), printed as a number, not a %."""
    rows = [_row(m, "segment", "free", None, v, 40) | {"metric": "perplexity"}
            for m, v in (("base", 20.0), ("runs/t1", 15.0))]
    rows += [_row(m, "overall", None, None, v, 40) | {"metric": "perplexity"} for m, v in (("base", 20.0),
                                                                                            ("runs/t1", 15.0))]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"task": "text", "models": ["base", "runs/t1"], "primary_metric": "perplexity",
                                "metrics": rows}))
    result = build_report(ReportInputs(eval=path), tmp_path / "r.html", draw=False)
    doc = json.loads(result.json.read_text())
    assert doc["summary"]["overall"] == {"base": 20.0, "finetuned": 15.0, "delta": -5.0}
    tile = doc["summary"]["tiles"][0]
    assert (tile["value"], tile["tone"]) == ("15.000", "good") and "-5.000" in tile["detail"]
    html = result.html.read_text()
    assert '<span class="chip good"><span class="chip-seg">free</span><strong>-5.000</strong>' in html


def test_text_from_artifacts_is_escaped(tmp_path: Path) -> None:
    """Names and reasons come from users' logs: they are shown as text, never interpreted as HTML."""
    plan = Plan(domains=[DomainScore("<img src=x onerror=alert(1)>", priority=0.5, why="A & B <script>")])
    path = plan.save(tmp_path / "plan.json")
    html = build_report(ReportInputs(plan=path), tmp_path / "r.html", draw=False).html.read_text()
    assert "<img src=x" not in html and "<script>" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html and "A &amp; B &lt;script&gt;" in html
