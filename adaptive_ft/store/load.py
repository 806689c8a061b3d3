"""Bulk, idempotent, transactional ingest of interaction logs into the store.

One file is one batch and one transaction. SQL validates every record (a CASE expression yields the
reason a record is bad); bad records go to ``rejected`` with their line and raw text, good ones to
``events`` unless their ``event_id`` is already stored (the same record again is a duplicate, a different
one under that id is rejected). Parquet and JSONL records go straight from DuckDB's reader into ``events``
and only the records that pass cannot take are staged; other formats are staged whole. There is no Python
loop over records anywhere on this path (only over the few lines re-read by offset).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from adaptive_ft.config import EVENT_TYPES, IngestConfig
from adaptive_ft.errors import InputError, StoreError
from adaptive_ft.files import file_sha256
from adaptive_ft.store.db import Store, resolve_store_path
from adaptive_ft.text import NORMALIZE_PROMPT_SQL
from adaptive_ft.store.sources import (
    FIELDS, Reader, Source, check_source, chat_reader, csv_reader, direct_reader, file_digest, ident,
    jsonl_reader, line_index, lines_relation, parquet_reader, q, read_lines, review_reader,
)

# Called as on_stage(source, stage_name) when a file enters a stage; the CLI drives its progress with it.
StageHook = Callable[[Source, str], None]
STAGES = ("read + validate", "resolve examples", "write", "commit")


@dataclass
class FileReport:
    """What one input file gave."""

    path: str
    format: str = ""
    batch_id: int | None = None
    rows_ok: int = 0
    rows_duplicate: int = 0
    rows_rejected: int = 0
    rows_skipped: int = 0
    rejected_known: int = 0  # rejected records already recorded from an earlier batch of this source (not added again)
    seconds: float = 0.0
    error: str | None = None  # the file could not be read at all
    note: str | None = None  # e.g. already ingested


@dataclass
class IngestReport:
    """The result of :func:`ingest`: one report per file, and totals."""

    store: str
    files: list[FileReport] = field(default_factory=list)
    users_upserted: int = 0

    def total(self, name: str) -> int:
        return sum(getattr(f, name) for f in self.files)

    @property
    def seconds(self) -> float:
        return sum(f.seconds for f in self.files)

    @property
    def anything_read(self) -> bool:
        """Whether any file yielded valid records (new or already stored) or a users file was loaded.

        A file already ingested counts what its batch gave then, so the same command answers the same way.
        """
        return self.users_upserted > 0 or any(f.rows_ok + f.rows_duplicate > 0 for f in self.files)

    @property
    def unreadable(self) -> list[FileReport]:
        """The files that could not be read at all."""
        return [f for f in self.files if f.error]

    def summary(self) -> str:
        ok, dup, rej = self.total("rows_ok"), self.total("rows_duplicate"), self.total("rows_rejected")
        rate = ok / self.seconds if self.seconds > 0 else 0.0
        skipped = self.total("rows_skipped")
        extra = f", {skipped:,} skipped" if skipped else ""
        return (
            f"{ok:,} ok, {dup:,} duplicate, {rej:,} rejected{extra} in {self.seconds:.2f} s "
            f"({rate:,.0f} events/s) -> {self.store}"
        )


def ingest(
    paths: Sequence[str | Path],
    store: str | Path | None = None,
    config: IngestConfig | None = None,
    fmt: str = "auto",
    users: str | Path | None = None,
    force: bool = False,
    on_stage: StageHook | None = None,
) -> IngestReport:
    """Ingest log files (and optionally a users file) into the store; each file is one batch.

    A file that cannot be read at all (missing, empty, binary) is reported in its :class:`FileReport`
    and the others still go in. A file whose sha256 matches an earlier batch is passed over unless
    ``force`` (its report repeats that batch's counts); re-reading it adds nothing anyway, since event ids
    are stable. A store this call created is removed again when nothing was written to it.
    """
    cfg = config or IngestConfig()
    path = resolve_store_path(store)
    existed = path.exists()
    report = IngestReport(str(path))
    try:
        with Store.open(path, memory_limit=cfg.memory_limit, threads=cfg.threads) as st:
            for p in paths:
                report.files.append(_ingest_file(st, Path(p), fmt, cfg, force, on_stage))
            if users is not None:
                report.users_upserted = ingest_users(st, Path(users))
    finally:
        written = report.users_upserted or any(f.batch_id is not None and not f.error for f in report.files)
        if not existed and not written:
            for leftover in (path, Path(f"{path}.wal")):
                leftover.unlink(missing_ok=True)
    return report


def _ingest_file(st: Store, path: Path, fmt: str, cfg: IngestConfig, force: bool, hook: StageHook | None) -> FileReport:
    rep = FileReport(str(path))
    try:
        src = check_source(path, fmt)
    except InputError as e:
        rep.error = str(e)
        return rep
    rep.format = src.format
    # Only a file of the same size as an earlier batch can be that batch again: hash it now to check.
    # Any other file is hashed in a thread while DuckDB reads it (the batch records the hash at the end).
    same_size = st.con.execute("SELECT batch_id, sha256, rows_ok + rows_duplicate, rows_rejected FROM batches "
                               "WHERE bytes = ? ORDER BY batch_id", [src.bytes]).fetchall()
    with ThreadPoolExecutor(max_workers=1) as pool:
        # plain JSONL: the newline offsets too, so the lines the direct path must re-read cost no pass
        indexed = src.format == "jsonl" and src.path.suffix.lower() != ".gz"
        digest: Future[tuple] = pool.submit(line_index if indexed else file_digest, src.path)
        if same_size:
            prev = next((b for b in same_size if b[1] == digest.result()[0]), None)
            if prev and not force:
                rep.rows_duplicate, rep.rows_rejected = int(prev[2]), int(prev[3] or 0)
                rep.rejected_known = rep.rows_rejected
                rep.note = f"already ingested as batch {prev[0]} (same sha256); --force re-reads it"
                if not prev[2] and prev[3]:
                    rep.note += "; every record was rejected then: fix the file, then ingest it again"
                return rep
        try:
            _load(st, src, cfg, rep, hook, digest)
        except duckdb.Error as e:
            _rollback(st)
            rep.error = f"{path}: could not be read as {src.format}: {str(e).splitlines()[0]}"
    return rep


def _rollback(st: Store) -> None:
    """Undo the open batch, if the failure came after it began."""
    try:
        st.con.execute("ROLLBACK")
    except duckdb.Error:
        pass  # no transaction was open


def _reader(src: Source, rejects: str) -> Reader:
    if src.format == "jsonl":
        return jsonl_reader(src, rejects=rejects)
    if src.format == "chat":
        return chat_reader(src, rejects)
    if src.format == "csv":
        return csv_reader(src, rejects)
    if src.format == "review":
        return review_reader(src, rejects)
    return parquet_reader(src)


def _load(st: Store, src: Source, cfg: IngestConfig, rep: FileReport, hook: StageHook | None,
          digest: Future[tuple]) -> None:
    """Read, validate and write one file as one transaction (a kill at any point leaves no trace).

    A Parquet or plain JSONL file goes the direct way (:func:`_load_direct`): its valid, complete, new
    records go straight from DuckDB's reader into ``events``, and only the rest (rejected, incomplete,
    duplicate or repeated records) is staged and settled the careful way. Any other file, or one the
    direct way cannot number exactly (a blank line), or a read error, is staged whole: a staging table
    (connection-local, filled before the transaction) holds every record with its line, reason and raw
    text, then everything that touches the store's tables happens inside one transaction.
    """
    con, t0 = st.con, time.perf_counter()
    if src.format == "parquet":
        desc = con.execute(f"DESCRIBE SELECT * FROM read_parquet({q(str(src.path))})").fetchall()
        src.types = {name: typ for name, typ, *_ in desc}
    (batch,) = con.execute("SELECT coalesce(max(batch_id), 0) + 1 FROM batches").fetchall()[0]
    rep.batch_id = int(batch)
    stage = _Stages(hook, src)
    direct = direct_reader(src)
    if direct is not None:
        try:
            if _load_direct(con, src, direct, cfg, rep, batch, stage, digest):
                _finish(con, rep, batch, t0, stage, digest)
                _drop_temps(con)
                return
        except duckdb.Error:
            pass  # e.g. a file DuckDB's reader gives up on: read it line by line below
        _rollback(st)
        _drop_temps(con)
        rep.rows_ok = rep.rows_duplicate = rep.rows_rejected = rep.rows_skipped = 0
    stage(0)
    reader = _reader(src, f"_rejects_{batch}")
    con.execute(f"CREATE OR REPLACE TEMP TABLE _stage AS {_stage_sql(reader, cfg)}")
    _begin_batch(con, batch, src)
    if reader.csv_rejects:
        _csv_rejects(con, reader.csv_rejects, header=src.format in ("csv", "review"))
    stage(1)
    _resolve_examples(con, batch)
    stage(2)
    _settle(con, src, batch, cfg, rep, lambda: _fill_raw_from_lines(con, src))
    _upsert_examples(con, f"SELECT example_id, domain, prompt, reference FROM _stage WHERE {_KEPT}", batch)
    _upsert_users(con, batch)
    _finish(con, rep, batch, t0, stage, digest)
    _drop_temps(con)


def _drop_temps(con: duckdb.DuckDBPyConnection) -> None:
    for t in ("_stage", "_todo", "_pull", "_rawlines", "_rep", "_ids", "_uni", "_skip", "_suni"):
        con.execute(f"DROP TABLE IF EXISTS {t}")


class _Stages:
    """Calls the stage hook once per stage, in order (the careful path after a failed fast one repeats none)."""

    def __init__(self, hook: StageHook | None, src: Source):
        self.hook, self.src, self.done = hook, src, -1

    def __call__(self, i: int) -> None:
        if i > self.done:
            self.done = i
            _stage(self.hook, self.src, i)


def _begin_batch(con: duckdb.DuckDBPyConnection, batch: int, src: Source) -> None:
    con.execute("BEGIN TRANSACTION")
    con.execute(
        "INSERT INTO batches (batch_id, source, format, rows_ok, rows_duplicate, rows_rejected, "
        "started_at, bytes) VALUES (?, ?, ?, 0, 0, 0, now()::TIMESTAMP, ?)",
        [batch, str(src.path.resolve()), src.format, src.bytes],
    )


def _finish(con: duckdb.DuckDBPyConnection, rep: FileReport, batch: int, t0: float, stage: _Stages,
            digest: Future[tuple]) -> None:
    """Record the batch's counts and hash, and commit."""
    rep.seconds = time.perf_counter() - t0  # the commit is outside the batch's own time
    con.execute(
        "UPDATE batches SET sha256 = ?, rows_ok = ?, rows_duplicate = ?, rows_rejected = ?, rows_skipped = ?, "
        "finished_at = now()::TIMESTAMP, seconds = ? WHERE batch_id = ?",
        [digest.result()[0], rep.rows_ok, rep.rows_duplicate, rep.rows_rejected, rep.rows_skipped, rep.seconds, batch],
    )
    stage(3)
    con.execute("COMMIT")


