"""``adaptive-ft ingest`` and ``adaptive-ft stats``: logs into the store, and what the store holds."""

from __future__ import annotations

import json
import re
import sys
import threading
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from adaptive_ft.cli.common import config_option, store_option
from adaptive_ft.config import load_config
from adaptive_ft.console import interactive
from adaptive_ft.errors import InputError
from adaptive_ft.store import FORMATS, IngestReport, Store, ingest
from adaptive_ft.store.load import STAGES
from adaptive_ft.store.sources import Source
from adaptive_ft.store.stats import store_stats

_BIG = 20 * 2**20  # files above this size get a progress bar per stage (a line per stage off a terminal)


class _Progress:
    """Per-file stage progress on stderr: a one-line start note, and for large files a tqdm bar whose
    elapsed clock keeps ticking during a long stage (a stage is one bulk SQL statement, with no
    row-by-row updates to report)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar: tqdm | None = None
        self.current: Path | None = None
        self._ticking = threading.Event()

    def __call__(self, src: Source, stage: str) -> None:
        if self.quiet:
            return
        if src.path != self.current:
            self.close()
            self.current = src.path
            click.echo(f"ingest: {src.path} ({src.format}, {src.bytes / 2**20:.1f} MiB)", err=True)
            if src.bytes >= _BIG and interactive(sys.stderr):
                self.bar = tqdm(total=len(STAGES), desc=src.path.name, unit="stage", file=sys.stderr, leave=False)
                self._ticking.clear()
                threading.Thread(target=self._tick, args=(self.bar,), daemon=True).start()
        if src.bytes >= _BIG and self.bar is None:  # written to a file or a pipe: a plain line per stage
            click.echo(f"ingest: {src.path.name}: {stage}", err=True)
        if self.bar is not None:
            self.bar.set_postfix_str(stage)
            if stage != STAGES[0]:
                self.bar.update(1)

    def _tick(self, bar: tqdm) -> None:
        while not self._ticking.wait(0.5):
            try:
                bar.refresh()
            except (OSError, ValueError):  # stderr closed (e.g. piped into head): stop ticking, never hang
                return

    def close(self) -> None:
        if self.bar is not None:
            self._ticking.set()
            self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()
            self.bar = None


def _print_report(report: IngestReport, quiet: bool) -> None:
    for f in report.files:
        if f.error:  # shown even when quiet: a file that could not be read is never silent
            click.echo(f"  skipped: {f.error}", err=True)
        elif quiet:
            continue
        elif f.note:
            click.echo(f"  {f.path}: {f.note}", err=True)
        else:
            known = f" ({f.rejected_known:,} already recorded from this file)" if f.rejected_known else ""
            click.echo(
                f"  {f.path}: batch {f.batch_id} ({f.format}): {f.rows_ok:,} ok, {f.rows_duplicate:,} duplicate, "
                f"{f.rows_rejected:,} rejected{known}"
                + (f", {f.rows_skipped:,} skipped (no rating)" if f.rows_skipped else ""),
                err=True,
            )
    if report.users_upserted and not quiet:
        click.echo(f"  users: {report.users_upserted:,} users loaded", err=True)
    click.echo(report.summary())


@click.command("ingest")
@click.argument("paths", nargs=-1, required=True, metavar="PATHS... [KEY=VALUE]...")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="auto", show_default=True,
              help="Input format; auto picks by extension, then by content.")
@click.option("--users", "users", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Per-user attributes (CSV/JSONL/Parquet with user_id, segment, ...).")
@click.option("--strict", is_flag=True, help="Exit non-zero when any record was rejected.")
@click.option("--force", is_flag=True, help="Re-read files already ingested (same sha256); adds nothing new.")
@click.option("--quiet", "-q", is_flag=True, help="Only the summary line (and files that could not be read).")
@store_option
@config_option
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override an ingest setting, e.g. --set max_field_chars=50000 (repeatable).")
def ingest_cmd(paths: tuple[str, ...], fmt: str, users: Path | None, strict: bool, force: bool, quiet: bool,
               store: str, config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Ingest interaction logs into the store (one transaction per file, idempotent).

    Bad records go to the store's `rejected` table with their line and reason; valid records in the
    same file are kept. A file that cannot be read (missing, empty, binary...) is reported and the
    others still go in, but the command then exits non-zero; it also does when nothing could be
    ingested, and with --strict when anything was rejected. Settings: `ingest.KEY=VALUE` after the
    paths, as in every command (or --set KEY=VALUE).

    \b
    Examples:
      adaptive-ft ingest logs.jsonl
      adaptive-ft ingest logs/*.parquet --users users.csv --store runs/store.duckdb
      adaptive-ft ingest chats.jsonl --format chat --strict
      adaptive-ft ingest review.csv --format review
      adaptive-ft ingest logs.jsonl ingest.max_field_chars=50000
    """
    files, positional = _split_overrides(paths)
    if not files:
        raise click.UsageError("no log file given (only settings: " + " ".join(positional) + ")")
    sets = [o if o.startswith("ingest.") else f"ingest.{o}" for o in overrides]
    cfg = load_config(config_path, [*sets, *positional])  # as flags elsewhere: a positional setting wins
    progress = _Progress(quiet)
    try:
        report = ingest(files, store=store, config=cfg.ingest, fmt=fmt, users=users, force=force,
                        on_stage=progress)
    finally:
        progress.close()
    _print_report(report, quiet)
    if not report.anything_read:
        errors = "; ".join(f.error for f in report.files if f.error) or "every record was rejected"
        raise InputError(f"nothing could be ingested: {errors}")
    if report.unreadable:
        n = len(report.unreadable)
        raise InputError(
            f"{n} of {len(report.files)} file(s) could not be read (the others were ingested): "
            + "; ".join(f.error for f in report.unreadable if f.error)
        )
    if strict and report.total("rows_rejected"):
        raise click.ClickException(
            f"--strict: {report.total('rows_rejected'):,} record(s) rejected; see `adaptive-ft stats` "
            f"or SELECT * FROM rejected in {report.store}"
        )


