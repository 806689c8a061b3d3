"""The loop on a tiny model: a model's own right and wrong answers become the feedback, the plan finds where it
fails, and v2 continues v1's adapter (not a fresh one) and is audited against v1."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from adaptive_ft.cli import cli
from adaptive_ft.config import load_config
from adaptive_ft.errors import InputError, ModelError
from adaptive_ft.finetune import train
from adaptive_ft.lm.models import build_tiny_model
from adaptive_ft.lm.responder import ModelResponder
from adaptive_ft.loop import launch_plan, run_loop
from adaptive_ft.prioritize import prioritize
from adaptive_ft.simulate import csv_pool, simulate
from adaptive_ft.store import Store, ingest

ROOT = Path(__file__).resolve().parents[1]
NOISE = 0.05
NEGATIVE = ("thumbs_down",)  # only unhelpful answers draw it (simulate._FEEDBACK), as thumbs_up only helpful ones


def _pool_csv(path: Path) -> Path:
    """Two domains, one answer each: a model that learned only 'cards' answers card_help to every prompt,
    which is right on cards and wrong on every loans prompt."""
    rng = random.Random(0)
    words = ["my", "the", "a", "please", "why", "how", "can", "today", "still", "again", "now", "help"]
    rows = ["prompt,reference,domain"]
    for dom, noun, ref in (("cards", "card", "card_help"), ("loans", "loan", "loan_help")):
        for i in range(40):
            rows.append(f"{' '.join(rng.sample(words, 3))} {noun} question {i},{ref},{dom}")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def v1_world(tmp_path_factory) -> dict:
    """A launch store, a v1 trained on cards only, and a log of v1 answering users (noise 0.05)."""
    torch.set_num_threads(1)
    w = tmp_path_factory.mktemp("loop")
    pool = csv_pool(_pool_csv(w / "pool.csv"))
    cfg = load_config(ROOT / "configs/tiny.yaml", ["train.max_steps=60", "train.lr=0.01", "train.eval_every=60",
                                                   "train.checkpoint_every=60", "simulate.events=4000",
                                                   f"simulate.noise={NOISE}", "train.test_fraction=0.25"])
    launch = simulate(cfg.simulate, w / "launch.jsonl", pool=pool, seed=0)
    ingest([launch.log_path], store=w / "launch.duckdb", config=cfg.ingest)
    with Store.open(w / "launch.duckdb", read_only=True) as s:
        counts = dict(s.examples().group_by("domain").len().iter_rows())
    launch_plan(counts, ["loans"], weak_factor=0.0).save(w / "plan-launch.json")
    model = build_tiny_model(w / "tiny", texts=pool.frame["prompt"].to_list() + ["card_help", "loan_help"],
                             n_layers=2, seed=0)
    train(cfg, w / "launch.duckdb", w / "plan-launch.json", str(model), w / "v1")
    sim = simulate(cfg.simulate, w / "v1.jsonl", pool=pool, seed=1, responder=ModelResponder(str(w / "v1")))
    ingest([sim.log_path], store=w / "v1.duckdb", config=cfg.ingest)
    return {"w": w, "cfg": cfg, "sim": sim, "pool": pool}


@pytest.mark.slow
def test_responder_answers_decide_the_feedback(v1_world):
    w, sim = v1_world["w"], v1_world["sim"]
    truth = json.loads(sim.truth_path.read_text())
    assert truth["failure_source"] == "responder" and truth["model_version"] == "v1"
    # The model itself: right on every cards query, wrong on every loans query (a constant answer it learned).
    by_domain: dict[str, list[float]] = {}
    for row in truth["need"]:
        if row["queries"]:
            by_domain.setdefault(row["domain"], []).append(row["observed_failure"])
    assert set(by_domain) == {"cards", "loans"}
    assert max(by_domain["cards"]) == 0.0 and min(by_domain["loans"]) == 1.0
    frame = pl.read_ndjson(sim.log_path)
    assert set(frame.filter(pl.col("domain") == "loans")["response"].unique()) == {"card_help"}
    assert set(frame["model_version"].unique()) == {"v1"}
    # What the logs measure follows it: the share of thumbs that are down is the noise on cards, 1 - noise on loans.
    thumbs = (frame.filter(pl.col("event").is_in(["thumbs_up", "thumbs_down"]))
              .group_by("domain").agg(down=(pl.col("event") == "thumbs_down").mean(), n=pl.len()))
    rate = dict(zip(thumbs["domain"], thumbs["down"]))
    n = dict(zip(thumbs["domain"], thumbs["n"]))
    for dom, expected in (("cards", NOISE), ("loans", 1 - NOISE)):
        tol = 4 * np.sqrt(NOISE * (1 - NOISE) / n[dom])  # four binomial standard errors
        assert abs(rate[dom] - expected) < tol, (dom, rate[dom], n[dom])


@pytest.mark.slow
def test_the_plan_ranks_the_failing_domain_first(v1_world):
    w, cfg = v1_world["w"], v1_world["cfg"]
    plan = prioritize(w / "v1.duckdb", cfg, w / "plan-check.json").plan
    assert plan.domains[0].domain == "loans"
    fail = {d.domain: d.failure for d in plan.domains}
    assert fail["loans"] > 0.8 > 0.2 > fail["cards"]


@pytest.mark.slow
def test_v2_starts_from_v1s_adapter_and_is_audited_against_v1(v1_world):
    w, cfg = v1_world["w"], v1_world["cfg"]
    # lr 1e-12 (two Adam steps move a weight by ~2e-12): v2's adapter can only equal v1's to 1e-9 if it was
    # loaded from it -- a fresh LoRA has B = 0, and v1's B is far from 0.
    frozen = load_config(ROOT / "configs/tiny.yaml", ["train.max_steps=2", "train.lr=1e-12", "train.weight_decay=0",
                                                      "train.eval_every=2", "train.checkpoint_every=2"])
    res = run_loop(w / "v1.duckdb", w / "v1", w / "loop0", frozen, report=False, echo=lambda _: None)
    v1_w = load_file(w / "v1/adapter/adapter_model.safetensors")
    v2_w = load_file(res.v2 / "adapter/adapter_model.safetensors")
    assert set(v1_w) == set(v2_w)
    assert any(k.endswith("lora_B.weight") and v1_w[k].abs().max() > 1e-3 for k in v1_w)
    for k in v1_w:
        assert torch.allclose(v1_w[k], v2_w[k], rtol=0, atol=1e-9), k
    man = json.loads((res.v2 / "manifest.json").read_text())
    v1_man = json.loads((w / "v1/manifest.json").read_text())
    assert Path(man["init_adapter"]) == w / "v1/adapter" and man["layers"] == v1_man["layers"]
    ev = res.eval_data
    assert ev["baseline"] == str(w / "v1") and ev["finetuned_model"] == str(res.v2)
    # The same weights to 1e-9, so the same answers: every paired delta is zero and nothing is flagged.
    assert ev["deltas"] and all(d["delta"] == 0 for d in ev["deltas"] + ev["domain_deltas"])
    assert not ev["flags"] and not ev["domain_flags"]


@pytest.mark.slow
def test_a_trained_v2_fixes_the_failing_domain_and_the_report_shows_v1_to_v2(v1_world):
    w, cfg = v1_world["w"], v1_world["cfg"]
    res = run_loop(w / "v1.duckdb", w / "v1", w / "loop1", cfg, echo=lambda _: None)
    ev = res.eval_data
    acc = {(m["model"], m["domain"]): m["value"] for m in ev["metrics"] if m["scope"] == "domain"}
    assert acc[(str(w / "v1"), "loans")] == 0.0
    assert acc[(str(res.v2), "loans")] > 0.5  # the plan's draws went where v1 failed
    loans = next(d for d in ev["domain_deltas"] if d["domain"] == "loans")
    assert loans["ci_low"] > 0
    assert any(line.startswith("Where v1 failed") and "loans" in line for line in res.summary)
    md = res.report.with_suffix(".md").read_text()
    assert "v1 → v2: what the loop fixed" in md


def test_loop_cli_refuses_a_v1_that_is_not_a_run(tmp_path):
    result = CliRunner().invoke(cli, ["loop", "--store", str(tmp_path / "s.duckdb"), "--v1", str(tmp_path),
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "not a train RUN folder" in result.output


def test_responder_that_cannot_load_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="no such RUN folder"):
        ModelResponder(str(tmp_path / "missing"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="cannot be loaded"):
        ModelResponder(str(tmp_path / "junk"))
