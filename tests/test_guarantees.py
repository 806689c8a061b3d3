"""What the tool promises a user who tries to break it (issue 16), checked through the CLI on a tiny model.

Each test here failed on the code before its fix. They run the real commands (click's CliRunner) on one small
pipeline built once per test process (tests/cli_world.py): a tiny Llama, a simulated log, its store, a plan, a 4-step run and its
evaluation. Tests that change an artifact work on a copy.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from cli_world import TRAIN, aft, build_tiny_model, build_world, copy_run, digest, ok, refused


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return build_world(tmp_path_factory)


# ------------------------------------------------------------------ 1. no command writes over its own input


def _overwrite_cases(w: dict[str, Path], tmp: Path) -> list[tuple[list, Path]]:
    plan, ev, store = tmp / "plan.json", tmp / "eval.json", tmp / "s.duckdb"
    shutil.copy(w["plan"], plan)
    shutil.copy(w["eval"], ev)
    shutil.copy(w["eval"].with_name("eval.outputs.parquet"), tmp / "eval.outputs.parquet")
    shutil.copy(w["store"], store)
    pool = tmp / "pool.csv"
    pool.write_text("prompt,reference,domain\n" + "".join(f"question {i},answer {i % 3},d{i % 2}\n" for i in range(30)))
    run = copy_run(w, tmp / "run")
    cfg = tmp / "cfg.yaml"
    cfg.write_text("seed: 0\n")
    return [
        (["report", "--plan", plan, "--out", tmp / "plan.html", "--no-plots"], plan),  # report.json = plan.json
        (["report", "--eval", ev, "--out", tmp / "eval.html", "--no-plots"], ev),
        (["report", "--run", run, "--out", run / "manifest.html", "--no-plots"], run / "manifest.json"),
        (["prioritize", "--store", store, "--out", store, "--quiet"], store),
        (["prioritize", "--store", store, "--config", cfg, "--out", cfg, "--quiet"], cfg),
        (["review", "export", "--store", store, "--eval", ev, "--out", ev], ev),
        (["simulate", "--out", pool, "--examples", pool], pool),
        (["evaluate", "--store", store, "--models", f"base,{run}", "--out", store], store),
    ]


@pytest.mark.parametrize("i", range(8), ids=["report-plan", "report-eval", "report-run-manifest", "prioritize-store",
                                             "prioritize-config", "review-eval", "simulate-examples",
                                             "evaluate-store"])
def test_no_command_writes_over_a_file_it_was_given(world, tmp_path, i):
    args, victim = _overwrite_cases(world, tmp_path)[i]
    before = digest(victim)
    r = aft(*args)
    refused(r, victim.name, "input")
    assert digest(victim) == before


# ------------------------------------------------------------------ 2. a run is bound to its base


def test_run_records_an_absolute_base_path_and_its_fingerprint(world, tmp_path, monkeypatch):
    shutil.copytree(world["base"], tmp_path / "tiny-model")
    monkeypatch.chdir(tmp_path)
    ok(aft("train", "--store", world["store"], "--plan", world["plan"], "--model", "tiny-model", "--out", "r", *TRAIN))
    man = json.loads((tmp_path / "r/manifest.json").read_text())
    assert man["base_model_path"] == str((tmp_path / "tiny-model").resolve())
    fp = man["base_model_fingerprint"]
    assert isinstance(fp, str) and len(fp) == 64


def _rebound_run(world, tmp: Path) -> tuple[Path, Path]:
    """A copy of the run whose base is a copy of the tiny model (same bytes, so the same fingerprint)."""
    base = tmp / "base"
    shutil.copytree(world["base"], base)
    run = copy_run(world, tmp / "run")
    man = json.loads((run / "manifest.json").read_text())
    man["base_model_path"] = str(base)
    (run / "manifest.json").write_text(json.dumps(man))
    return run, base


def test_a_run_refuses_a_base_that_changed(world, tmp_path):
    run, base = _rebound_run(world, tmp_path)
    ok(aft("evaluate", "--store", world["store"], "--models", f"base,{run}", "--out", tmp_path / "e0.json",
           "evaluate.bootstrap=10"))
    shutil.rmtree(base)
    build_tiny_model(base, n_layers=2, seed=1)  # same shapes, other weights: the adapter would load silently
    r = aft("evaluate", "--store", world["store"], "--models", f"base,{run}", "--out", tmp_path / "e.json",
            "evaluate.bootstrap=10")
    refused(r, str(base), "does not match")
    r = aft("export", run, "--out", tmp_path / "x", "--variants", "merged")
    refused(r, str(base), "does not match")
    r = aft("train", "--store", world["store"], "--plan", world["plan"], "--out", run, "--resume", *TRAIN)
    refused(r, "does not match")


def test_a_relative_base_path_from_another_folder_is_not_a_decoy(world, tmp_path, monkeypatch):
    """An old manifest with a relative base path, read from a folder where another model has that name."""
    run = copy_run(world, tmp_path / "run")
    man = json.loads((run / "manifest.json").read_text())
    man["base_model_path"] = man["base_model"] = "tiny-model"
    (run / "manifest.json").write_text(json.dumps(man))
    build_tiny_model(tmp_path / "tiny-model", n_layers=2, seed=1)
    monkeypatch.chdir(tmp_path)
    r = aft("evaluate", "--store", world["store"], "--models", f"base,{run}", "--out", tmp_path / "e.json",
            "evaluate.bootstrap=10")
    refused(r, "tiny-model", "does not match")


# ------------------------------------------------------------------ 6. --resume takes the run's own settings


def _resumable(world, tmp: Path) -> Path:
    run = copy_run(world, tmp / "run")
    shutil.rmtree(run / "checkpoints" / "step-4")  # resume from step 2
    return run


@pytest.mark.parametrize("extra,key", [(["--lr", "0.1"], "train.lr"), (["train.lora.r=8"], "train.lora.r"),
                                       (["train.max_steps=6"], "train.max_steps"), (["seed=3"], "seed")])
def test_resume_refuses_a_setting_that_differs_from_the_run(world, tmp_path, extra, key):
    run = _resumable(world, tmp_path)
    before = digest(run / "manifest.json")
    r = aft("train", "--store", world["store"], "--plan", world["plan"], "--model", world["base"], "--out", run,
            "--resume", *TRAIN, *extra)
    refused(r, key)
    assert digest(run / "manifest.json") == before


def test_resume_refuses_another_plan_or_base(world, tmp_path):
    run = _resumable(world, tmp_path)
    plan = json.loads(world["plan"].read_text())
    plan["domains"] = plan["domains"][:2]
    (tmp_path / "other.json").write_text(json.dumps(plan))
    r = aft("train", "--store", world["store"], "--plan", tmp_path / "other.json", "--model", world["base"],
            "--out", run, "--resume", *TRAIN)
    refused(r, "plan")
    other = build_tiny_model(tmp_path / "other-model", n_layers=2, seed=1)
    r = aft("train", "--store", world["store"], "--plan", world["plan"], "--model", other, "--out", run, "--resume",
            *TRAIN)
    refused(r, "model")


def test_resume_without_settings_continues_with_the_runs_own(world, tmp_path):
    """No --model, no overrides: the run's base and config, and the result equals the uninterrupted run."""
    run = _resumable(world, tmp_path)
    r = aft("train", "--store", world["store"], "--plan", world["plan"], "--out", run, "--resume")
    ok(r)
    man = json.loads((run / "manifest.json").read_text())
    orig = json.loads((world["run"] / "manifest.json").read_text())
    assert man["base_model_path"] == orig["base_model_path"] and man["config"] == orig["config"]
    assert man["steps"] == 4
    from safetensors.torch import load_file

    a = load_file(str(run / "adapter/adapter_model.safetensors"))
    b = load_file(str(world["run"] / "adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_reports_this_sessions_time_and_cumulative_timings(world, tmp_path):
    run = _resumable(world, tmp_path)
    state_path = run / "checkpoints/step-2/trainer_state.pt"
    state = torch.load(state_path, weights_only=True)
    state["loop"]["train_seconds"] = 1000.0  # as if the first session had trained for 1000 s
    torch.save(state, state_path)
    r = aft("train", "--store", world["store"], "--plan", world["plan"], "--model", world["base"], "--out", run,
            "--resume", *TRAIN)
    ok(r)
    t = json.loads((run / "manifest.json").read_text())["timings"]
    assert t["train_s"] >= 1000 and t["total_s"] >= t["train_s"] + t["eval_s"]
    summary = next(line for line in r.output.splitlines() if line.startswith("trained"))
    m = re.search(r"trained (\d+) steps \(resumed at step 2, now 4\) on layers \S+ in (\d+)s ", summary)
    assert m and int(m[1]) == 2 and int(m[2]) < 1000, summary  # this session's steps and time, not the run's


# ------------------------------------------------------------------ 8. the report's artifacts belong together


def test_report_says_which_artifacts_do_not_belong_together(world, tmp_path):
    ok(aft("report", "--plan", world["plan"], "--run", world["run"], "--eval", world["eval"], "--out",
           tmp_path / "ok.html", "--no-plots"))
    r2 = tmp_path / "r2"
    ok(aft("train", "--store", world["store"], "--plan", world["plan"], "--model", world["base"], "--out", r2,
           *TRAIN, "seed=5"))
    ev2 = tmp_path / "eval2.json"
    ok(aft("evaluate", "--store", world["store"], "--models", f"base,{r2}", "--out", ev2, "evaluate.bootstrap=10"))
    r = aft("report", "--run", world["run"], "--eval", ev2, "--out", tmp_path / "mixed.html", "--no-plots")
    refused(r, "eval2.json", "r1")
    other = json.loads(world["plan"].read_text())
    other["domains"] = other["domains"][:2]
    (tmp_path / "plan2.json").write_text(json.dumps(other))
    r = aft("report", "--plan", tmp_path / "plan2.json", "--run", world["run"], "--out", tmp_path / "m2.html",
            "--no-plots")
    refused(r, "plan2.json", "r1")
    export = tmp_path / "export"
    export.mkdir()
    (export / "manifest.json").write_text(json.dumps({"run": str(r2), "base_model": "x", "variants": []}))
    r = aft("report", "--run", world["run"], "--export", export, "--out", tmp_path / "m3.html", "--no-plots")
    refused(r, str(export), "r1")


# ------------------------------------------------------------------ 9. the plan says what it can train


def test_a_domain_without_reference_answers_gets_no_share_and_train_accepts_the_plan(world, tmp_path):
    rows = [json.loads(line) for line in world["log"].read_text().splitlines()]
    plan = json.loads(world["plan"].read_text())
    orphan = plan["domains"][0]["domain"]  # the top domain: the one that would take the largest share
    for row in rows:
        if row["domain"] == orphan:
            row.pop("reference", None)
    log = tmp_path / "logs.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = tmp_path / "s.duckdb"
    ok(aft("ingest", log, "--store", store))
    out = tmp_path / "plan.json"
    ok(aft("prioritize", "--store", store, "--out", out, "--quiet", "prioritize.factors=4", "prioritize.iterations=3"))
    doc = json.loads(out.read_text())
    by = {d["domain"]: d for d in doc["domains"]}
    assert by[orphan]["share"] == 0 and by[orphan]["trainable"] is False
    assert sum(d["share"] for d in doc["domains"]) == pytest.approx(1.0)
    assert all(d["trainable"] for d in doc["domains"] if d["domain"] != orphan)
    assert not any(e["domain"] == orphan and e["weight"] > 0 for e in doc["examples"])
    assert any(orphan in n and "reference" in n for n in doc["notes"]), doc["notes"]
    ok(aft("train", "--store", store, "--plan", out, "--model", world["base"], "--out", tmp_path / "r", *TRAIN))
    split = __import__("polars").read_parquet(tmp_path / "r/split.parquet")
    assert orphan not in set(split["domain"])


# ------------------------------------------------------------------ bullets: overwrite, leftovers


def test_simulate_refuses_to_overwrite_a_log_without_force(tmp_path):
    log = tmp_path / "logs.jsonl"
    log.write_text("my own log\n")
    r = aft("simulate", "--out", log, "simulate.users=10", "simulate.events=100")
    refused(r, str(log), "--force")
    assert log.read_text() == "my own log\n"
    truth = tmp_path / "other.truth.json"
    truth.write_text("{}")
    r = aft("simulate", "--out", tmp_path / "other.jsonl", "simulate.users=10", "simulate.events=100")
    refused(r, str(truth), "--force")
    assert truth.read_text() == "{}" and not (tmp_path / "other.jsonl").exists()
    ok(aft("simulate", "--out", log, "--force", "simulate.users=10", "simulate.events=100"))
    assert log.read_text() != "my own log\n"


def test_a_failed_train_or_resume_leaves_no_run_folder(world, tmp_path):
    r = aft("train", "--store", world["store"], "--plan", tmp_path / "nope.json", "--model", world["base"],
            "--out", tmp_path / "r")
    refused(r, "nope.json")
    assert not (tmp_path / "r").exists()
    r = aft("train", "--store", world["store"], "--plan", world["plan"], "--out", tmp_path / "r2", "--resume")
    refused(r, "r2")
    assert not (tmp_path / "r2").exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"domains": ["no-such-domain"]}))
    r = aft("train", "--store", world["store"], "--plan", bad, "--model", world["base"], "--out", tmp_path / "r3")
    assert r.exit_code == 1 and not (tmp_path / "r3").exists(), r.output


# ------------------------------------------------------------------ bullets: layers


@pytest.mark.parametrize("selected", [[], [True], [0, 1.0], ["0"]])
def test_plan_layers_selected_must_name_layers(world, tmp_path, selected):
    plan = json.loads(world["plan"].read_text())
    plan["layers"] = {"selected": selected}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    r = aft("train", "--store", world["store"], "--plan", path, "--model", world["base"], "--out", tmp_path / "r",
            *TRAIN)
    refused(r, "layers.selected")


def test_layers_k_larger_than_the_model_is_noted_in_the_plan(world, tmp_path):
    out = tmp_path / "plan.json"
    ok(aft("prioritize", "--store", world["store"], "--out", out, "--quiet", "--model", world["base"],
           "prioritize.factors=4", "prioritize.iterations=3", "prioritize.layers_k=5", "prioritize.probe_examples=4"))
    doc = json.loads(out.read_text())
    assert len(doc["layers"]["selected"]) <= 2
    assert any("layers_k" in n and "5" in n and "2" in n for n in doc["notes"]), doc["notes"]
