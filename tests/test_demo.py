"""`adaptive-ft demo --quick` end to end: every stage runs for real on a tiny in-process model, and every
artifact a user's scripts rely on is there and consistent with the others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from adaptive_ft.cli import cli
from adaptive_ft.prioritize.plan import Plan, file_sha256


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> tuple[Path, str]:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(cli, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out, result.output


@pytest.mark.slow
def test_demo_writes_every_artifact(demo_out):
    out, _ = demo_out
    for rel in ("logs.jsonl", "logs.truth.json", "store.duckdb", "plan.json", "run/adapter/adapter_config.json",
                "run/adapter/adapter_model.safetensors", "run/metrics.jsonl", "run/manifest.json",
                "run/split.parquet", "export/manifest.json", "eval.json", "report.html", "report.md", "report.json"):
        assert (out / rel).is_file(), f"missing {rel}"


@pytest.mark.slow
def test_demo_artifacts_agree_with_each_other(demo_out):
    out, _ = demo_out
    plan = Plan.load(out / "plan.json")
    manifest = json.loads((out / "run/manifest.json").read_text())
    assert manifest["plan_sha256"] == file_sha256(out / "plan.json")
    assert plan.layers is not None and manifest["layers"] == plan.layers.selected
    adapter = json.loads((out / "run/adapter/adapter_config.json").read_text())
    assert sorted(adapter["layers_to_transform"]) == plan.layers.selected
    metrics = [json.loads(line) for line in (out / "run/metrics.jsonl").read_text().splitlines()]
    assert metrics and all(m["train_loss"] == m["train_loss"] for m in metrics)  # no NaN
    ev = json.loads((out / "eval.json").read_text())
    assert ev["models"][0] == "base" and len(ev["models"]) >= 3  # base, the run, quantized variants
    scopes = {m["scope"] for m in ev["metrics"]}
    assert {"overall", "segment", "domain", "segment_domain"} <= scopes
    variants = {v["name"] for v in json.loads((out / "export/manifest.json").read_text())["variants"]}
    assert {"merged", "int8", "nf4"} <= variants and any(v.startswith("gguf") for v in variants)


@pytest.mark.slow
def test_demo_prints_the_report_path_and_a_five_line_summary(demo_out):
    out, output = demo_out
    assert f"Report: {out / 'report.html'}" in output
    tail = output.split("Report:")[1].splitlines()[1:6]
    assert tail[0].strip().startswith("Prioritized:")
    assert any("Before -> after" in line for line in tail)
    assert any("Worst segment" in line for line in tail)
    assert any("Quantized model" in line for line in tail)
    html = (out / "report.html").read_text()
    assert "http://" not in html and "https://" not in html
