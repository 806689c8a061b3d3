"""Ingest throughput against a bare DuckDB load of the same file, in one run.

Generates an N-event interaction log (default 5 million) as Parquet and as JSONL, then, each in its own
child process so peak RSS is measured per step (the child's own VmHWM):

* bare: ``CREATE TABLE t AS SELECT * FROM read_parquet(...)`` / ``read_json(...)`` into a fresh DuckDB
  file (the same storage the store uses), with the same memory_limit and threads as ingest;
* ingest: :func:`adaptive_ft.store.ingest` into a fresh store (validation, rejected rows, stable ids,
  examples/users upserts, de-duplication, one transaction).

The dirty case is the same log with 0.1% bad records (a quarter each: malformed JSON -- Parquet has none, so
there an unparseable value --, an unknown event type, a missing user_id, an unparseable timestamp) and 1%
duplicates (a line repeating the record 50 lines before it), as JSONL and as Parquet; its bare load reads the
file with ``ignore_errors=true`` (the only way DuckDB's JSON reader loads a file with a malformed line).

Prints events/s, the ratio ingest/bare, and peak RSS. Targets (issue 17): clean JSONL >= 0.8x, dirty files
>= 0.5x, Parquet >= 0.95x; peak RSS < 2 GiB.

    .venv/bin/python benchmarks/ingest.py                 # 5M events
    .venv/bin/python benchmarks/ingest.py --events 1000000 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_GENERATE = """