_EVENT_COLUMNS = "event_id, ts, user_id, segment, example_id, domain, event, value, model_version, response"


def _load_direct(con: duckdb.DuckDBPyConnection, src: Source, r: Reader, cfg: IngestConfig, rep: FileReport,
                 batch: int, stage: _Stages, digest: Future[tuple]) -> bool:
    """The direct way: one pass writes every valid, complete, new record; the careful pass sees only the rest.

    In one transaction:

    1. the records that are valid, complete (prompt and domain present), not suspect and not yet stored go
       straight from the reader into ``events``, each with its line. Parquet has ``file_row_number``; a
       JSONL reader has no row number, and numbering the wide pass (``row_number() OVER ()``) would keep it
       on one thread, so a narrow numbered pre-pass reads only the id column and the wide pass, on every
       thread, joins each record to the line its id was seen on (ids the file gives on fewer than 19 lines
       in 20: the wide pass is numbered instead);
    2. the lines that pass did not take are staged (read again by line number: a Parquet row group or JSONL
       line the filter does not need costs a parse, never a write), and JSONL lines DuckDB's JSON reader
       rejected or may have misread are re-read from their raw text (fetched by byte offset) line by line;
    3. events of this batch whose id the stage also holds, or that the file repeats, are moved back into the
       stage, so :func:`_settle` decides every repeated id by its first line, as the staged path does (ids a
       narrow pre-pass finds given twice are kept out of step 1, so this is rare: records without an id);
    4. examples are upserted from a narrow pass over the records kept, users from the batch's events.

    A clean file stops after step 1 and 4. Returns False (the transaction open, for the caller to roll
    back) when JSONL line numbers cannot be trusted: DuckDB's reader skips blank lines, so the pre-pass
    must number as many records as the file has lines.
    """
    _begin_batch(con, batch, src)
    stage(0)
    (empty,) = con.execute("SELECT NOT EXISTS (SELECT 1 FROM events)").fetchall()[0]
    new = "" if empty else " AND NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = s.event_id)"
    # Ids the file gives more than once are kept out of the pass (and staged): a row written in this
    # transaction and deleted again makes DuckDB rewrite the batch's row groups at commit, a cost
    # proportional to the file. A narrow pre-pass over the id column finds them.
    by_id = False
    if src.format == "jsonl":
        # JSONL: the pre-pass also numbers the lines (one thread, but only the id is read), so the wide pass
        # can run on every thread: a record whose id the file gives once takes its line from this table.
        con.execute(
            f"""CREATE OR REPLACE TEMP TABLE _ids AS
                SELECT {r.line} AS line, {_id_hash_sql(r)} AS h FROM {r.base}"""
        )
        (n_lines, n_given) = con.execute("SELECT count(*), count(h) FROM _ids").fetchall()[0]
        if n_lines != digest.result()[1]:
            return False  # DuckDB's reader skips blank lines: its numbers are not the file's lines
        con.execute("CREATE OR REPLACE TEMP TABLE _rep AS SELECT h FROM _ids WHERE h IS NOT NULL "
                    "GROUP BY h HAVING count(*) > 1")
        # ids on (nearly) every line: join by id; a file of records without ids is numbered in the wide pass
        by_id = n_given * _REREAD_SHARE >= n_lines * (_REREAD_SHARE - 1)
        if by_id:
            con.execute("CREATE OR REPLACE TEMP TABLE _uni AS SELECT line, h FROM _ids "
                        "WHERE h IS NOT NULL AND h NOT IN (SELECT h FROM _rep)")
        con.execute("DROP TABLE _ids")
    else:
        # (the group of records without an id comes along: how many there are, then out of _rep)
        con.execute(
            f"""CREATE OR REPLACE TEMP TABLE _rep AS SELECT h, count(*) AS n FROM (
                    SELECT {_id_hash_sql(r)} AS h FROM {r.base})
                GROUP BY h HAVING count(*) > 1 OR h IS NULL"""
        )
        (n_lines, n_given) = con.execute(
            "SELECT n, n - coalesce((SELECT sum(n) FROM _rep WHERE h IS NULL), 0) "
            "FROM (SELECT count(*) AS n FROM read_parquet(?))", [str(src.path)]
        ).fetchall()[0]
        con.execute("DELETE FROM _rep WHERE h IS NULL")
    (n_rep,) = con.execute("SELECT count(*) FROM _rep").fetchall()[0]
    if by_id:
        # The id names the line exactly: the pre-pass saw that id on that line and on no other (a hash two
        # ids share is in _rep, so both are staged). No reliance on the order rows arrive in.
        unnumbered = _rows_sql(replace(r, line="NULL::BIGINT"), cfg)
        with _build_side_as_written(con):
            (inserted,) = con.execute(
                f"""INSERT INTO events SELECT {_EVENT_COLUMNS}, ?, u.line FROM ({unnumbered}) s
                    JOIN _uni u ON hash(s.given_id) = u.h WHERE clean{new}""", [batch]
            ).fetchall()[0]
    else:
        if n_rep:
            new += " AND hash(s.event_id) NOT IN (SELECT h FROM _rep)"
        (inserted,) = con.execute(
            f"INSERT INTO events SELECT {_EVENT_COLUMNS}, ?, line FROM ({_rows_sql(r, cfg)}) s WHERE clean{new}",
            [batch],
        ).fetchall()[0]
    total = n_lines  # the pre-pass counted the file's records (JSONL: checked equal to its lines above)
    # Distinct hashes prove distinct ids; a repeated hash left (records without an id that hash to the same
    # one, or rarely a collision) is looked at below. When every row written carries an id of its own that the
    # pre-pass saw once (joined by id, or a file where every record gives one), no id can be written twice:
    # nothing to count (the ids a record without one is given may repeat, or equal a given one).
    if by_id or n_given == n_lines:
        distinct = inserted
    else:
        (distinct,) = con.execute(
            "SELECT count(DISTINCT hash(event_id)) FROM events WHERE batch_id = ?", [batch]
        ).fetchall()[0]
    stage(1)
    rest, repeats = inserted < total, distinct < inserted
    if rest:
        n_todo = _todo_lines(con, batch, int(total))
    if rest and src.format == "jsonl" and n_todo * _REREAD_SHARE <= total:
        # The pre-pass numbered as many records as the file has lines: no line was skipped, so the lines
        # the pass did not take are exactly _todo. Few of them: fetch them by offset and read them line by line.
        con.execute("CREATE OR REPLACE TEMP TABLE _rawlines AS SELECT line AS _line FROM _todo")
        con.execute(f"CREATE OR REPLACE TEMP TABLE _stage AS {_stage_sql(r, cfg)} LIMIT 0")
        _reread_jsonl(con, src, cfg, digest, "SELECT _line AS line FROM _rawlines")
    elif rest:
        beyond = int(total) if src.format == "jsonl" else None  # JSONL: also what lies past the last line
        con.execute(f"CREATE OR REPLACE TEMP TABLE _stage AS {_stage_sql(r, cfg, only='_todo', total=beyond)}")
        if src.format == "jsonl":
            (beyond, last, last_new) = con.execute(
                f"""SELECT count(*) FILTER (line > {int(total)}), count(*) FILTER (line = {int(total)}),
                       EXISTS (SELECT 1 FROM _todo WHERE line = {int(total)}) FROM _stage"""
            ).fetchall()[0]
            if beyond or (last_new and not last):
                return False  # DuckDB's reader numbered fewer (or more) records than the file has lines
            con.execute("DELETE FROM _stage WHERE line NOT IN (SELECT line FROM _todo)")
            _reread_jsonl(con, src, cfg, digest)
    elif repeats:
        con.execute(f"CREATE OR REPLACE TEMP TABLE _stage AS {_stage_sql(r, cfg)} LIMIT 0")
    else:
        stage(2)
        _upsert_examples(con, _examples_sql(r), batch)
        _upsert_users(con, batch)
        rep.rows_ok = int(inserted)
        return True
    _resolve_examples(con, batch)
    stage(2)
    ids = []
    if repeats:
        ids.append("SELECT event_id FROM events WHERE batch_id = $1 GROUP BY event_id HAVING count(*) > 1")
    if rest:
        ids.append("SELECT event_id FROM _stage WHERE reason IS NULL AND NOT skipped")
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE _pull AS SELECT DISTINCT event_id FROM events
            WHERE batch_id = $1 AND event_id IN ({' UNION '.join(ids)})""",
        [batch],
    )
    con.execute(
        f"""INSERT INTO _stage BY NAME SELECT line, NULL AS reason, false AS skipped, false AS suspect, NULL AS raw,
               {_EVENT_COLUMNS}, false AS dup
            FROM events WHERE batch_id = ? AND event_id IN (SELECT event_id FROM _pull)""",
        [batch],
    )
    (pulled,) = con.execute(
        "DELETE FROM events WHERE batch_id = ? AND event_id IN (SELECT event_id FROM _pull)", [batch]
    ).fetchall()[0]
    rep.rows_ok = int(inserted) - int(pulled)
    _settle(con, src, batch, cfg, rep, lambda: _fill_raw_direct(con, src, digest), stored=False if empty else None)
    # Examples come from the records kept only. By id (the pass stays parallel): a line whose id the file
    # gives once is told by that id, so the records to pass over are those of the few staged lines not kept,
    # and of ids given twice; every line without an id of its own was staged: its kept record comes from there.
    if by_id:
        # (_suni: the staged lines whose id the file gives once, found by joining the few staged lines to _uni,
        # not by looking every staged line up in all of it)
        con.execute(
            f"""CREATE OR REPLACE TEMP TABLE _suni AS SELECT u.line, u.h, {_KEPT} AS kept
                FROM _uni u JOIN _stage s ON s.line = u.line"""
        )
        con.execute("CREATE OR REPLACE TEMP TABLE _skip AS SELECT h FROM _suni WHERE NOT kept "
                    "UNION ALL SELECT h FROM _rep")
        rows = (f"SELECT example_id, domain, prompt, reference FROM ({_examples_sql(r, with_hash=True)}) x "
                f"WHERE h IS NOT NULL AND h NOT IN (SELECT h FROM _skip) "
                f"UNION ALL SELECT example_id, domain, prompt, reference FROM _stage "
                f"WHERE {_KEPT} AND line NOT IN (SELECT line FROM _suni)")
    else:
        rows = (f"SELECT * FROM ({_examples_sql(r, with_line=True)}) x "
                f"WHERE NOT EXISTS (SELECT 1 FROM _stage s WHERE s.line = x.line AND NOT ({_KEPT}))")
    _upsert_examples(con, rows, batch)
    _upsert_users(con, batch)
    return True


@contextmanager
def _build_side_as_written(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """Within the block, a hash join builds its right side, as the query is written.

    DuckDB estimates a JSON scan at a few dozen rows, so it would build the by-id join's hash table from the
    file's wide records (every field of every line: past the memory limit, then spilled) and probe it with
    the id table, which is the small, narrow side. With the optimizer that swaps the sides off, the id table
    is built and the file streams through it. (The check against a non-empty store's events is a mark join,
    built from ``events`` with the optimizer on or off.)
    """
    (before,) = con.execute("SELECT current_setting('disabled_optimizers')").fetchall()[0]
    con.execute("SET disabled_optimizers = " + q(",".join(filter(None, [before, "build_side_probe_side"]))))
    try:
        yield
    finally:
        con.execute(f"SET disabled_optimizers = {q(before)}")


def _todo_lines(con: duckdb.DuckDBPyConnection, batch: int, total: int) -> int:
    """``_todo``: the lines 1..total the direct pass wrote no event for; returns how many.

    The batch's lines are fetched as one array and marked in a bitmap: an anti-join of every line number
    against the written events costs several times more.
    """
    written = con.execute("SELECT line FROM events WHERE batch_id = ?", [batch]).fetchnumpy()["line"]
    taken = np.zeros(total + 1, dtype=bool)
    taken[written[written <= total]] = True
    todo = np.flatnonzero(~taken[1:]) + 1
    table = pa.table({"line": pa.array(todo, pa.int64())})
    con.register("_todo_arrow", table)
    try:
        con.execute("CREATE OR REPLACE TEMP TABLE _todo AS SELECT line FROM _todo_arrow")
    finally:
        con.unregister("_todo_arrow")
    return len(todo)


# The direct path reads the lines its pass did not take by offset when they are at most 1/20 of the file,
# else lets DuckDB read the file again, keeping only those lines (Python's per-line cost would dominate).
_REREAD_SHARE = 20


def _reread_jsonl(con: duckdb.DuckDBPyConnection, src: Source, cfg: IngestConfig, digest: Future[tuple],
                  which: str = "SELECT line FROM _stage WHERE reason IS NOT NULL OR suspect") -> None:
    """Stage, from their raw text, JSONL lines (``which``: by default those DuckDB's JSON reader rejected or
    may have misread), replacing what the stage holds for them.

    The lines are fetched by byte offset (no pass over the file) and checked for UTF-8 here: DuckDB would
    give up on the whole file at one bad byte, which is one bad record.
    """
    lines = [n for (n,) in con.execute(f"SELECT line FROM ({which}) ORDER BY line").fetchall()]
    if not lines:
        return
    raws, encs = [], []
    for b in read_lines(src.path, digest.result()[2], lines):
        try:
            raws.append(b.decode("utf-8"))
            encs.append(None)
        except UnicodeDecodeError as e:
            raws.append(b.decode("utf-8", "backslashreplace"))
            encs.append(f"invalid UTF-8 (byte 0x{b[e.start]:02x} at column {e.start + 1})")
    table = pa.table({"_line": pa.array(lines, pa.int64()), "_raw": pa.array(raws, pa.string()),
                      "_enc": pa.array(encs, pa.string())})
    con.register("_rawlines_arrow", table)
    try:
        con.execute("CREATE OR REPLACE TEMP TABLE _rawlines AS SELECT * FROM _rawlines_arrow")
    finally:
        con.unregister("_rawlines_arrow")
    con.execute("DELETE FROM _stage WHERE line IN (SELECT _line FROM _rawlines)")
    con.execute(f"INSERT INTO _stage {_stage_sql(jsonl_reader(src, lines='SELECT * FROM _rawlines'), cfg)}")


def _fill_raw_direct(con: duckdb.DuckDBPyConnection, src: Source, digest: Future[tuple]) -> None:
    """Raw text for rejected rows the direct path staged without it (conflicting duplicates)."""
    need = [n for (n,) in con.execute(
        "SELECT line FROM _stage WHERE reason IS NOT NULL AND raw IS NULL ORDER BY line").fetchall()]
    if not need:
        return
    if src.format == "parquet":
        where = "WHERE _r.file_row_number IN (SELECT line - 1 FROM _stage WHERE reason IS NOT NULL AND raw IS NULL)"
        con.execute(f"UPDATE _stage SET raw = x.raw FROM ({_raw_sql(parquet_reader(src), where)}) x "
                    "WHERE _stage.line = x.line")
        return
    raws = [b.decode("utf-8", "backslashreplace") for b in read_lines(src.path, digest.result()[2], need)]
    for n, raw in zip(need, raws):
        con.execute("UPDATE _stage SET raw = ? WHERE line = ?", [raw, n])


def _fill_raw_from_lines(con: duckdb.DuckDBPyConnection, src: Source) -> None:
    """Raw text for rejected rows staged without it (conflicting duplicates): their lines of the file."""
    (n,) = con.execute("SELECT count(*) FROM _stage WHERE reason IS NOT NULL AND raw IS NULL").fetchall()[0]
    if n:
        con.execute(
            f"""UPDATE _stage SET raw = l._raw FROM ({lines_relation(src, '_rejects_fill')}) l
            WHERE l._line = _stage.line AND _stage.reason IS NOT NULL AND _stage.raw IS NULL"""
        )
        con.execute("DROP TABLE IF EXISTS _rejects_fill")
        con.execute("DROP TABLE IF EXISTS _rejects_fill_scan")


def _stage(hook: StageHook | None, src: Source, i: int) -> None:
    if hook is not None:
        hook(src, STAGES[i])


# ------------------------------------------------------------------------------------- validation SQL

# ISO-8601 in UTC ('Z' or naive) takes the fast strptime path; offsets and other ISO forms the ICU
# TIMESTAMPTZ cast; a plain number is epoch seconds (below 1e11, so milliseconds are not misread).
# The number is cast once, inside a lambda: written twice, DuckDB would hoist the common try_cast out of
# the coalesce and run it on every row (0.4 s per million rows), not only on the rows the others miss.
_TS_TEXT = (
    "coalesce(try_strptime({ts}, ['%Y-%m-%dT%H:%M:%SZ', '%Y-%m-%dT%H:%M:%S.%fZ', '%Y-%m-%d %H:%M:%S']), "
    "try_cast({ts} AS TIMESTAMPTZ) AT TIME ZONE 'UTC', "
    "to_timestamp(list_filter([try_cast({ts} AS DOUBLE)], lambda d: d >= 0 AND d < 1e11)[1])::TIMESTAMP)"
)


def _reason_sql(cfg: IngestConfig) -> str:
    """The CASE that names the first thing wrong with a record (NULL when it is fine)."""
    events = ", ".join(q(e) for e in EVENT_TYPES)
    limit = cfg.max_field_chars
    too_long = " ".join(
        f"WHEN strlen({ident(f)}) > {limit} AND length({ident(f)}) > {limit} "
        f"THEN 'field too long: {f} (' || length({ident(f)}) || ' chars > {limit})'"
        for f in FIELDS
    )
    return f"""CASE
        WHEN pre_reason IS NOT NULL THEN pre_reason
        {too_long}
        WHEN user_id IS NULL THEN 'missing required field: user_id'
        WHEN ts IS NULL THEN 'missing required field: ts'
        WHEN event IS NULL THEN 'missing required field: event'
        WHEN example_id IS NULL AND prompt IS NULL THEN 'missing required field: example_id or prompt'
        WHEN ts_p IS NULL THEN 'unparseable timestamp: ' || left(ts, 100) || ' (expected ISO-8601 or epoch seconds)'
        WHEN event_n NOT IN ({events}) THEN 'unknown event type: ' || left(event, 100)
        WHEN value IS NOT NULL AND value_p IS NULL THEN 'wrong type: value is not a number: ' || left(value, 100)
        WHEN NOT isfinite(value_p) THEN 'wrong type: value is not a finite number: ' || left(value, 100)
    END"""


# The same normal form and hash as adaptive_ft.text.example_id_for: one prompt, one id, whoever made it.
_NORM_PROMPT = NORMALIZE_PROMPT_SQL
_EXAMPLE_ID = f"coalesce(example_id, left(sha256({_NORM_PROMPT}), 16))"
_EVENT_KEY = (
    "concat_ws(chr(31), user_id, strftime(ts_p, '%Y-%m-%dT%H:%M:%S.%f'), event_n, example_id_f, "
    "coalesce(value_p::VARCHAR, ''), coalesce(model_version, ''))"
)


def _f_sql(r: Reader, carry: bool = True) -> str:
    """The reader's text fields (and typed ts/value, the line, format-level reasons) from its FROM item."""
    fields = ", ".join(f"{expr} AS {ident(name)}" for name, expr in r.fields.items())
    typed = "".join(f", {expr} AS {name}" for name, expr in (("_ts_t", r.ts_parsed), ("_value_t", r.value_parsed))
                    if expr)
    kept = "".join(f", {e} AS {n}" for n, e in r.carry.items()) if carry else ""
    return (f"SELECT {r.line} AS line, {r.pre_reason} AS pre_reason, {r.skip} AS skipped, {r.suspect} AS suspect, "
            f"{fields}{typed}{kept} FROM {r.base}")


