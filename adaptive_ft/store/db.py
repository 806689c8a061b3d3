"""The DuckDB file behind adaptive-ft: opening (with locking and migrations) and the Polars read API."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import duckdb
import polars as pl

from adaptive_ft.errors import StoreError, StoreLockedError
from adaptive_ft.store.migrations import MIGRATIONS, Migration

DEFAULT_STORE = "adaptive_ft.duckdb"
STORE_ENV = "ADAPTIVE_FT_STORE"

_LOCK_RE = re.compile(r"Conflicting lock is held in (?P<prog>.*?) \(PID (?P<pid>\d+)\)")


def resolve_store_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The store file: ``path`` if given, else ``$ADAPTIVE_FT_STORE``, else ``adaptive_ft.duckdb`` here."""
    if path:
        return Path(path)
    return Path(os.environ.get(STORE_ENV) or DEFAULT_STORE)


def _lock_message(path: Path, err: Exception) -> str:
    """A one-line explanation of DuckDB's lock conflict, naming the process that holds the file."""
    m = _LOCK_RE.search(str(err))
    holder = f"process {m['pid']} ({Path(m['prog']).name})" if m else "another process"
    return (
        f"store {path} is locked by {holder}, which has it open for writing; wait for it to finish "
        f"(or stop it: kill {m['pid'] if m else '<pid>'}), then retry. DuckDB allows one writing process "
        "and no readers beside it"
    )


def _check_is_duckdb(path: Path) -> None:
    """A store path must be a DuckDB file or not exist: DuckDB would open, say, a .jsonl given as the store
    as an in-memory database, so an ingest would store nothing and report success."""
    if not path.exists():
        return
    if path.is_dir():
        raise StoreError(f"store {path} is a directory; pass a file path, e.g. --store {path / DEFAULT_STORE}")
    with open(path, "rb") as f:
        head = f.read(12)
    if head[8:12] != b"DUCK":
        what = "an empty file" if not head else "not a DuckDB database"
        raise StoreError(
            f"store {path} exists and is {what}; --store takes a DuckDB file written by adaptive-ft "
            "or a path that does not exist yet (a log to ingest goes before the options, without --store)"
        )


def _connect(path: Path, read_only: bool, config: dict[str, Any]) -> duckdb.DuckDBPyConnection:
    _check_is_duckdb(path)
    try:
        con = duckdb.connect(str(path), read_only=read_only, config=config)
        # Naive ISO timestamps in logs mean UTC, whatever the machine's zone (set after connecting:
        # the ICU extension that owns this setting loads with the first connection).
        con.execute("SET TimeZone = 'UTC'")
        # DuckDB's own progress bar would write into our output (the CLI draws its own per stage)
        con.execute("SET enable_progress_bar = false")
        return con
    except duckdb.IOException as e:
        if "Could not set lock" in str(e):
            raise StoreLockedError(_lock_message(path, e)) from None
        raise StoreError(f"cannot open store {path}: {e}") from None
    except duckdb.Error as e:
        if "different configuration" in str(e):
            raise StoreError(
                f"store {path} is already open in this process {'for writing' if read_only else 'read-only'}; "
                "close that Store (leave its `with` block) before opening it again"
            ) from None
        raise StoreError(f"cannot open store {path}: {e}; is it a DuckDB file written by adaptive-ft?") from None


