"""Does the plan find the planted need, and does CF beat popularity? Over 5 seeds, both example pools.

For each pool (the built-in support requests and Banking77) and seed: ``simulate`` a log, ``ingest`` it,
``prioritize`` it, then compare

* the plan's top-3 domains with the truth file's ``top_domains`` (the planted highest-need domains):
  precision@3 = |plan top 3 ∩ truth top 3| / 3. Target (issue 3): mean >= 0.9;
* NDCG@10 (and precision/recall/MAP@10) of the CF model vs the popularity baseline on the time-based
  hold-out the plan records. Target: ALS above popularity.

Runs at the simulator's default size (about 20k events, 400 users) and at a larger size (200k events,
2,000 users), since collaborative filtering needs enough interactions per user to beat popularity.

    .venv/bin/python benchmarks/plan_quality.py
    .venv/bin/python benchmarks/plan_quality.py --seeds 2 --sizes default
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {"default": None, "large": (2_000, 200_000)}


def run_one(pool: str, seed: int, size: str, work: Path, overrides: list[str]) -> dict:
    """simulate -> ingest -> prioritize for one pool / seed / size; the figures that matter."""
    from adaptive_ft.config import load_config
    from adaptive_ft.prioritize import prioritize
    from adaptive_ft.simulate import simulate
    from adaptive_ft.store import ingest

    cfg = load_config(None, overrides)
    cfg.seed = seed
    if SIZES[size]:
        cfg.simulate.users, cfg.simulate.events = SIZES[size]
    log = work / f"{pool}-{size}-{seed}.parquet"
    sim = simulate(cfg.simulate, log, fmt="parquet", pool=pool, seed=seed)
    store = work / f"{pool}-{size}-{seed}.duckdb"
    ingest([log], store)
    t = time.perf_counter()
    res = prioritize(store, cfg, work / f"{pool}-{size}-{seed}.plan.json")
    seconds = time.perf_counter() - t
    truth = json.loads(sim.truth_path.read_text())
    top = res.plan.domain_names[:3]
    rec = res.plan.recommender
    return {"pool": pool, "size": size, "seed": seed, "events": sim.n_events, "plan_top3": top,
            "truth_top3": truth["top_domains"][:3], "precision@3": len(set(top) & set(truth["top_domains"][:3])) / 3,
            "ndcg_als": rec["model"]["overall"]["ndcg"], "ndcg_pop": rec["popularity"]["overall"]["ndcg"],
            "map_als": rec["model"]["overall"]["map"], "map_pop": rec["popularity"]["overall"]["map"],
            "seconds": round(seconds, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--pools", default="builtin,banking77")
    ap.add_argument("--sizes", default="default,large")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            for pool in args.pools.split(","):
                for seed in range(args.seeds):
                    row = run_one(pool, seed, size, Path(tmp), args.overrides)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print("\nsummary (mean over seeds)")
    print(f"{'size':<8} {'pool':<10} {'precision@3':>11} {'NDCG@10 ALS':>12} {'NDCG@10 pop':>12} {'ALS wins':>9}")
    for size in args.sizes.split(","):
        for pool in args.pools.split(","):
            sel = [r for r in rows if r["pool"] == pool and r["size"] == size]
            p3 = sum(r["precision@3"] for r in sel) / len(sel)
            na = sum(r["ndcg_als"] for r in sel) / len(sel)
            npop = sum(r["ndcg_pop"] for r in sel) / len(sel)
            wins = sum(r["ndcg_als"] > r["ndcg_pop"] for r in sel)
            print(f"{size:<8} {pool:<10} {p3:>11.3f} {na:>12.4f} {npop:>12.4f} {wins:>5}/{len(sel)}")


if __name__ == "__main__":
    main()