_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+=")


def _split_overrides(args: tuple[str, ...]) -> tuple[list[Path], list[str]]:
    """Log paths and ``section.key=value`` settings from the positional arguments (a file that exists is a path,
    whatever its name)."""
    files, settings = [], []
    for a in args:
        (settings if _OVERRIDE.match(a) and not Path(a).exists() else files).append(a)
    return [Path(f) for f in files], settings


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain fixed-width text table."""
    cells = [[str(r.get(c, "")) if r.get(c) is not None else "" for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) if i < len(vals) - 1 else v for i, (v, w) in enumerate(zip(vals, widths)))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _pivot(counts: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """segment x domain rows with one column per event type (and the row total)."""
    events = sorted({c["event"] for c in counts})
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for c in counts:
        row = rows.setdefault((c["segment"], c["domain"]), {"segment": c["segment"], "domain": c["domain"], "total": 0})
        row[c["event"]] = c["n"]
        row["total"] += c["n"]
    return list(rows.values()), ["segment", "domain", *events, "total"]


def _print_stats(s: dict[str, Any]) -> None:
    t0, t1 = s["time_range"]
    click.echo(f"store     {s['store']} (schema v{s['schema_version']})")
    click.echo(f"events    {s['events']:,}\nusers     {s['users']:,}\nexamples  {s['examples']:,}")
    click.echo(f"time      {t0 or '-'} .. {t1 or '-'}\nbatches   {len(s['batches'])}")
    if s["counts"]:
        rows, cols = _pivot(s["counts"])
        click.echo("\nevents per segment x domain x event type\n" + _table(rows, cols))
    rej = s["rejected"]
    click.echo(f"\nrejected  {rej['total']:,}")
    if rej["by_reason"]:
        click.echo(_table(rej["by_reason"], ["kind", "n", "example"]))


@click.command("stats")
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def stats_cmd(store: str, as_json: bool) -> None:
    """Show what the store holds: events, users, examples, time range, traffic per segment x domain x
    event type, and rejected records by reason.

    \b
    Examples:
      adaptive-ft stats
      adaptive-ft stats --store runs/store.duckdb --json | jq .rejected
    """
    with Store.open(store, read_only=True) as st:
        s = store_stats(st)
    if as_json:
        click.echo(json.dumps(s, indent=2, default=str))
    else:
        _print_stats(s)


COMMANDS = [ingest_cmd, stats_cmd]
