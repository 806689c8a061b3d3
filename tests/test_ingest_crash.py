"""A kill -9 in the middle of an ingest leaves the store exactly as it was before that batch."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from adaptive_ft.store import Store, ingest
from store_helpers import rec, write_jsonl

# The child names each stage as it enters it. At "commit" (the batch is written, COMMIT not yet sent) it waits
# for a line on stdin that the test never sends: however fast or slow the machine, the child is still alive
# and its transaction still open when the test kills it after seeing `kill_at` (no sleep, no race).
_DRIVER = """
import sys
from adaptive_ft.store import ingest
def hook(src, stage):
    print(stage, flush=True)
    if stage == "commit":
        sys.stdin.readline()
ingest([sys.argv[1]], sys.argv[2], on_stage=hook)
print("finished", flush=True)
"""


def _big_log(path: Path, n: int, dirty: bool = False) -> Path:
    """n events; dirty: every 1000th repeats the id 10 lines before it and every 5000th has an unknown event
    type, so the careful pass has work inside the same transaction."""
    i = pl.col("i")
    pl.DataFrame({"i": pl.int_range(0, n, eager=True)}).select(
        event_id="big-" + pl.when((i % 1000 == 999) & dirty).then(i - 10).otherwise(i).cast(pl.Utf8),
        ts=pl.lit("2024-04-01T00:00:00Z"), user_id="u" + (i % 997).cast(pl.Utf8), segment=pl.lit("pro"),
        example_id="x" + (i % 5000).cast(pl.Utf8), domain=pl.lit("billing"), prompt="question " + (i % 5000).cast(pl.Utf8),
        event=pl.when((i % 5000 == 17) & dirty).then(pl.lit("purchase")).otherwise(pl.lit("click")),
    ).write_ndjson(path)
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
@pytest.mark.parametrize("dirty", [False, True], ids=["clean", "dirty"])
@pytest.mark.parametrize("kill_at", ["read + validate", "write", "commit"])
def test_kill_9_mid_ingest_leaves_the_store_as_before(tmp_path: Path, kill_at: str, dirty: bool):
    db = tmp_path / "s.duckdb"
    ingest([write_jsonl(tmp_path / "first.jsonl", [rec(i) for i in range(40)] + ["{broken"])], db)
    before = _snapshot(db)
    assert before == ([(1, 40)], [(1, 40)], 5, 7, 1)
    big = _big_log(tmp_path / "big.jsonl", 400_000, dirty)
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(big), str(db)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    stages = []
    for line in proc.stdout:  # the kill lands as the child starts that stage's statement (or waits at commit)
        stages.append(line.strip())
        if stages[-1] == kill_at:
            break
    assert stages[-1] == kill_at and "finished" not in stages, stages
    assert proc.poll() is None  # it cannot finish: it waits at "commit" for a line it is never sent
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdin.close()
    assert proc.returncode == -signal.SIGKILL
    assert _snapshot(db) == before
    # and the store works: the same file goes in completely afterwards
    f = ingest([big], db).files[0]
    ok = 400_000 - 480 * dirty  # a repeated id comes with another user_id: a conflict; 80 unknown events
    assert (f.batch_id, f.rows_ok, f.rows_rejected) == (2, ok, 480 * dirty)
    assert _snapshot(db)[1] == [(1, 40), (2, ok)]
