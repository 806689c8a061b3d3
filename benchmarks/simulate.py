"""How fast ``adaptive-ft simulate`` writes logs: events/s and peak memory per format, each in its own process.

    python benchmarks/simulate.py                  # 1M events, every format, built-in pool
    python benchmarks/simulate.py --events 5000000 --formats parquet --pool banking77

Each format runs in a fresh interpreter so its peak RSS is its own; the time is the library call
(``SimulateResult.seconds``: planting, sampling, answering, feedback, writing), not interpreter start-up.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = """
import json, resource, sys
from adaptive_ft.config import SimulateConfig
from adaptive_ft.simulate import simulate
events, users, fmt, pool, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
res = simulate(SimulateConfig(events=events, users=users), out, fmt=fmt, pool=pool, seed=0)
print(json.dumps({"events": res.n_events, "seconds": res.seconds,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_one(events: int, users: int, fmt: str, pool: str, folder: Path) -> dict:
    """One format in a child process; returns its events, seconds, peak RSS and file size."""
    out = folder / f"bench.{fmt}"
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(events), str(users), fmt, pool, str(out)],
                          capture_output=True, text=True, check=True)
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["mib"] = out.stat().st_size / 2**20
    out.unlink()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--formats", default="parquet,jsonl,csv,chat")
    ap.add_argument("--pool", default="builtin", help="builtin | banking77 | a CSV path")
    args = ap.parse_args()
    print(f"simulate: ~{args.events:,} events, {args.users:,} users, pool {args.pool}")
    print(f"{'format':<8} {'events':>11} {'seconds':>8} {'events/s':>11} {'peak RSS':>10} {'file':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats.split(","):
            r = run_one(args.events, args.users, fmt, args.pool, Path(tmp))
            print(f"{fmt:<8} {r['events']:>11,} {r['seconds']:>8.2f} {r['events'] / r['seconds']:>11,.0f} "
                  f"{r['peak_rss_mib']:>7,.0f} MiB {r['mib']:>6,.0f} MiB")


if __name__ == "__main__":
    main()
