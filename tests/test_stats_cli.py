"""The ingest and stats commands: exit codes, messages, store resolution, table and JSON output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from store_helpers import rec, write_jsonl

from adaptive_ft.cli import cli


def _run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, list(args), env=env)


@pytest.fixture
def logs(tmp_path: Path) -> dict[str, Path]:
    good = write_jsonl(tmp_path / "good.jsonl", [rec(i) for i in range(6)])
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [rec(10), "{oops", rec(12, event="nope"), rec(13)])
    return {"good": good, "mixed": mixed}


def test_ingest_prints_a_summary_and_stats_shows_the_table(tmp_path: Path, logs: dict[str, Path]):
    db = str(tmp_path / "s.duckdb")
    r = _run("ingest", str(logs["good"]), str(logs["mixed"]), "--store", db)
    assert r.exit_code == 0, r.output
    assert "8 ok, 0 duplicate, 2 rejected in " in r.output and "events/s" in r.output
    r = _run("stats", "--store", db)
    assert r.exit_code == 0, r.output
    out = r.output
    assert "events    8\n" in out and "users     7\n" in out and "examples  5\n" in out
    assert "time      2024-03-01T10:00:00 .. 2024-03-01T10:00:13" in out
    # rec(i): segment free/pro by parity, domain billing/cards by (i % 5) parity, event by i % 3
    assert "segment  domain   click  impression  thumbs_down  total" in out
    assert "rejected  2" in out and "malformed JSON" in out and "unknown event type: nope" in out


def test_stats_json_has_exact_counts(tmp_path: Path, logs: dict[str, Path]):
    db = str(tmp_path / "s.duckdb")
    _run("ingest", str(logs["good"]), "--store", db)
    s = json.loads(_run("stats", "--store", db, "--json").output)
    assert (s["events"], s["users"], s["examples"], s["rejected"]["total"]) == (6, 6, 5, 0)
    cells = {(c["segment"], c["domain"], c["event"]): c["n"] for c in s["counts"]}
    # i=0..5: (free,billing,impression) (pro,cards,click) (free,billing,thumbs_down) (pro,cards,impression)
    #         (free,billing,click) (pro,billing,thumbs_down)
    assert cells == {("free", "billing", "impression"): 1, ("pro", "cards", "click"): 1,
                     ("free", "billing", "thumbs_down"): 1, ("pro", "cards", "impression"): 1,
                     ("free", "billing", "click"): 1, ("pro", "billing", "thumbs_down"): 1}
    assert [b["rows_ok"] for b in s["batches"]] == [6]


def test_strict_fails_when_anything_was_rejected_but_keeps_the_good_records(tmp_path: Path, logs: dict[str, Path]):
    db = str(tmp_path / "s.duckdb")
    r = _run("ingest", str(logs["mixed"]), "--store", db, "--strict")
    assert r.exit_code == 1 and "--strict: 2 record(s) rejected" in r.output
    assert json.loads(_run("stats", "--store", db, "--json").output)["events"] == 2


def test_nothing_readable_exits_non_zero_with_the_reason(tmp_path: Path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = _run("ingest", str(empty), str(tmp_path / "missing.csv"), "--store", str(tmp_path / "s.duckdb"))
    assert r.exit_code == 1
    assert "Error: nothing could be ingested" in r.output and "empty file" in r.output and "no such file" in r.output
    assert "Traceback" not in r.output


def test_store_comes_from_flag_then_env_then_working_directory(tmp_path: Path, logs: dict[str, Path],
                                                             monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ADAPTIVE_FT_STORE", raising=False)
    assert _run("ingest", str(logs["good"])).exit_code == 0
    assert (tmp_path / "adaptive_ft.duckdb").exists()
    env_db = tmp_path / "env.duckdb"
    assert _run("ingest", str(logs["mixed"]), env={"ADAPTIVE_FT_STORE": str(env_db)}).exit_code == 0
    flag_db = tmp_path / "flag.duckdb"
    r = _run("ingest", str(logs["good"]), "--store", str(flag_db), env={"ADAPTIVE_FT_STORE": str(env_db)})
    assert r.exit_code == 0 and flag_db.exists()
    counts = {p.name: json.loads(_run("stats", "--store", str(p), "--json").output)["events"]
              for p in (tmp_path / "adaptive_ft.duckdb", env_db, flag_db)}
    assert counts == {"adaptive_ft.duckdb": 6, "env.duckdb": 2, "flag.duckdb": 6}


def test_stats_on_a_missing_store_says_how_to_make_one(tmp_path: Path):
    r = _run("stats", "--store", str(tmp_path / "none.duckdb"))
    assert r.exit_code == 1 and "no store at" in r.output and "adaptive-ft ingest" in r.output


def test_a_locked_store_gives_one_line_naming_the_holder(tmp_path: Path, logs: dict[str, Path]):
    db = tmp_path / "s.duckdb"
    code = "import sys, time\nfrom adaptive_ft.store import Store\ns = Store.open(sys.argv[1])\nprint('ready', flush=True)\ntime.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        r = _run("ingest", str(logs["good"]), "--store", str(db))
    finally:
        holder.kill()
        holder.wait()
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and f"locked by process {holder.pid} " in lines[0] and "Traceback" not in r.output


def test_users_file_sets_segments(tmp_path: Path, logs: dict[str, Path]):
    users = tmp_path / "users.jsonl"
    users.write_text('{"user_id": "u0", "segment": "enterprise", "plan_seats": 50}\n')
    db = str(tmp_path / "s.duckdb")
    r = _run("ingest", str(logs["good"]), "--users", str(users), "--store", db)
    assert r.exit_code == 0 and "users: 1 users loaded" in r.output
    s = json.loads(_run("stats", "--store", db, "--json").output)
    # u0's event says "free": the event's own segment wins over the users table (contracts.md)
    assert {c["segment"] for c in s["counts"]} == {"free", "pro"}
    from adaptive_ft.store import Store
    with Store.open(db, read_only=True) as st:
        assert dict(st.users().rows())["u0"] == "enterprise"
        assert json.loads(st.sql("SELECT attributes FROM users WHERE user_id = 'u0'").item()) == {"plan_seats": 50}
