"""`adaptive-ft demo --quick` end to end: the loop (v1 on a launch mix, v1's own answers as the users'
feedback, v2 from v1's adapter, v1 vs v2) runs for real on a tiny in-process model, and every artifact a
user's scripts rely on is there and consistent with the others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from adaptive_ft.artifacts.plan import Plan
from adaptive_ft.cli import cli
from adaptive_ft.files import file_sha256


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
    for rel in ("launch/logs.parquet", "launch/store.duckdb", "launch/plan.json", "v1/manifest.json",
                "v1/adapter/adapter_model.safetensors", ".adaptive-ft-demo",
                "logs.jsonl", "logs.truth.json", "store.duckdb", "plan.json", "run/adapter/adapter_config.json",
                "run/adapter/adapter_model.safetensors", "run/metrics.jsonl", "run/manifest.json",
                "run/split.parquet", "export/manifest.json", "eval.json", "report.html", "report.md", "report.json"):
        assert (out / rel).is_file(), f"missing {rel}"


@pytest.mark.slow
def test_demo_artifacts_agree_with_each_other(demo_out):
    out, _ = demo_out
    plan = Plan.load(out / "plan.json")
    manifest = json.loads((out / "run/manifest.json").read_text())
    v1 = json.loads((out / "v1/manifest.json").read_text())
    assert manifest["plan_sha256"] == file_sha256(out / "plan.json")
    # v2 (run/) continued v1's adapter on v1's layers, and both used the same split
    assert Path(manifest["init_adapter"]) == out / "v1/adapter"
    assert manifest["layers"] == v1["layers"] and manifest["split_sha256"] == v1["split_sha256"]
    adapter = json.loads((out / "run/adapter/adapter_config.json").read_text())
    assert sorted(adapter["layers_to_transform"]) == v1["layers"]
    # the log's feedback is v1's own answers
    truth = json.loads((out / "logs.truth.json").read_text())
    assert truth["failure_source"] == "responder" and truth["model_version"] == "v1"
    launch = Plan.load(out / "launch/plan.json")
    weak = launch.inputs["weak_domains"]
    assert len(weak) == 2 and {d.domain for d in plan.domains} >= set(weak)
    metrics = [json.loads(line) for line in (out / "run/metrics.jsonl").read_text().splitlines()]
    assert metrics and all(m["train_loss"] == m["train_loss"] for m in metrics)  # no NaN
    ev = json.loads((out / "eval.json").read_text())
    assert ev["models"][:2] == [str(out / "v1"), str(out / "run")] and len(ev["models"]) >= 4  # + int8, nf4
    assert ev["baseline"] == str(out / "v1") and ev["finetuned_model"] == str(out / "run")
    assert {d["model"] for d in ev["deltas"]} == set(ev["models"][1:])  # every model paired against v1
    scopes = {m["scope"] for m in ev["metrics"]}
    assert {"overall", "segment", "domain", "segment_domain"} <= scopes
    variants = {v["name"] for v in json.loads((out / "export/manifest.json").read_text())["variants"]}
    assert {"merged", "int8", "nf4"} <= variants and any(v.startswith("gguf") for v in variants)
    assert "v1 → v2: what the loop fixed" in (out / "report.md").read_text()


@pytest.mark.slow
def test_demo_prints_the_report_path_and_the_loop_summary(demo_out):
    out, output = demo_out
    assert f"Report: {out / 'report.html'}" in output
    tail = [line.strip() for line in output.split("Report:")[1].splitlines()[1:]]
    assert tail[0].startswith("Where v1 failed (from its logs):")
    assert tail[1].startswith("Targeted:")
    assert any(line.startswith("v1 -> v2 per segment:") for line in tail)
    assert any(line.startswith("Significantly worse than v1") for line in tail)
    assert any(line.startswith("Quantized model") for line in tail)
    html = (out / "report.html").read_text()
    assert "http://" not in html and "https://" not in html


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "plan.json").write_text("{}")  # the user's own file, with a name the demo would write
    result = CliRunner().invoke(cli, ["demo", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "the demo did not write" in result.output
    assert (tmp_path / "plan.json").read_text() == "{}"
