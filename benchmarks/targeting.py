"""The comparison that justifies the product: does training where the logs say users need it beat training
on everything, at the same step budget?

Per seed, on Banking77 logs from `simulate` (need planted in some segments x domains):

  (a) plan      the plan's weighted example sample and its selected layers
  (b) uniform   a uniform sample over the examples, LoRA on all layers
  (c) uniform+L a uniform sample, LoRA on the plan's layers

each trained for the same number of steps from the same base, on the same split, then evaluated on the same
test split. Reported as mean ± sd over seeds:

  need-weighted accuracy   sum over segment x domain of planted need x accuracy / sum of need (cells with traffic)
  high-need accuracy       accuracy on the test traffic of the two segments with the most planted need
  worst segment            the lowest per-segment accuracy
  train s                  wall-clock seconds of the training loop

Run:  .venv/bin/python benchmarks/targeting.py --seeds 3 --steps 150      (SmolLM2-135M-Instruct, ~1-2 h on 2 cores)
      .venv/bin/python benchmarks/targeting.py --quick                    (tiny model, built-in pool, minutes)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import polars as pl

from adaptive_ft.config import load_config
from adaptive_ft.evaluate import evaluate
from adaptive_ft.finetune import train
from adaptive_ft.models import build_tiny_model
from adaptive_ft.prioritize import prioritize
from adaptive_ft.prioritize.plan import DomainScore, Plan
from adaptive_ft.simulate import find_banking77, simulate
from adaptive_ft.store import Store, ingest

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("plan", "uniform", "uniform+plan-layers")


def uniform_plan(plan: Plan, store: Path, with_layers: bool) -> Plan:
    """Same domains as ``plan``, every example equally likely (domain share = its example count)."""
    with Store.open(store, read_only=True) as s:
        counts = dict(s.examples().group_by("domain").len().iter_rows())
    domains = [DomainScore(domain=d.domain, priority=1.0, share=float(counts.get(d.domain, 0))) for d in plan.domains]
    return Plan(domains=domains, layers=plan.layers if with_layers else None, inputs={"derived_from": "plan"})


def need_weighted(ev: dict, model: str, truth: dict) -> tuple[float, float, float]:
    """(need-weighted accuracy, accuracy on the two highest-need segments, worst-segment accuracy)."""
    cells = {(m["segment"], m["domain"]): m for m in ev["metrics"]
             if m["model"] == model and m["scope"] == "segment_domain" and m["metric"] == "accuracy"}
    num = den = 0.0
    for row in truth["need"]:
        c = cells.get((row["segment"], row["domain"]))
        if c and c.get("value") is not None and c["n"] > 0:
            num += row["need"] * c["value"]
            den += row["need"]
    seg_need: dict[str, float] = {}
    for row in truth["need"]:
        seg_need[row["segment"]] = seg_need.get(row["segment"], 0.0) + row["need"]
    top = sorted(seg_need, key=seg_need.get, reverse=True)[:2]
    segs = {m["segment"]: m for m in ev["metrics"]
            if m["model"] == model and m["scope"] == "segment" and m["metric"] == "accuracy"}
    hi = [segs[s] for s in top if s in segs and segs[s].get("value") is not None]
    high = sum(c["value"] * c["n"] for c in hi) / max(1, sum(c["n"] for c in hi))
    worst = min((c["value"] for c in segs.values() if c.get("value") is not None), default=float("nan"))
    return num / den if den else float("nan"), high, worst


def run_seed(seed: int, args: argparse.Namespace, work: Path) -> dict[str, dict[str, float]]:
    cfg = load_config(args.config, [f"seed={seed}", f"train.max_steps={args.steps}", "train.patience=0",
                                    f"train.eval_every={args.steps}", f"train.checkpoint_every={args.steps}",
                                    *args.set])
    w = work / f"seed{seed}"
    w.mkdir(parents=True, exist_ok=True)
    pool = "builtin" if args.quick else find_banking77()
    sim = simulate(cfg.simulate, w / "logs.parquet", "parquet", pool=pool, seed=seed)
    truth = json.loads(sim.truth_path.read_text())
    store = w / "store.duckdb"
    if store.exists():
        store.unlink()
    ingest([sim.log_path], store=store, config=cfg.ingest)
    model = args.model
    if args.quick:
        ex = pl.read_parquet(sim.log_path).select("prompt", "reference").unique()
        model = str(build_tiny_model(w / "tiny", texts=ex["prompt"].to_list() + ex["reference"].to_list(),
                                     n_layers=4, seed=seed))
    plan = prioritize(store, cfg, w / "plan.json", model=model).plan
    plans = {"plan": w / "plan.json"}
    plans["uniform"] = uniform_plan(plan, store, with_layers=False).save(w / "plan-uniform.json")
    plans["uniform+plan-layers"] = uniform_plan(plan, store, with_layers=True).save(w / "plan-uniform-layers.json")
    out: dict[str, dict[str, float]] = {}
    for arm in ARMS:
        run = w / f"run-{arm}"
        t = time.perf_counter()
        tr = train(cfg, store, plans[arm], model, run)
        wall = time.perf_counter() - t
        ev = evaluate(store, [str(run)], w / f"eval-{arm}.json", cfg.evaluate, run=run).data
        nw, high, worst = need_weighted(ev, ev["models"][0], truth)
        out[arm] = {"need_weighted": nw, "high_need": high, "worst_segment": worst,
                    "train_s": tr.train_seconds, "wall_s": wall, "layers": len(tr.layers)}
        print(f"seed {seed} {arm:<22} need-weighted {nw:.3f}  high-need {high:.3f}  worst {worst:.3f}  "
              f"train {tr.train_seconds:.0f} s  ({len(tr.layers)} layers)", flush=True)
    return out


def table(results: list[dict[str, dict[str, float]]]) -> str:
    def ms(arm: str, key: str, scale: float = 100.0) -> str:
        vals = [r[arm][key] * scale for r in results]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.1f} ± {sd:.1f}"

    rows = ["| arm | need-weighted acc % | high-need segments acc % | worst segment acc % | train s |",
            "|---|---|---|---|---|"]
    for arm in ARMS:
        rows.append(f"| {arm} | {ms(arm, 'need_weighted')} | {ms(arm, 'high_need')} | "
                    f"{ms(arm, 'worst_segment')} | {ms(arm, 'train_s', 1.0)} |")
    gain = [r["plan"]["need_weighted"] - r["uniform"]["need_weighted"] for r in results]
    time_ratio = [r["plan"]["train_s"] / r["uniform"]["train_s"] for r in results]
    rows.append("")
    rows.append(f"(a) - (b) need-weighted: {100 * statistics.mean(gain):+.1f} points; "
                f"(a)/(b) train time: {statistics.mean(time_ratio):.2f}x  "
                f"(target: >= +5 points at <= 0.7x)")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--config", default=str(ROOT / "configs/banking77-smollm2.yaml"))
    ap.add_argument("--quick", action="store_true", help="tiny in-process model on the built-in pool")
    ap.add_argument("--work", default=str(ROOT / "benchmarks/out/targeting"))
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value config overrides")
    args = ap.parse_args(argv)
    if args.quick:
        args.config = str(ROOT / "configs/tiny.yaml")
    results = [run_seed(seed, args, Path(args.work)) for seed in range(args.seeds)]
    print()
    print(table(results))
    Path(args.work, "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
