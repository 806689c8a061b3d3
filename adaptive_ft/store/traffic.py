"""Who asked what: queries per (example, segment), from the store's events (evaluation's and review's weights)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from adaptive_ft.store.db import Store


def load_traffic(store: str | Path | None, query_events: list[str]) -> pl.DataFrame:
    """Queries per (example_id, segment) from the store's events; ``query_events`` count as one query each."""
    if store is None:
        return pl.DataFrame(schema={"example_id": pl.String, "segment": pl.String, "n": pl.Int64})
    with Store.open(store, read_only=True) as s:
        events = s.events().select("example_id", "segment", "event")
    queries = events.filter(pl.col("event").is_in(query_events))
    if queries.height == 0:  # logs without impressions: every event stands for one query
        queries = events
    return queries.group_by("example_id", "segment").agg(n=pl.len().cast(pl.Int64))
