"""How well does completing half-probed domain x layer sensitivity recover the full probe? (issue 3, item 3)

On a small real model (SmolLM2-135M-Instruct, 30 layers; or --model) with Banking77 queries grouped into
the simulator's 8 domains: probe *every* (domain, layer) cell with the trial-LoRA loss-drop probe of
:mod:`adaptive_ft.prioritize.layers`, then, for several random half masks, complete the unprobed cells
from the probed ones and report

* Spearman(completed, full probe) over the unprobed cells only (the honest figure) and over all cells;
* the overlap of the top-k layers chosen from the completed matrix with those chosen from the full one;
* with --self-check, the probe's own noise: Spearman between two full probes with different trial-LoRA
  seeds (no completion can be expected to agree with a probe better than the probe agrees with itself).

Target: Spearman >= 0.8 with half the cells probed.

    .venv/bin/python benchmarks/layer_completion.py                   # smollm2, 8 domains
    .venv/bin/python benchmarks/layer_completion.py --threads 1 --domains 6 --examples 2 --steps 2   # ~40 min here
    .venv/bin/python benchmarks/layer_completion.py --model /path/to/tiny --domains 4
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def banking77_examples(n_domains: int, per_domain: int, seed: int) -> dict[str, list[tuple[str, str]]]:
    """(query, intent) pairs per simulator domain, a seeded sample of ``per_domain`` each."""
    from adaptive_ft.simulate import BANKING77_INTENT_DOMAIN, find_banking77

    rows: dict[str, list[tuple[str, str]]] = {}
    with open(find_banking77(), newline="") as f:
        for r in csv.DictReader(f):
            rows.setdefault(BANKING77_INTENT_DOMAIN[r["category"]], []).append((r["text"], r["category"]))
    rng = np.random.default_rng(seed)
    out = {}
    for dom in sorted(rows)[:n_domains]:
        pick = rng.choice(len(rows[dom]), per_domain, replace=False)
        out[dom] = [rows[dom][i] for i in pick]
    return out


def full_probe(model, tok, examples, args, seed: int) -> np.ndarray:
    from adaptive_ft.prioritize.layers import probe_layers

    res = probe_layers(model, tok, examples, np.ones(len(examples)), fraction=1.0, rank=args.rank, steps=args.steps,
                       lr=args.lr, targets=args.targets.split(","), completion_rank=1, k=args.k, cost_weight=0.0,
                       base_rank=8, by_score=False, seed=seed, progress=True)
    return res.values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--domains", type=int, default=8)
    ap.add_argument("--examples", type=int, default=4, help="examples per domain in a probe")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--masks", type=int, default=5)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    ap.add_argument("--self-check", action="store_true", help="probe everything twice (seeds 0, 1): the probe's noise")
    args = ap.parse_args()

    import torch

    from adaptive_ft.lm.models import load_model
    from adaptive_ft.prioritize.layers import choose_cells, complete, layer_scores, select_layers, spearman

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    examples = banking77_examples(args.domains, args.examples, seed=0)
    t = time.perf_counter()
    full = full_probe(model, tok, examples, args, seed=0)
    probe_s = time.perf_counter() - t
    again = full_probe(model, tok, examples, args, seed=1) if args.self_check else None
    shares = np.ones(full.shape[0])
    top_full, _ = select_layers(layer_scores(full, shares), args.k, 0.0)
    rows = []
    for m in range(args.masks):
        mask = choose_cells(*full.shape, 0.5, seed=100 + m)
        filled = complete(np.where(mask, full, 0.0), mask, rank=1)
        top, _ = select_layers(layer_scores(filled, shares), args.k, 0.0)
        rows.append({"mask": m, "probed": int(mask.sum()), "spearman_unprobed": spearman(filled[~mask], full[~mask]),
                     "spearman_all": spearman(filled.ravel(), full.ravel()),
                     "topk_overlap": len(set(top) & set(top_full)) / args.k})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"full": full.tolist(), "masks": rows}))
    out = {
        "model": args.model, "shape": list(full.shape), "probe_seconds_full": round(probe_s, 1),
        "probe_self_spearman": None if again is None else spearman(full.ravel(), again.ravel()),
        "mean_spearman_unprobed": float(np.mean([r["spearman_unprobed"] for r in rows])),
        "mean_spearman_all": float(np.mean([r["spearman_all"] for r in rows])),
        "mean_topk_overlap": float(np.mean([r["topk_overlap"] for r in rows])),
        "top_layers_full": top_full,
        "layer_score_full": [round(float(x), 3) for x in layer_scores(full, shares)],
    }
    print(json.dumps(out, indent=2))
    if args.out:
        args.out.write_text(json.dumps({**out, "masks": rows, "full": full.tolist()}, indent=2))


if __name__ == "__main__":
    main()
