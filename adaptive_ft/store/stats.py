"""What is in a store: totals, time range, traffic per segment x domain x event type, rejected records."""

from __future__ import annotations

from typing import Any

from adaptive_ft.store.db import Store


def store_stats(st: Store, top_reasons: int = 20) -> dict[str, Any]:
    """A JSON-ready summary of the store (``adaptive-ft stats --json`` prints exactly this)."""
    con = st.con
    n_events, t_min, t_max = con.execute("SELECT count(*), min(ts), max(ts) FROM events").fetchall()[0]
    counts = st.segment_domain_counts()
    rejected = st.sql(
        """SELECT split_part(reason, ':', 1) AS kind, count(*) AS n, min(reason) AS example,
                  min(batch_id) AS first_batch FROM rejected GROUP BY kind ORDER BY n DESC, kind"""
    )
    batches = st.sql(
        """SELECT batch_id, source, format, rows_ok, rows_duplicate, rows_rejected, rows_skipped,
                  round(seconds, 3) AS seconds FROM batches ORDER BY batch_id"""
    )
    return {
        "store": str(st.path),
        "schema_version": st.schema_version(),
        "fingerprint": st.fingerprint(),
        "events": int(n_events),
        "users": int(con.execute("SELECT count(*) FROM users").fetchall()[0][0]),
        "examples": int(con.execute("SELECT count(*) FROM examples").fetchall()[0][0]),
        "time_range": [t_min.isoformat() if t_min else None, t_max.isoformat() if t_max else None],
        "counts": counts.to_dicts(),
        "rejected": {
            "total": int(rejected["n"].sum()) if rejected.height else 0,
            "by_reason": rejected.head(top_reasons).to_dicts(),
        },
        "batches": batches.to_dicts(),
    }