def _p_sql(r: Reader) -> str:
    """Parsed ts and value, normal event name and the example id, over ``f``."""
    ts_p = "_ts_t" if r.ts_parsed else _TS_TEXT.format(ts="ts")
    value_p = "_value_t" if r.value_parsed else "try_cast(value AS DOUBLE)"
    return (f"SELECT *, {ts_p} AS ts_p, {value_p} AS value_p, lower(trim(event)) AS event_n, "
            f"{_EXAMPLE_ID} AS example_id_f FROM f")


def _stage_sql(r: Reader, cfg: IngestConfig, only: str | None = None, total: int | None = None) -> str:
    """One pass over the file: text fields, parsed ts/value, the reason, stable ids.

    ``only``: a table of the lines to stage (with ``total``, lines past it are staged too, so the caller
    can see whether the reader numbered more records than the file has lines). The raw record is kept
    only for rows rejected here or that :func:`_resolve_examples` may reject.
    """
    where = ""
    if only:
        where = f" WHERE line IN (SELECT line FROM {only})" + (f" OR line >= {total}" if total else "")
    return f"""
    WITH f AS ({_f_sql(r)}),
    p AS ({_p_sql(r)}{where}),
    v AS (SELECT *, CASE WHEN skipped THEN NULL ELSE {_reason_sql(cfg)} END AS reason FROM p)
    SELECT line, reason, skipped, suspect,
           CASE WHEN reason IS NOT NULL OR prompt IS NULL OR domain IS NULL THEN {r.raw} END AS raw,
           CASE WHEN reason IS NULL THEN coalesce(event_id, md5({_EVENT_KEY})) END AS event_id,
           ts_p AS ts, user_id, segment, example_id_f AS example_id, domain, prompt, response, reference,
           event_n AS event, value_p AS value, model_version, false AS dup
    FROM v"""


