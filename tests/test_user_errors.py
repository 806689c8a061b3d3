"""A user's mistake gets a message that says what, where and what to do, never a traceback (issue 16).

Each case failed on the code before its fix (a raw traceback, a misleading message, or silent acceptance).
Plans and models are built in-process; the commands run through click's CliRunner.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch

from cli_world import TRAIN, aft, build_world, ok, refused


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return build_world(tmp_path_factory)


def _plan_with(world, tmp: Path, **changes) -> Path:
    doc = json.loads(world["plan"].read_text())
    doc.update(changes)
    path = tmp / "plan.json"
    path.write_text(json.dumps(doc))
    return path


# ------------------------------------------------------------------ malformed plans


def _bad_plans(world, tmp: Path) -> dict[str, tuple[dict, str]]:
    doc = json.loads(world["plan"].read_text())
    first = doc["domains"][0]
    not_parquet = tmp / "plan.examples.parquet"
    not_parquet.write_text("example_id,weight\ne1,1.0\n")
    return {
        "layers-as-list": ({"layers": [0, 1]}, "layers"),
        "rank-pattern-not-int": ({"layers": {"selected": [0], "rank_pattern": {"0": "eight"}}}, "rank_pattern"),
        "string-weight": ({"examples": [{"example_id": e["example_id"], "domain": e["domain"], "weight": "0.5"}
                                        for e in doc["examples"][:3]]}, "weight"),
        "examples-file-not-parquet": ({"examples": [], "examples_file": not_parquet.name}, not_parquet.name),
        "priority-high": ({"domains": [{**first, "priority": "high"}, *doc["domains"][1:]]}, "priority"),
    }


@pytest.mark.parametrize("case", ["layers-as-list", "rank-pattern-not-int", "string-weight",
                                  "examples-file-not-parquet", "priority-high"])
def test_a_malformed_plan_is_a_message_in_train_plan_show_and_report(world, tmp_path, case):
    changes, word = _bad_plans(world, tmp_path)[case]
    path = _plan_with(world, tmp_path, **changes)
    refused(aft("train", "--store", world["store"], "--plan", path, "--model", world["base"], "--out",
                tmp_path / "r", *TRAIN), str(path), word)
    refused(aft("plan", "show", path), str(path), word)
    refused(aft("report", "--plan", path, "--out", tmp_path / "r.html", "--no-plots"), str(path), word)


# ------------------------------------------------------------------ broken models and runs


def _truncated(world, tmp: Path) -> Path:
    model = tmp / "truncated-model"
    shutil.copytree(world["base"], model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return model


def test_a_truncated_safetensors_file_is_a_message_in_prioritize(world, tmp_path):
    model = _truncated(world, tmp_path)
    r = aft("prioritize", "--store", world["store"], "--out", tmp_path / "p.json", "--quiet", "--model", model,
            "prioritize.factors=4", "prioritize.iterations=3")
    refused(r, "model.safetensors")
    assert not (tmp_path / "p.json").exists()


def test_a_truncated_safetensors_file_is_a_message_in_evaluate(world, tmp_path):
    model = _truncated(world, tmp_path)
    r = aft("evaluate", "--store", world["store"], "--run", world["run"], "--models", f"base,{model}", "--out",
            tmp_path / "e.json", "evaluate.bootstrap=10")
    refused(r, "model.safetensors")


def test_evaluate_on_a_run_without_its_adapter(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    shutil.rmtree(run / "adapter")
    r = aft("evaluate", "--store", world["store"], "--models", f"base,{run}", "--out", tmp_path / "e.json")
    refused(r, str(run), "adapter")


def test_evaluate_names_a_model_that_does_not_exist(world, tmp_path):
    r = aft("evaluate", "--store", world["store"], "--models", f"base,{tmp_path / 'nope'}", "--out",
            tmp_path / "e.json")
    refused(r, str(tmp_path / "nope"), "not found")


def test_shipped_tiny_config_trains_without_the_network(world, tmp_path, monkeypatch):
    """configs/tiny.yaml says ``model: tiny``: the tiny model built in-process (cached), not a hub id."""
    monkeypatch.setenv("ADAPTIVE_FT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    r = aft("train", "--store", world["store"], "--plan", world["plan"], "--out", tmp_path / "r", "--config", cfg,
            "train.max_steps=2", "train.threads=1")
    ok(r)
    man = json.loads((tmp_path / "r/manifest.json").read_text())
    assert man["base_model"] == "tiny" and Path(man["base_model_path"]).is_relative_to(tmp_path / "cache")


# ------------------------------------------------------------------ eval files


def test_eval_errors_name_the_file_given(world, tmp_path):
    bad = tmp_path / "my-results.json"
    bad.write_text(json.dumps({"models": "base"}))
    r = aft("report", "--eval", bad, "--out", tmp_path / "r.html", "--no-plots")
    refused(r, str(bad))
    r = aft("review", "export", "--store", world["store"], "--eval", bad, "--out", tmp_path / "r.csv")
    refused(r, str(bad))


# ------------------------------------------------------------------ what others open: Markdown, spreadsheets


HOSTILE = ["<script>alert(1)</script>", "<img src=x onerror=alert(2)>"]


def test_report_markdown_escapes_raw_html(world, tmp_path):
    doc = json.loads(world["plan"].read_text())
    doc["domains"][0]["domain"] = HOSTILE[0]
    doc["domains"][0]["why"] = HOSTILE[1]
    for e in doc["examples"]:
        e["domain"] = HOSTILE[0] if e["domain"] == json.loads(world["plan"].read_text())["domains"][0]["domain"] \
            else e["domain"]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(doc))
    ok(aft("report", "--plan", plan, "--out", tmp_path / "r.html", "--no-plots"))
    md = (tmp_path / "r.md").read_text()
    assert "<script" not in md and "<img" not in md
    assert "&lt;script&gt;" in md and "&lt;img" in md  # still there, as text


def test_review_csv_defuses_cells_a_spreadsheet_would_run(tmp_path):
    prompts = ["=HYPERLINK(\"http://x\")", "+1+1", "-2+3", "@SUM(A1)", "\tcmd", "\rcmd", "plain question"]
    rows = [{"example_id": f"e{i}", "domain": "d", "prompt": p, "reference": "=ref", "model": "m",
             "response": "-resp", "score": 1.0} for i, p in enumerate(prompts)]
    log = tmp_path / "logs.jsonl"
    log.write_text("".join(json.dumps({"event_id": f"v{i}", "ts": "2025-01-01T00:00:00Z", "user_id": "u1",
                                       "segment": "free", "example_id": r["example_id"], "domain": "d",
                                       "prompt": r["prompt"], "reference": "=ref", "event": "impression"}) + "\n"
                           for i, r in enumerate(rows)))
    ok(aft("ingest", log, "--store", tmp_path / "s.duckdb"))
    pl.DataFrame(rows).write_parquet(tmp_path / "eval.outputs.parquet")
    (tmp_path / "eval.json").write_text(json.dumps({"models": ["m"], "finetuned_model": "m", "metrics": [],
                                                    "outputs": "eval.outputs.parquet"}))
    ok(aft("review", "export", "--store", tmp_path / "s.duckdb", "--eval", tmp_path / "eval.json", "--out",
           tmp_path / "review.csv", "--per-cell", "10"))
    with open(tmp_path / "review.csv", newline="") as f:
        got = list(csv.DictReader(f))
    by_id = {r["example_id"]: r for r in got}
    assert len(got) == len(prompts)
    for i, p in enumerate(prompts):
        cell = by_id[f"e{i}"]["prompt"]
        assert cell == (p if p[0].isalpha() else "'" + p), (p, cell)
    assert all(r["reference"] == "'=ref" and r["response"] == "'-resp" for r in got)
