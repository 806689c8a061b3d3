"""A kill -9 in the middle of an ingest leaves the store exactly as it was before that batch."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from adaptive_ft.store import Store, ingest
from store_helpers import rec, write_jsonl

_DRIVER = """
import sys
from adaptive_ft.store import ingest
def hook(src, stage):
    print(stage, flush=True)
ingest([sys.argv[1]], sys.argv[2], on_stage=hook)
print("finished", flush=True)
"""


def _big_log(path: Path, n: int) -> Path:
    i = pl.int_range(0, n, eager=True)
    pl.DataFrame({
        "event_id": "big-" + i.cast(pl.Utf8), "ts": "2024-04-01T00:00:00Z", "user_id": "u" + (i % 997).cast(pl.Utf8),
        "segment": "pro", "example_id": "x" + (i % 5000).cast(pl.Utf8), "domain": "billing",
        "prompt": "question " + (i % 5000).cast(pl.Utf8), "event": "click",
    }).write_ndjson(path)
    return path


def _snapshot(db: Path) -> tuple:
    with Store.open(db) as s:  # a writable open: replays whatever the killed process left
        return (
            s.sql("SELECT batch_id, rows_ok FROM batches ORDER BY batch_id").rows(),
            s.sql("SELECT batch_id, count(*) FROM events GROUP BY ALL ORDER BY 1").rows(),
            s.sql("SELECT count(*) FROM examples").item(), s.sql("SELECT count(*) FROM users").item(),
            s.sql("SELECT count(*) FROM rejected").item(),
        )


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["read + validate", "write"])
def test_kill_9_mid_ingest_leaves_the_store_as_before(tmp_path: Path, kill_at: str):
    db = tmp_path / "s.duckdb"
    ingest([write_jsonl(tmp_path / "first.jsonl", [rec(i) for i in range(40)] + ["{broken"])], db)
    before = _snapshot(db)
    assert before == ([(1, 40)], [(1, 40)], 5, 7, 1)
    big = _big_log(tmp_path / "big.jsonl", 400_000)
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(big), str(db)], stdout=subprocess.PIPE, text=True)
    stages = []
    for line in proc.stdout:
        stages.append(line.strip())
        if stages[-1] == kill_at:
            break
    time.sleep(0.3)  # into the staging query / the events insert
    assert proc.poll() is None, f"ingest finished before the kill (stages seen: {stages})"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert _snapshot(db) == before
    # and the store works: the same file goes in completely afterwards
    f = ingest([big], db).files[0]
    assert (f.batch_id, f.rows_ok, f.rows_rejected) == (2, 400_000, 0)
    assert _snapshot(db)[1] == [(1, 40), (2, 400_000)]