def _rows_sql(r: Reader, cfg: IngestConfig) -> str:
    """The direct path's records, as stored, with their line and ``clean``: valid by the same rules as
    :func:`_stage_sql`, complete (prompt and domain present), nothing suspect.

    No raw text: a record that is not clean is staged afterwards by its line. Columns a query does not use
    are pruned down to the reader.
    """
    return f"""
    WITH f AS ({_f_sql(r, carry=False)}),
    p AS ({_p_sql(r)})
    SELECT ({_reason_sql(cfg)}) IS NULL AND NOT suspect AND prompt IS NOT NULL AND domain IS NOT NULL AS clean,
           line, event_id AS given_id, coalesce(event_id, md5({_EVENT_KEY})) AS event_id, ts_p AS ts, user_id, segment,
           example_id_f AS example_id, domain, prompt, reference, response, event_n AS event, value_p AS value,
           model_version
    FROM p"""


def _id_hash_sql(r: Reader) -> str:
    """The hash of the id a record gives, NULL for a record without one (DuckDB hashes NULL to a value)."""
    eid = r.fields["event_id"]
    return f"CASE WHEN {eid} IS NOT NULL THEN hash({eid}) END"


def _examples_sql(r: Reader, with_line: bool = False, with_hash: bool = False) -> str:
    """example_id, domain, prompt, reference of every record (and its line, or ``h``: the hash of the id it
    gives, NULL without one): a narrow pass for the upsert."""
    cols = ", ".join(f"{r.fields[c]} AS {c}" for c in ("example_id", "domain", "prompt", "reference"))
    extra = (f"{r.line} AS line, " if with_line else "") + (
        f"{_id_hash_sql(r)} AS h, " if with_hash else "")
    keep = ("line, " if with_line else "") + ("h, " if with_hash else "")
    return (f"SELECT {keep}{_EXAMPLE_ID} AS example_id, domain, prompt, reference "
            f"FROM (SELECT {extra}{cols} FROM {r.base})")


