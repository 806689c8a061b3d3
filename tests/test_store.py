"""The store itself: opening, path resolution, migrations, the one-writer lock, and the read API."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from adaptive_ft.errors import StoreError, StoreLockedError
from adaptive_ft.store import MIGRATIONS, Migration, Store, ingest, resolve_store_path
from store_helpers import rec, write_jsonl


def test_store_path_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("ADAPTIVE_FT_STORE", raising=False)
    assert resolve_store_path(None) == Path("adaptive_ft.duckdb")
    monkeypatch.setenv("ADAPTIVE_FT_STORE", str(tmp_path / "env.duckdb"))
    assert resolve_store_path(None) == tmp_path / "env.duckdb"
    assert resolve_store_path(tmp_path / "flag.duckdb") == tmp_path / "flag.duckdb"


def test_new_store_has_every_table_and_migration_recorded(tmp_path: Path):
    with Store.open(tmp_path / "s.duckdb") as s:
        tables = set(s.sql("SELECT table_name FROM duckdb_tables()")["table_name"])
        migrations = s.sql("SELECT version, name FROM schema_migrations ORDER BY version")
    assert {"events", "examples", "users", "batches", "rejected", "schema_migrations"} <= tables
    assert migrations.rows() == [(m.version, m.name) for m in MIGRATIONS]


def test_old_store_opens_in_a_newer_version(tmp_path: Path):
    """A store written with only migration 1 gains the later ones (and a new one) and keeps its data."""
    db = tmp_path / "old.duckdb"
    with Store.open(db, migrations=MIGRATIONS[:1]) as s:
        assert s.schema_version() == 1
        assert "rows_skipped" not in s.sql("SELECT * FROM batches").columns
        s.con.execute("INSERT INTO users VALUES ('u1', 'pro', NULL)")
    newer = [*MIGRATIONS, Migration(MIGRATIONS[-1].version + 1, "users_country", "ALTER TABLE users ADD COLUMN country VARCHAR")]
    # a reader first: it migrates through a short writable open, then reads
    with Store.open(db, read_only=True, migrations=newer) as s:
        assert s.schema_version() == newer[-1].version
        assert s.users().rows() == [("u1", "pro")]
        assert "country" in s.sql("SELECT * FROM users").columns
        assert "rows_skipped" in s.sql("SELECT * FROM batches").columns
        names = s.sql("SELECT name FROM schema_migrations ORDER BY version")["name"].to_list()
    assert names == [m.name for m in newer]


def test_store_newer_than_the_code_is_refused(tmp_path: Path):
    db = tmp_path / "s.duckdb"
    newer = [*MIGRATIONS, Migration(99, "future", "CREATE TABLE future (a INT)")]
    Store.open(db, migrations=newer).close()
    with pytest.raises(StoreError, match="schema version 99, newer than this adaptive-ft knows"):
        Store.open(db)


def test_read_only_open_of_a_missing_store_says_how_to_create_it(tmp_path: Path):
    with pytest.raises(StoreError, match="no store at .*adaptive-ft ingest"):
        Store.open(tmp_path / "nope.duckdb", read_only=True)


_HOLDER = """
import sys, time
from adaptive_ft.store import Store
s = Store.open(sys.argv[1])
print("ready", flush=True)
time.sleep(60)
"""


def test_second_writer_gets_a_one_line_error_naming_the_holder(tmp_path: Path):
    db = tmp_path / "s.duckdb"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLockedError) as err:
            Store.open(db)
        msg = str(err.value)
        assert f"process {holder.pid} " in msg and "wait for it to finish" in msg and "\n" not in msg
        with pytest.raises(StoreLockedError, match=f"process {holder.pid} "):
            Store.open(db, read_only=True)  # DuckDB lets no reader in beside a writer process
    finally:
        holder.kill()
        holder.wait()
    with Store.open(db, read_only=True) as s:  # once the writer is gone, readers get in
        assert s.schema_version() == MIGRATIONS[-1].version


def test_read_api_joins_segment_from_users_and_domain_from_examples(tmp_path: Path):
    log = write_jsonl(tmp_path / "a.jsonl", [
        rec(1, segment="pro", domain="billing", example_id="x1", prompt="p1"),
        rec(2, user_id="u9", segment=None, example_id="x1", domain=None, prompt=None, event="click"),
        rec(3, user_id="u8", segment=None, example_id="x2", domain="cards", prompt="p2", event="click"),
    ])
    users = tmp_path / "users.csv"
    users.write_text("user_id,segment,country\nu9,enterprise,FR\n")
    db = tmp_path / "s.duckdb"
    ingest([log], db, users=users)
    with Store.open(db, read_only=True) as s:
        ev = s.events().sort("event_id")
        counts = s.segment_domain_counts()
        attrs = s.sql("SELECT attributes FROM users WHERE user_id = 'u9'").item()
        users_df = s.users()
    assert ev.select("user_id", "segment", "domain").rows() == [
        ("u1", "pro", "billing"), ("u9", "enterprise", "billing"), ("u8", "unknown", "cards")]
    assert counts.sort("segment").rows() == [
        ("enterprise", "billing", "click", 1), ("pro", "billing", "click", 1), ("unknown", "cards", "click", 1)]
    assert '"country":"FR"' in attrs.replace(" ", "")
    assert set(users_df.rows()) == {("u1", "pro"), ("u9", "enterprise"), ("u8", "unknown")}
    assert isinstance(ev, pl.DataFrame) and ev.columns == [
        "event_id", "ts", "user_id", "segment", "example_id", "domain", "event", "value", "model_version"]


def test_fingerprint_changes_with_new_data_only(tmp_path: Path):
    db = tmp_path / "s.duckdb"
    a = write_jsonl(tmp_path / "a.jsonl", [rec(i) for i in range(10)])
    ingest([a], db)
    with Store.open(db, read_only=True) as s:
        f1 = s.fingerprint()
    ingest([a], db, force=True)  # re-read: adds nothing
    with Store.open(db, read_only=True) as s:
        assert s.fingerprint() == f1
    ingest([write_jsonl(tmp_path / "b.jsonl", [rec(i) for i in range(10, 12)])], db)
    with Store.open(db, read_only=True) as s:
        assert s.fingerprint() != f1


def test_opening_writable_and_read_only_in_one_process_is_explained(tmp_path: Path):
    db = tmp_path / "s.duckdb"
    with Store.open(db):
        with pytest.raises(StoreError, match="already open in this process for writing; close that Store"):
            Store.open(db, read_only=True)
    (tmp_path / "notes.duckdb").write_text("not a database")
    with pytest.raises(StoreError, match="exists and is not a DuckDB database"):
        Store.open(tmp_path / "notes.duckdb")
