"""The ingest command's answers: exit codes with missing files, positional settings, repeated all-rejected
files, the store path, and the messages for files that are not what they seem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from adaptive_ft.cli import cli
from adaptive_ft.store import Store
from store_helpers import rec, write_jsonl


def _run(*args: str):
    return CliRunner().invoke(cli, list(args))


def _events(db: Path) -> int:
    with Store.open(db, read_only=True) as s:
        return s.sql("SELECT count(*) FROM events").item()


@pytest.mark.parametrize("strict", [False, True])
def test_a_missing_file_among_good_ones_exits_non_zero_after_ingesting_the_good_ones(tmp_path: Path, strict: bool):
    good = write_jsonl(tmp_path / "good.jsonl", [rec(i) for i in range(4)])
    db = tmp_path / "s.duckdb"
    r = _run("ingest", str(tmp_path / "nope.jsonl"), str(good), "--store", str(db), *(["--strict"] if strict else []))
    assert r.exit_code == 1, r.output
    assert "Error: 1 of 2 file(s) could not be read (the others were ingested): " in r.output
    assert "nope.jsonl: no such file" in r.output and "Traceback" not in r.output
    assert _events(db) == 4


def test_settings_go_after_the_paths_as_in_every_command_and_set_still_works(tmp_path: Path):
    log = write_jsonl(tmp_path / "logs.jsonl", [rec(1), rec(2, prompt="a prompt much longer than thirty characters")])
    for i, args in enumerate([("ingest.max_field_chars=30",), ("--set", "max_field_chars=30"),
                              ("--set", "ingest.max_field_chars=30")]):
        db = tmp_path / f"s{i}.duckdb"
        r = _run("ingest", str(log), *args, "--store", str(db))
        assert r.exit_code == 0, r.output
        assert "1 ok, 0 duplicate, 1 rejected" in r.output, args
    r = _run("ingest", str(log), "ingest.no_such_key=1", "--store", str(tmp_path / "x.duckdb"))
    assert r.exit_code != 0 and "no_such_key" in r.output and "Traceback" not in r.output


def test_an_all_rejected_file_fails_the_same_way_every_time(tmp_path: Path):
    log = write_jsonl(tmp_path / "bad.jsonl", [rec(i, event="purchase") for i in range(3)])
    db = tmp_path / "s.duckdb"
    first = _run("ingest", str(log), "--store", str(db))
    second = _run("ingest", str(log), "--store", str(db))
    assert (first.exit_code, second.exit_code) == (1, 1), second.output
    assert "every record was rejected" in first.output and "every record was rejected" in second.output
    assert "already ingested as batch 1" in second.output
    with Store.open(db, read_only=True) as s:
        assert s.sql("SELECT count(*) FROM rejected").item() == 3


def test_store_pointing_at_a_log_is_an_error_and_the_log_is_untouched(tmp_path: Path):
    logs = write_jsonl(tmp_path / "logs.jsonl", [rec(1)])
    other = write_jsonl(tmp_path / "other.jsonl", [rec(2)])
    before = logs.read_bytes()
    r = _run("ingest", "--store", str(logs), str(other))
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"store {logs} exists and is not a DuckDB database" in r.output
    assert logs.read_bytes() == before


def test_a_failed_ingest_leaves_no_store_file(tmp_path: Path):
    db = tmp_path / "s.duckdb"
    r = _run("ingest", str(tmp_path / "nope.jsonl"), "--store", str(db))
    assert r.exit_code == 1 and "nothing could be ingested" in r.output
    assert not db.exists()


@pytest.mark.parametrize("name,content,message", [
    ("utf16.jsonl", "\ufeff" + json.dumps(rec(1)) + "\n", "UTF-16LE text, not UTF-8; convert it to UTF-8"),
    ("header.csv", "event_id,ts,user_id,event\n", "a CSV header (event_id,ts,user_id,event) and no records"),
    ("semi.csv", "event_id;ts;user_id;event\ne1;2024-03-01T10:00:00Z;u1;click\n",
     "the header is separated by ';'"),
])
def test_files_that_are_not_what_they_seem_get_a_message_that_says_what_they_are(
        tmp_path: Path, name: str, content: str, message: str):
    path = tmp_path / name
    path.write_bytes(content.encode("utf-16") if name.startswith("utf16") else content.encode())
    r = _run("ingest", str(path), "--store", str(tmp_path / "s.duckdb"))
    assert r.exit_code == 1 and message in r.output, r.output
    assert "binary data" not in r.output and "every record was rejected" not in r.output
    assert "missing required field" not in r.output