def _raw_sql(r: Reader, where: str) -> str:
    """(line, raw) of the reader's records that ``where`` (over its FROM item) keeps."""
    kept = "".join(f", {e} AS {n}" for n, e in r.carry.items())
    return f"SELECT line, {r.raw} AS raw FROM (SELECT {r.line} AS line{kept} FROM {r.base} {where})"


def _csv_rejects(con: duckdb.DuckDBPyConnection, table: str, header: bool) -> None:
    """Rows DuckDB's CSV reader set aside (rows that break CSV rules, lines not UTF-8): record them, and correct
    later rows' line numbers.

    DuckDB logs one error per missing column; the first one per line is kept. The staging line was the row's
    number among the rows read (plus one for a header); each set-aside line before a row pushes it one further.
    """
    offset = int(header)
    rej = f"(SELECT line, arg_min(error_type, column_idx) AS error_type, arg_min(error_message, column_idx) AS msg, " \
          f"any_value(csv_line) AS csv_line FROM {ident(table)} GROUP BY line)"
    (n,) = con.execute(f"SELECT count(*) FROM {rej}").fetchall()[0]
    if n:
        con.execute(
            f"""UPDATE _stage SET line = _stage.line + (
                SELECT count(*) FROM (SELECT line - row_number() OVER (ORDER BY line) - {offset} AS g FROM {rej}) r
                WHERE r.g < _stage.line - {offset})"""
        )
        con.execute(
            f"""INSERT INTO _stage (line, reason, skipped, suspect, raw, dup)
            SELECT line, CASE WHEN error_type = 'INVALID ENCODING' THEN 'invalid UTF-8 (' || msg || ')'
                              ELSE 'malformed CSV: ' || lower(error_type) || ' (' || msg || ')' END,
                   false, false, trim(csv_line, chr(10) || chr(13)), false FROM {rej}"""
        )
    con.execute(f"DROP TABLE IF EXISTS {ident(table)}")
    con.execute(f"DROP TABLE IF EXISTS {ident(table + '_scan')}")