class Store:
    """One adaptive-ft store (a DuckDB file). Open it with :meth:`Store.open` as a context manager."""

    def __init__(self, con: duckdb.DuckDBPyConnection, path: Path, read_only: bool):
        self.con = con
        self.path = path
        self.read_only = read_only

    # ------------------------------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | None = None,
        read_only: bool = False,
        *,
        migrations: Sequence[Migration] = MIGRATIONS,
        memory_limit: str | None = None,
        threads: int = 0,
    ) -> Store:
        """Open (creating and migrating when writable) the store at ``path`` (see :func:`resolve_store_path`).

        A read-only open of a store that an older version wrote migrates it first through a short
        writable open, so every reader sees the current schema.
        """
        path = resolve_store_path(path)
        if read_only and not path.exists():
            raise StoreError(f"no store at {path}: create it with `adaptive-ft ingest LOGS --store {path}`")
        if not read_only:
            path.parent.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {}
        if memory_limit:
            config["memory_limit"] = memory_limit
        if threads > 0:
            config["threads"] = threads
        if read_only and _pending(path, migrations, config):
            cls.open(path, read_only=False, migrations=migrations).close()
        store = cls(_connect(path, read_only, config), path, read_only)
        if not read_only:
            try:
                store._migrate(migrations)
            except BaseException:
                store.close()
                raise
        store._check_version(migrations)
        return store

    def close(self) -> None:
        """Close the connection (a checkpoint folds the write-ahead log into the file)."""
        self.con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ schema

    def _migrate(self, migrations: Sequence[Migration]) -> None:
        """Apply, in order, each migration not yet recorded; each in its own transaction with its record."""
        self.con.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMP)"
        )
        done = {v for (v,) in self.con.execute("SELECT version FROM schema_migrations").fetchall()}
        for m in sorted(migrations, key=lambda m: m.version):
            if m.version in done:
                continue
            self.con.execute("BEGIN TRANSACTION")
            try:
                self.con.execute(m.sql)
                self.con.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, now()::TIMESTAMP)", [m.version, m.name]
                )
                self.con.execute("COMMIT")
            except duckdb.Error as e:
                self.con.execute("ROLLBACK")
                raise StoreError(f"store {self.path}: migration {m.version} ({m.name}) failed: {e}") from None

    def schema_version(self) -> int:
        """The highest migration applied to this store (0 for an empty file)."""
        try:
            (v,) = self.con.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchall()[0]
        except duckdb.CatalogException:
            return 0
        return int(v)

    def _check_version(self, migrations: Sequence[Migration]) -> None:
        known = max((m.version for m in migrations), default=0)
        have = self.schema_version()
        if have > known:
            self.close()
            raise StoreError(
                f"store {self.path} has schema version {have}, newer than this adaptive-ft knows ({known}); "
                "upgrade adaptive-ft to read it"
            )
        if have < known:  # only reachable read-only, when the migrating open could not happen
            self.close()
            raise StoreError(f"store {self.path} has schema version {have}; open it once for writing to migrate")

    # ------------------------------------------------------------------------------------------ reads

    def sql(self, query: str, params: Sequence[Any] | None = None) -> pl.DataFrame:
        """Run a read query over the store's tables and return a Polars frame."""
        try:
            rel = self.con.sql(query, params=params)
            if rel is None:
                raise StoreError(f"Store.sql() returns rows; this statement returned none: {query[:80]!r}")
            return rel.pl()
        except duckdb.Error as e:
            raise StoreError(f"query on store {self.path} failed: {e}") from None

    def events(self) -> pl.DataFrame:
        """Every event, with segment from the user when the event has none, and domain from the example."""
        return self.sql(
            """
            SELECT e.event_id, e.ts, e.user_id, coalesce(e.segment, u.segment, 'unknown') AS segment,
                   e.example_id, coalesce(e.domain, x.domain) AS domain, e.event, e.value, e.model_version
            FROM events e
            LEFT JOIN users u USING (user_id)
            LEFT JOIN examples x USING (example_id)
            ORDER BY e.ts, e.event_id
            """
        )

    def examples(self) -> pl.DataFrame:
        """Every example: example_id, domain, prompt, reference."""
        return self.sql("SELECT example_id, domain, prompt, reference FROM examples ORDER BY example_id")

    def users(self) -> pl.DataFrame:
        """Every user with a segment ('unknown' when neither a users file nor an event gave one)."""
        return self.sql("SELECT user_id, coalesce(segment, 'unknown') AS segment FROM users ORDER BY user_id")

    def segment_domain_counts(self) -> pl.DataFrame:
        """Events per segment x domain x event type: segment, domain, event, n."""
        return self.sql(
            """
            SELECT coalesce(e.segment, u.segment, 'unknown') AS segment,
                   coalesce(e.domain, x.domain, 'unknown') AS domain, e.event, count(*) AS n
            FROM events e
            LEFT JOIN users u USING (user_id)
            LEFT JOIN examples x USING (example_id)
            GROUP BY ALL ORDER BY segment, domain, event
            """
        )

    def batches(self) -> pl.DataFrame:
        """One row per ingest: source, format, sha256, row counts and timings."""
        return self.sql("SELECT * FROM batches ORDER BY batch_id")

    def fingerprint(self) -> str:
        """sha256 over the inputs that put data in the store (their sha256, format, rows kept), in order.

        Re-ingesting a file that adds nothing leaves it unchanged; any new data changes it.
        """
        rows = self.con.execute(
            "SELECT sha256, format, rows_ok FROM batches WHERE rows_ok > 0 ORDER BY batch_id"
        ).fetchall()
        h = hashlib.sha256()
        for sha, fmt, ok in rows:
            h.update(f"{sha}:{fmt}:{ok}\n".encode())
        return h.hexdigest()


def _pending(path: Path, migrations: Sequence[Migration], config: dict[str, Any]) -> bool:
    """Whether the store at ``path`` lacks some of ``migrations`` (checked through a read-only connection)."""
    con = _connect(path, True, config)
    try:
        try:
            done = {v for (v,) in con.execute("SELECT version FROM schema_migrations").fetchall()}
        except duckdb.CatalogException:
            done = set()
        return any(m.version not in done for m in migrations)
    finally:
        con.close()
