"""Schema of the store as ordered, named migrations (the sqlite-utils / llm pattern).

Each migration runs once, inside the transaction that records it in ``schema_migrations``, so a store
written by an older adaptive-ft opens in a newer one: the missing migrations are applied in order.
Never edit a released migration; append a new one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    """One schema step: ``version`` orders them, ``name`` says what it does, ``sql`` does it."""

    version: int
    name: str
    sql: str


# events.event_id is unique, but enforced by ingest rather than a PRIMARY KEY: the staged path anti-joins
# against the store and de-duplicates within the batch; the clean-file fast path skips the anti-join only
# when the store has no events, and is kept only if a distinct count shows every id once (else it rolls
# back to the staged path). Building DuckDB's ART index costs ~6.7 s per million rows on this machine
# against 0.4 s for the anti-join, which would put bulk ingest far below the bare-load target
# (see benchmarks/ingest.py).
_INITIAL = """
CREATE TABLE events (
    event_id VARCHAR NOT NULL, ts TIMESTAMP NOT NULL, user_id VARCHAR NOT NULL, segment VARCHAR,
    example_id VARCHAR NOT NULL, domain VARCHAR, event VARCHAR NOT NULL, value DOUBLE,
    model_version VARCHAR, response VARCHAR, batch_id BIGINT NOT NULL
);
CREATE TABLE examples (
    example_id VARCHAR PRIMARY KEY, domain VARCHAR, prompt VARCHAR, reference VARCHAR, first_batch BIGINT
);
CREATE TABLE users (user_id VARCHAR PRIMARY KEY, segment VARCHAR, attributes JSON);
CREATE TABLE batches (
    batch_id BIGINT PRIMARY KEY, source VARCHAR, format VARCHAR, sha256 VARCHAR,
    rows_ok BIGINT, rows_duplicate BIGINT, rows_rejected BIGINT,
    started_at TIMESTAMP, finished_at TIMESTAMP, seconds DOUBLE
);
CREATE TABLE rejected (batch_id BIGINT, line BIGINT, raw VARCHAR, reason VARCHAR);
"""

_BATCH_DETAILS = """
ALTER TABLE batches ADD COLUMN rows_skipped BIGINT DEFAULT 0;
ALTER TABLE batches ADD COLUMN bytes BIGINT;
"""

# line: the record's line (row, for Parquet) in its batch's file, so an event can be traced to its source and
# ingest can find the lines its direct pass did not take. NULL for events stored before this migration.
_EVENT_LINE = "ALTER TABLE events ADD COLUMN line BIGINT;"

MIGRATIONS: list[Migration] = [
    Migration(1, "initial", _INITIAL),
    # rows_skipped: review rows without a rating; bytes: input size, for events/s and MB/s in stats.
    Migration(2, "batch_skipped_rows_and_bytes", _BATCH_DETAILS),
    Migration(3, "event_line", _EVENT_LINE),
]
