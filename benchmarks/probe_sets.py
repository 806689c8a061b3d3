"""Does the layer probe rank layer sets the way training does? (issue 15: the probe's Banking77 figures)

Reads the layer scores of one or more plan.json files (``adaptive-ft prioritize --model ...``) and, for the
10-layer sets whose Banking77 accuracy was measured by training (SmolLM2, 100 steps x 16, lr 4e-3, r 8,
300 test examples; the accuracies are in configs/banking77-smollm2.yaml), prints each set's sum of layer
scores and the Spearman correlation of those sums with the measured accuracies. A probe that picks layers
well ranks the sets as training does (Spearman near +1).

The one-step cell probe's own 10-layer choice (37.7%) is not in the list: its layer set was not recorded,
so by default the figure is over the 6 sets whose layers are known; ``--set`` adds a set.

    .venv/bin/python benchmarks/probe_sets.py plan.json
    .venv/bin/python benchmarks/probe_sets.py plan.json old-plan.json --k 6 --k 4:0.5
    .venv/bin/python benchmarks/probe_sets.py plan.json --set "cell probe:0,1,2,3,4,5,6,7,8,9:37.7"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (name, layers, measured accuracy in %): SmolLM2 on Banking77, 100 steps x 16, 300 test examples
MEASURED_SETS: list[tuple[str, list[int], float]] = [
    ("last 10 (20-29)", list(range(20, 30)), 54.7),
    ("layers 10-19", list(range(10, 20)), 38.7),
    ("layers 15-24", list(range(15, 25)), 50.0),
    ("every third from 2", list(range(2, 30, 3)), 53.3),
    ("odd 11-29", list(range(11, 30, 2)), 52.3),
    ("warm-up ablation top 10", [0, 13, 15, 22, 24, 25, 26, 27, 28, 29], 57.0),
]


def plan_scores(path: Path) -> np.ndarray:
    """(L,) layer scores from a plan.json's ``layers.scores``; a clear error when the plan has none."""
    plan = json.loads(path.read_text())
    rows = (plan.get("layers") or {}).get("scores") or []
    if not rows:
        sys.exit(f"{path}: no layer scores in this plan; write it with `adaptive-ft prioritize --model ...`")
    score = np.zeros(max(r["layer"] for r in rows) + 1)
    for r in rows:
        score[r["layer"]] = r["score"]
    return score


def parse_set(spec: str) -> tuple[str, list[int], float]:
    """``NAME:L1,L2,...:ACCURACY`` -> (name, layers, accuracy in %)."""
    try:
        name, layers, acc = spec.rsplit(":", 2)
        return name, [int(x) for x in layers.split(",")], float(acc)
    except ValueError:
        raise SystemExit(f"--set {spec!r}: expected NAME:L1,L2,...:ACCURACY, e.g. 'mine:20,21,22:50.3'") from None


def set_sums(score: np.ndarray, sets: list[tuple[str, list[int], float]]) -> list[float]:
    """Each set's sum of layer scores, in ``sets`` order."""
    return [float(score[layers].sum()) for _, layers, _ in sets]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("plans", type=Path, nargs="+", help="plan.json files with layer scores")
    ap.add_argument("--k", action="append", default=[], metavar="K[:WEIGHT]",
                    help="also print the layers these scores select for k (cost weight, default 1.0)")
    ap.add_argument("--set", action="append", default=[], dest="sets", metavar="NAME:LAYERS:ACC",
                    help="add a measured set, e.g. 'cell probe:0,3,5:37.7'")
    args = ap.parse_args()

    from adaptive_ft.prioritize.layers import select_layers

    sets = MEASURED_SETS + [parse_set(s) for s in args.sets]
    acc = [a for _, _, a in sets]
    scores = [plan_scores(p) for p in args.plans]
    sums = [set_sums(s, sets) for s in scores]
    width = max(len(n) for n, _, _ in sets)
    print(f"{'set':<{width}}  accuracy  " + "  ".join(f"{p.name:>14}" for p in args.plans))
    for i, (name, _, a) in enumerate(sets):
        print(f"{name:<{width}}  {a:7.1f}%  " + "  ".join(f"{s[i]:14.3f}" for s in sums))
    out = {}
    for p, s, sc in zip(args.plans, sums, scores):
        rho = float(spearmanr(s, acc).statistic)
        picks = {}
        for spec in args.k:
            k, _, w = spec.partition(":")
            picks[spec] = select_layers(sc, int(k), float(w or 1.0))[0]
        out[str(p)] = {"spearman": round(rho, 3), "sets": len(acc), "select": picks}
        print(f"{p}: Spearman {rho:+.3f} over {len(acc)} sets" +
              "".join(f"; k={spec}: {v}" for spec, v in picks.items()))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
