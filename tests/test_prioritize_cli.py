"""prioritize end to end through the store and the CLI: simulate -> ingest -> prioritize -> plan show."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from adaptive_ft.artifacts.plan import Plan
from adaptive_ft.cli import cli
from adaptive_ft.config import Config
from adaptive_ft.errors import InputError
from adaptive_ft.prioritize import prioritize


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sim_store(tmp_path_factory) -> tuple[Path, dict]:
    from adaptive_ft.simulate import simulate
    from adaptive_ft.store import ingest

    work = tmp_path_factory.mktemp("sim")
    cfg = Config()
    cfg.simulate.users, cfg.simulate.events = 300, 12_000
    sim = simulate(cfg.simulate, work / "logs.jsonl", seed=0)
    ingest([sim.log_path], work / "s.duckdb")
    return work / "s.duckdb", json.loads(sim.truth_path.read_text())


def test_cli_writes_a_plan_that_plan_show_explains(sim_store, tmp_path):
    store, truth = sim_store
    out = tmp_path / "plan.json"
    res = CliRunner().invoke(cli, ["prioritize", "--store", str(store), "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    plan = Plan.load(out)
    assert set(plan.domain_names[:3]) == set(truth["top_domains"][:3])
    assert plan.example_weights()["weight"].sum() == pytest.approx(1.0)
    assert plan.recommender["model"]["overall"]["users"] > 0
    assert len(plan.inputs["store"]) == 64 and plan.inputs["seed"] == 0
    show = CliRunner().invoke(cli, ["plan", "show", str(out)])
    assert show.exit_code == 0
    first = show.output.splitlines()[1]
    assert plan.domain_names[0] in first and "users drive" in first  # one-line why per domain
    assert "NDCG@10" in show.output


def test_same_store_config_and_seed_give_the_same_plan(sim_store, tmp_path):
    store, _ = sim_store
    a = json.loads(prioritize(store, Config(), tmp_path / "a.json").path.read_text())
    b = json.loads(prioritize(store, Config(), tmp_path / "b.json").path.read_text())
    a.pop("created"), b.pop("created")
    assert a == b
    c = json.loads(prioritize(store, Config(seed=1), tmp_path / "c.json").path.read_text())
    assert c["inputs"]["seed"] == 1 and c["inputs"]["store"] == a["inputs"]["store"]


def test_empty_store_is_refused_with_what_to_do(tmp_path):
    from adaptive_ft.store import Store

    Store.open(tmp_path / "empty.duckdb").close()
    res = CliRunner().invoke(cli, ["prioritize", "--store", str(tmp_path / "empty.duckdb"), "--out", str(tmp_path / "p.json")])
    assert res.exit_code == 1
    assert "no events" in res.output and "adaptive-ft ingest" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "p.json").exists()


def test_missing_store_is_refused(tmp_path):
    with pytest.raises(InputError, match="store not found"):
        prioritize(tmp_path / "nope.duckdb", Config(), tmp_path / "p.json")


def _rows(n_users: int, segment_of=lambda u: "free") -> list[dict]:
    rows = []
    for u in range(n_users):
        for e in range(4):
            base = {"ts": f"2025-01-0{1 + e}T10:00:0{u % 10}Z", "user_id": f"u{u}", "segment": segment_of(u),
                    "example_id": f"x{e}", "domain": "cards" if e < 2 else "fx", "prompt": f"question {e}"}
            rows.append({**base, "event": "impression"})
            rows.append({**base, "event": "thumbs_down" if (u + e) % 3 == 0 else "thumbs_up"})
    return rows


def test_segment_with_users_but_no_events_gets_zero_weight_and_a_note(tmp_path):
    from adaptive_ft.store import ingest

    log = _write_jsonl(tmp_path / "log.jsonl", _rows(6))
    users = tmp_path / "users.csv"
    users.write_text("user_id,segment\nghost1,enterprise\n")
    ingest([log], tmp_path / "s.duckdb", users=users)
    cfg = Config()
    cfg.prioritize.factors = 2
    res = prioritize(tmp_path / "s.duckdb", cfg, tmp_path / "p.json")
    seg = {s["segment"]: s for s in res.plan.segments}
    assert seg["enterprise"]["weight"] == 0.0 and seg["free"]["weight"] == pytest.approx(1.0)
    assert any("enterprise" in n and "no events" in n for n in res.notes)
    assert "NaN" not in (tmp_path / "p.json").read_text()
    # asking for weight on it is an error, not a silent zero
    cfg.prioritize.segment_weights = {"free": 1.0, "enterprise": 1.0}
    with pytest.raises(InputError, match="enterprise"):
        prioritize(tmp_path / "s.duckdb", cfg, tmp_path / "p2.json")


def test_one_user_through_the_store(tmp_path):
    from adaptive_ft.store import ingest

    ingest([_write_jsonl(tmp_path / "log.jsonl", _rows(1))], tmp_path / "s.duckdb")
    res = CliRunner().invoke(cli, ["prioritize", "--store", str(tmp_path / "s.duckdb"), "--out", str(tmp_path / "p.json")])
    assert res.exit_code == 1 and "at least 2 users" in res.output


def test_no_negative_feedback_through_the_store(tmp_path):
    from adaptive_ft.store import ingest

    rows = [r for r in _rows(5) if r["event"] != "thumbs_down"]
    ingest([_write_jsonl(tmp_path / "log.jsonl", rows)], tmp_path / "s.duckdb")
    args = ["prioritize", "--store", str(tmp_path / "s.duckdb"), "--out", str(tmp_path / "p.json"), "--quiet"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and "no negative feedback" in res.output
    res = CliRunner().invoke(cli, args + ["prioritize.no_feedback=demand", "prioritize.factors=2"])
    assert res.exit_code == 0, res.output
    assert "NaN" not in (tmp_path / "p.json").read_text()


def test_warmup_layer_probe_through_the_cli(sim_store, tmp_path):
    """`layer_probe=warmup` end to end on a tiny model: every cell measured, the method recorded, plan show says so."""
    import torch

    from adaptive_ft.lm.models import build_tiny_model

    torch.set_num_threads(1)
    store, _ = sim_store
    model = build_tiny_model(tmp_path / "tiny", texts=["how do I reset my card pin", "my parcel never arrived"],
                             n_layers=3, hidden=32)
    out = tmp_path / "plan.json"
    res = CliRunner().invoke(cli, ["prioritize", "--store", str(store), "--out", str(out), "--model", str(model),
                                   "--quiet", "prioritize.layer_probe=warmup", "prioritize.probe_steps=3",
                                   "prioritize.layer_domains=2", "prioritize.probe_examples=4",
                                   "prioritize.layers_k=2", "prioritize.layer_cost_weight=0", "train.batch_size=4"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    plan = Plan.load(out)
    matrix = plan.extra["layer_matrix"]
    assert matrix["method"] == "warmup" and len(matrix["domains"]) == 2
    assert all(all(row) for row in matrix["measured"]) and len(matrix["values"][0]) == 3
    assert len(plan.layers.selected) == 2 and all(s["measured"] for s in plan.layers.scores)
    show = CliRunner().invoke(cli, ["plan", "show", str(out)])
    assert "every cell measured" in show.output and "partly completed" not in show.output