def _resolve_examples(con: duckdb.DuckDBPyConnection, batch: int) -> None:
    """Reject records whose example has no prompt or no domain in this file nor in the store.

    The direct path has already written this batch's complete records: an example among its events has both.
    """
    (n,) = con.execute(
        "SELECT count(*) FROM _stage WHERE reason IS NULL AND NOT skipped AND (prompt IS NULL OR domain IS NULL)"
    ).fetchall()[0]
    if not n:
        return
    con.execute(
        """
        UPDATE _stage SET reason = CASE WHEN k.prompt IS NULL
            THEN 'missing required field: prompt (example ' || _stage.example_id || ' has none in this file or the store)'
            ELSE 'missing required field: domain (example ' || _stage.example_id || ' has none in this file or the store)' END
        FROM (
            WITH needy AS (SELECT DISTINCT example_id FROM _stage
                           WHERE reason IS NULL AND NOT skipped AND (prompt IS NULL OR domain IS NULL))
            SELECT example_id, max(prompt) AS prompt, max(domain) AS domain FROM (
                SELECT example_id, prompt, domain FROM _stage WHERE reason IS NULL AND NOT skipped
                    AND example_id IN (SELECT example_id FROM needy)
                UNION ALL
                SELECT example_id, prompt, domain FROM examples WHERE example_id IN (SELECT example_id FROM needy)
                UNION ALL
                SELECT DISTINCT example_id, '', '' FROM events WHERE batch_id = ? AND example_id IN (SELECT example_id FROM needy)
            ) GROUP BY example_id
        ) k
        WHERE _stage.example_id = k.example_id AND _stage.reason IS NULL AND NOT _stage.skipped
          AND (k.prompt IS NULL OR k.domain IS NULL)
        """,
        [batch],
    )


