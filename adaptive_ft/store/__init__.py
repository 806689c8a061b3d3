"""The interaction store: one DuckDB file with events, examples, users, batches and rejected records.

This package is the only code in adaptive-ft that imports duckdb. Later stages read it through
:class:`Store` (Polars frames); logs go in through :func:`ingest`.
"""

from adaptive_ft.store.db import DEFAULT_STORE, STORE_ENV, Store, resolve_store_path
from adaptive_ft.store.load import FileReport, IngestReport, ingest, ingest_users
from adaptive_ft.store.migrations import MIGRATIONS, Migration
from adaptive_ft.store.sources import FIELDS, FORMATS

__all__ = [
    "DEFAULT_STORE", "FIELDS", "FORMATS", "MIGRATIONS", "STORE_ENV", "FileReport", "IngestReport", "Migration",
    "Store", "ingest", "ingest_users", "resolve_store_path",
]