COPY (
  SELECT 'ev-' || i AS event_id,
         strftime(TIMESTAMP '2024-01-01' + to_seconds(i * 0.5), '%Y-%m-%dT%H:%M:%SZ') AS ts,
         'u' || (hash(i, 1) % 50000) AS user_id,
         ['free', 'pro', 'enterprise'][1 + (hash(i, 2) % 3)::INT] AS segment,
         'x' || (hash(i, 3) % 20000) AS example_id,
         ['billing', 'cards', 'transfers', 'account', 'security', 'loans', 'fx', 'other'][1 + ((hash(i, 3) % 20000) % 8)::INT] AS domain,
         'How do I solve problem number ' || (hash(i, 3) % 20000) || ' with my account?' AS prompt,
         CASE WHEN i % 5 = 0 THEN 'You can do that from the settings page.' END AS response,
         ['impression', 'impression', 'click', 'thumbs_up', 'thumbs_down', 'rating', 'escalate', 'resolve'][1 + (hash(i, 4) % 8)::INT] AS event,
         CASE WHEN hash(i, 4) % 8 = 5 THEN 1 + (hash(i, 5) % 5)::INT END AS value,
         'v1' AS model_version
  FROM range({n}) t(i)
) TO '{path}' ({opts})
"""

# The child's own peak RSS (VmHWM of its address space since exec). Not wait4's ru_maxrss: that also
# counts the parent's RSS at fork, and the parent holds DuckDB's memory from generating the logs.
_PEAK = """
def _peak_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
"""

_BARE = _PEAK + """
import duckdb, sys, time
path, db, reader, mem, threads = sys.argv[1:6]
con = duckdb.connect(db, config={"memory_limit": mem, **({"threads": int(threads)} if int(threads) else {})})
t0 = time.perf_counter()
source = f"read_json('{path}', ignore_errors=true)" if reader == "read_json_ignore_errors" else f"{reader}('{path}')"
con.execute(f"CREATE TABLE t AS SELECT * FROM {source}")
n = con.execute("SELECT count(*) FROM t").fetchall()[0][0]
con.close()
print(n, time.perf_counter() - t0, _peak_kib())
"""

_INGEST = _PEAK + """
import sys, time
from adaptive_ft.config import IngestConfig
from adaptive_ft.store import ingest
path, db, mem, threads, rejected, duplicate = sys.argv[1:7]
t0 = time.perf_counter()
r = ingest([path], store=db, config=IngestConfig(memory_limit=mem, threads=int(threads)))
f = r.files[0]
assert f.error is None and (f.rows_rejected, f.rows_duplicate) == (int(rejected), int(duplicate)), f
print(f.rows_ok + f.rows_rejected + f.rows_duplicate, time.perf_counter() - t0, _peak_kib())
"""

# Every 1000th record (offset 7) is bad, every 100th (offset 50) repeats the record 50 lines before it.
_DIRTY = """
COPY (
  WITH r AS (SELECT row_number() OVER () - 1 AS i, * FROM read_parquet('{src}')),
  j AS (SELECT i, CASE
          WHEN i % 1000 <> 7 THEN to_json(struct_pack(event_id, ts, user_id, segment, example_id, domain, prompt,
                                                      response, event, value, model_version))::VARCHAR
          WHEN (i // 1000) % 4 = 0 THEN {malformed}
          WHEN (i // 1000) % 4 = 1 THEN to_json(struct_pack(event_id, ts, user_id, example_id, domain, prompt,
                                                              event := 'purchase'))::VARCHAR
          WHEN (i // 1000) % 4 = 2 THEN to_json(struct_pack(event_id, ts, example_id, domain, prompt, event))::VARCHAR
          ELSE to_json(struct_pack(event_id, ts := 'last tuesday', user_id, example_id, domain, prompt, event))::VARCHAR
        END AS line FROM r)
  SELECT CASE WHEN a.i % 100 = 50 THEN b.line ELSE a.line END AS line
  FROM j a LEFT JOIN j b ON b.i = a.i - 50 ORDER BY a.i
) TO '{path}' (FORMAT csv, HEADER false, QUOTE '', ESCAPE '', DELIMITER '\x01')
"""


def generate(n: int, out: Path) -> tuple[Path, Path]:
    """Write the log as Parquet and JSONL with DuckDB (seconds, not minutes)."""
    import duckdb

    pq, js = out / f"log{n}.parquet", out / f"log{n}.jsonl"
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    if not pq.exists():
        con.execute(_GENERATE.format(n=n, path=pq, opts="FORMAT parquet"))
    if not js.exists():
        con.execute(f"COPY (SELECT * FROM read_parquet('{pq}')) TO '{js}' (FORMAT json)")
    return pq, js


def generate_dirty(n: int, out: Path, pq: Path) -> tuple[Path, Path, int, int]:
    """The dirty log (JSONL and Parquet) from the clean one; returns paths, bad and duplicate counts."""
    import duckdb

    djs, dpq = out / f"dirty{n}.jsonl", out / f"dirty{n}.parquet"
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    if not djs.exists():
        con.execute(_DIRTY.format(src=pq, path=djs, malformed="'{\"event_id\": \"' || event_id || '\", broken'"))
    if not dpq.exists():  # Parquet cannot hold malformed JSON: a value that is not a number instead
        tmp = out / f"dirty{n}.value.jsonl"
        con.execute(_DIRTY.format(src=pq, path=tmp, malformed="to_json(struct_pack(event_id, ts, user_id, example_id, "
                                  "domain, prompt, event := 'rating', value := 'lots'))::VARCHAR"))
        cols = "{" + ", ".join(f"'{c}': 'VARCHAR'" for c in ("event_id", "ts", "user_id", "segment", "example_id",
                               "domain", "prompt", "response", "event", "value", "model_version")) + "}"
        con.execute(f"COPY (SELECT * FROM read_json('{tmp}', format='newline_delimited', columns={cols})) "
                    f"TO '{dpq}' (FORMAT parquet)")
        tmp.unlink()
    return djs, dpq, sum(1 for i in range(n) if i % 1000 == 7), sum(1 for i in range(n) if i % 100 == 50)


def run_child(code: str, args: list[str]) -> tuple[int, float, float]:
    """Run ``code`` in a fresh Python; return (rows, seconds and peak RSS in GiB, as it reports them)."""
    proc = subprocess.run([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {code[:60]}... {args}\n{proc.stdout}")
    rows, seconds, peak_kib = proc.stdout.split()[-3:]
    return int(rows), float(seconds), int(peak_kib) / 2**20


def _fresh(path: Path) -> str:
    for p in (path, Path(f"{path}.wal")):
        p.unlink(missing_ok=True)
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=5_000_000)
    ap.add_argument("--repeat", type=int, default=1, help="alternate bare/ingest this many times; best time kept")
    ap.add_argument("--memory-limit", default="1GB")
    ap.add_argument("--threads", type=int, default=0, help="DuckDB threads for both (0 = all cores)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the logs and stores go (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="aft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pq, js = generate(args.events, work)
    print(f"log: {args.events:,} events; parquet {pq.stat().st_size / 2**20:.0f} MiB, jsonl "
          f"{js.stat().st_size / 2**20:.0f} MiB (generated in {time.perf_counter() - t0:.1f} s) in {work}")
    print(f"cpu cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.1f} "
          "(other work on the machine slows both sides alike)")
    djs, dpq, bad, dup = generate_dirty(args.events, work, pq)
    print(f"dirty log: {bad:,} bad records ({bad / args.events:.2%}), {dup:,} duplicates ({dup / args.events:.2%})")
    results = []
    cases = (("parquet", pq, "read_parquet", 0, 0, 0.95), ("jsonl", js, "read_json", 0, 0, 0.8),
             ("parquet dirty", dpq, "read_parquet", bad, dup, 0.5),
             ("jsonl dirty", djs, "read_json_ignore_errors", bad, dup, 0.5))
    for fmt, path, reader, n_bad, n_dup, target in cases:
        best: dict[str, tuple[int, float, float]] = {}
        for _ in range(args.repeat):
            common = [args.memory_limit, str(args.threads)]
            bare = run_child(_BARE, [str(path), _fresh(work / "bare.duckdb"), reader, *common])
            ours = run_child(_INGEST, [str(path), _fresh(work / "store.duckdb"), *common, str(n_bad), str(n_dup)])
            for name, r in (("bare", bare), ("ingest", ours)):
                if name not in best or r[1] < best[name][1]:
                    best[name] = (r[0], r[1], max(r[2], best.get(name, r)[2]))
        (nb, tb, mb), (ni, ti, mi) = best["bare"], best["ingest"]
        assert ni == args.events and (nb == ni or reader == "read_json_ignore_errors"), (nb, ni)
        row = {"format": fmt, "events": ni, "bare_s": tb, "bare_events_per_s": nb / tb, "bare_peak_rss_gib": mb,
               "ingest_s": ti, "ingest_events_per_s": ni / ti, "ingest_peak_rss_gib": mi, "ratio": tb / ti,
               "target": target}
        results.append(row)
        print(f"{fmt:13s} bare {nb / tb:>10,.0f} ev/s ({tb:6.1f} s, peak {mb:.2f} GiB) | ingest {ni / ti:>10,.0f} "
              f"ev/s ({ti:6.1f} s, peak {mi:.2f} GiB) | ratio {tb / ti:.2f}x, target {target}x "
              f"[{'ok' if tb / ti >= target and mi < 2 else 'MISSES TARGET'}]", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