# What a record is, for telling an identical duplicate from a conflicting one (prompt and reference belong
# to the example, not the event).
_CONTENT = ("ts", "user_id", "segment", "example_id", "domain", "event", "value", "model_version", "response")
# A staged row that becomes an event: valid, not skipped, not a duplicate.
_KEPT = "reason IS NULL AND NOT skipped AND NOT dup"


def _content(src: Source) -> tuple[str, ...]:
    """The fields compared; a review CSV without reviewed_at dates its rows by the file's mtime, which is not content."""
    if src.format == "review" and "reviewed_at" not in src.columns:
        return tuple(c for c in _CONTENT if c != "ts")
    return _CONTENT


def _settle(con: duckdb.DuckDBPyConnection, src: Source, batch: int, cfg: IngestConfig, rep: FileReport,
            fill_raw: Callable[[], None], stored: bool | None = None) -> None:
    """Decide the staged rows: duplicates, conflicts, rejected rows and the events to write; then write them.

    An event id seen again (later in the file, or already in the store) is a duplicate when the record is
    the same, and rejected (``conflicting duplicate``) when it differs: the store keeps the first, and the
    rejected row names the line or batch it conflicts with and the first field that differs.
    ``stored``: whether the store may hold a staged id (None: whether it holds any event). The direct path
    passes False when the store was empty before its batch: the batch's own events whose id the stage holds
    were moved back into the stage, so no staged id is stored.
    """
    differs = "CASE " + " ".join(f"WHEN a.{c} IS DISTINCT FROM b.{c} THEN '{c}'" for c in _content(src)) + " END"
    (n_valid, n_ids) = con.execute(
        "SELECT count(*), count(DISTINCT event_id) FROM _stage WHERE reason IS NULL AND NOT skipped"
    ).fetchall()[0]
    if stored is None:
        (stored,) = con.execute("SELECT EXISTS (SELECT 1 FROM events)").fetchall()[0]
    parts = []
    if n_ids < n_valid:  # the same id twice in the file: the first line is kept
        parts.append(
            f"""SELECT a.line, {differs} AS d, ' appears on line ' || b.line || ' of this file' AS other
            FROM r a JOIN r b ON a.event_id = b.event_id AND b.k = 1 WHERE a.k > 1"""
        )
    if stored and n_valid:
        parts.append(
            f"""SELECT a.line, {differs} AS d, ' is already stored (batch ' || b.batch_id || ')' AS other
            FROM r a JOIN events b ON a.event_id = b.event_id WHERE a.k = 1"""
        )
    if parts:
        con.execute(
            f"""UPDATE _stage SET dup = true,
                   reason = CASE WHEN x.d IS NOT NULL THEN 'conflicting duplicate: event_id ' || _stage.event_id
                            || x.other || ' with a different ' || x.d END
            FROM (WITH r AS (SELECT *, row_number() OVER (PARTITION BY event_id ORDER BY line) AS k FROM _stage
                             WHERE reason IS NULL AND NOT skipped)
                  {' UNION ALL '.join(parts)}) x
            WHERE _stage.line = x.line"""
        )
    (inserted,) = con.execute(
        f"INSERT INTO events SELECT {_EVENT_COLUMNS}, ?, line FROM _stage WHERE {_KEPT} ORDER BY line", [batch]
    ).fetchall()[0]
    fill_raw()
    # A bad record this source already had rejected (the same text, the same reason) is not added again:
    # re-reading a file after fixing some of its lines adds only what is new.
    n_raw = cfg.max_raw_chars
    (added,) = con.execute(
        f"""INSERT INTO rejected SELECT ?, line, raw_kept, reason FROM (
                SELECT line, reason, CASE WHEN length(raw) > {n_raw}
                    THEN left(raw, {n_raw}) || '... (' || length(raw) || ' chars)' ELSE raw END AS raw_kept
                FROM _stage WHERE reason IS NOT NULL) s
            WHERE NOT EXISTS (SELECT 1 FROM rejected r JOIN batches b USING (batch_id)
                              WHERE b.source = ? AND r.batch_id <> ? AND r.reason = s.reason
                                AND r.raw IS NOT DISTINCT FROM s.raw_kept)
            ORDER BY line""",
        [batch, str(src.path.resolve()), batch],
    ).fetchall()[0]
    rejected, skipped, dups = con.execute(
        "SELECT count(*) FILTER (reason IS NOT NULL), count(*) FILTER (skipped), "
        "count(*) FILTER (dup AND reason IS NULL) FROM _stage"
    ).fetchall()[0]
    rep.rows_ok += int(inserted)
    rep.rows_rejected, rep.rows_skipped, rep.rows_duplicate = int(rejected), int(skipped), int(dups)
    rep.rejected_known = int(rejected) - int(added)


def _upsert_examples(con: duckdb.DuckDBPyConnection, rows: str, batch: int) -> None:
    """Examples from ``rows`` (example_id, domain, prompt, reference): new ones inserted, and a stored one's
    missing domain, prompt or reference filled in (what is stored is never overwritten)."""
    con.execute(
        f"""INSERT INTO examples SELECT example_id, max(domain), max(prompt), max(reference), ?
            FROM ({rows}) GROUP BY example_id
            ON CONFLICT (example_id) DO UPDATE SET domain = coalesce(examples.domain, excluded.domain),
                prompt = coalesce(examples.prompt, excluded.prompt),
                reference = coalesce(examples.reference, excluded.reference)""",
        [batch],
    )


def _upsert_users(con: duckdb.DuckDBPyConnection, batch: int) -> None:
    """Users of the batch's events (a user's stored segment wins over the log's)."""
    con.execute(
        """INSERT INTO users SELECT user_id, max(segment), NULL FROM events WHERE batch_id = ? GROUP BY user_id
           ON CONFLICT (user_id) DO UPDATE SET segment = coalesce(users.segment, excluded.segment)""",
        [batch],
    )


# ------------------------------------------------------------------------------------- users file


def ingest_users(st: Store, path: Path) -> int:
    """Load per-user attributes (user_id, segment, anything else -> attributes JSON); later files win."""
    src = check_source(path, "auto")
    if src.format == "review":
        src.format = "csv"
    reader = {
        "parquet": f"read_parquet({q(str(path))})",
        "csv": f"read_csv({q(str(path))}, header=true, all_varchar=true)",
    }.get(src.format, f"read_json({q(str(path))}, format='newline_delimited')")
    con = st.con
    try:
        cols = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {reader}").fetchall()]
    except duckdb.Error as e:
        raise InputError(f"{path}: cannot read users file: {str(e).splitlines()[0]}") from None
    if "user_id" not in cols:
        raise InputError(f"{path}: a users file needs a user_id column (found: {', '.join(cols)})")
    seg = "nullif(trim(CAST(segment AS VARCHAR)), '')" if "segment" in cols else "NULL::VARCHAR"
    extra = [c for c in cols if c not in ("user_id", "segment")]
    attrs = f"to_json(struct_pack({', '.join(f'{ident(c)} := {ident(c)}' for c in extra)}))" if extra else "NULL::JSON"
    con.execute("BEGIN TRANSACTION")
    try:
        (batch,) = con.execute("SELECT coalesce(max(batch_id), 0) + 1 FROM batches").fetchall()[0]
        (n,) = con.execute(
            f"""INSERT INTO users SELECT CAST(user_id AS VARCHAR), last({seg}), last({attrs})
                FROM {reader} WHERE user_id IS NOT NULL GROUP BY 1
                ON CONFLICT (user_id) DO UPDATE SET segment = coalesce(excluded.segment, users.segment),
                    attributes = coalesce(excluded.attributes, users.attributes)"""
        ).fetchall()[0]
        con.execute(
            "INSERT INTO batches (batch_id, source, format, sha256, rows_ok, rows_duplicate, rows_rejected, "
            "started_at, finished_at, seconds, bytes) VALUES (?, ?, 'users', ?, ?, 0, 0, now()::TIMESTAMP, "
            "now()::TIMESTAMP, 0, ?)",
            [batch, str(path.resolve()), file_sha256(path), n, src.bytes],
        )
        con.execute("COMMIT")
    except duckdb.Error as e:
        con.execute("ROLLBACK")
        raise StoreError(f"{path}: users file could not be loaded: {str(e).splitlines()[0]}") from None
    return int(n)
