"""What evaluating a model on a label task costs, against one teacher-forced pass over the same test prompts.

Per model (the base, and a train run's adapter with ``--run``), loaded once, on the same seeded sample of a test
split (the run's own with ``--run``, else Banking77's: ``train.test_fraction`` 0.2 of the 77-intent data, seed 0),
three timings in one process:

* forced: one teacher-forced pass over the test prompts + references (``lm.answers.forced_answers``), the
  peer, timed first and last (their mean);
* now: the answers ``evaluate`` takes (``lm.answers.label_responses``: the forced pass, then decoding on from
  its KV cache only the examples that may still name a label, each only until its label is decided);
* before: the previous way (the forced pass, then every rejected example decoded to ``max_new_tokens``).

It prints each cost as a multiple of the forced pass, and checks that now and before name the same label on
every example (they must: the shortcut is exact).

    .venv/bin/python benchmarks/evaluate.py                                   # base model, 400 test prompts
    .venv/bin/python benchmarks/evaluate.py --run demo-out/run --examples 0   # + a run's adapter, whole split
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy-waiting OpenMP threads crawl on a shared machine

import polars as pl  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptive_ft.lm import answers as E  # noqa: E402
from adaptive_ft.config import EvaluateConfig  # noqa: E402


def test_split(examples: int, seed: int, run: str | None) -> tuple[pl.DataFrame, list[str]]:
    """The seeded test sample and the label set (what ``evaluate`` takes: every reference of the split)."""
    from adaptive_ft.finetune.data import split_examples
    from adaptive_ft.simulate import load_pool

    if run:
        split = pl.read_parquet(Path(run) / "split.parquet")
    else:
        split = split_examples(load_pool("banking77").frame, 0.1, 0.2, seed)
    test = split.filter(pl.col("split") == "test")
    if 0 < examples < test.height:
        test = test.sample(examples, seed=seed).sort("example_id")
    return test, sorted(split["reference"].unique().to_list())


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def bench_model(name: str, spec: str, test: pl.DataFrame, labels: list[str], cfg: EvaluateConfig,
                system: str) -> dict:
    from adaptive_ft.lm.models import load_any
    from adaptive_ft.lm.tokens import format_for_model

    model, tok = load_any(spec)
    model.eval()
    prompts = [format_for_model(tok, p, {"system_prompt": system}) for p in test["prompt"].to_list()]
    refs = test["reference"].to_list()
    index = {label: i for i, label in enumerate(labels)}
    E.forced_answers(model, tok, prompts[:cfg.batch_size], refs[:cfg.batch_size], cfg.batch_size,
                     cfg.max_new_tokens)  # warm-up: first-call allocations are nobody's cost
    forced, t_forced = timed(E.forced_answers, model, tok, prompts, refs, cfg.batch_size, cfg.max_new_tokens)
    now, t_now = timed(E.label_responses, model, tok, prompts, refs, labels, cfg.batch_size, cfg.max_new_tokens,
                       desc=name)

    def before_path() -> list[str]:
        answers = E.forced_answers(model, tok, prompts, refs, cfg.batch_size, cfg.max_new_tokens)
        todo = [i for i, a in enumerate(answers) if a is None]
        for i, text in zip(todo, E.generate(model, tok, [prompts[i] for i in todo], cfg.max_new_tokens,
                                            cfg.batch_size, desc=f"{name}, before")):
            answers[i] = text
        return answers

    before, t_before = timed(before_path)
    _, t_again = timed(E.forced_answers, model, tok, prompts, refs, cfg.batch_size, cfg.max_new_tokens)
    t_forced = (t_forced + t_again) / 2  # the peer before and after the others: the machine is shared
    named_now = [E.parse_label(r, index) for r in now]
    named_before = [E.parse_label(r, index) for r in before]
    return {
        "model": name, "examples": len(prompts), "forced_s": round(t_forced, 2), "now_s": round(t_now, 2),
        "before_s": round(t_before, 2), "now_x_forced": round(t_now / t_forced, 3),
        "before_x_forced": round(t_before / t_forced, 3),
        "accuracy": round(sum(a == r for a, r in zip(named_now, refs)) / len(refs), 4),
        "forced_right": sum(f is not None for f in forced),
        "same_labels": named_now == named_before,
        "differing": [i for i, (a, b) in enumerate(zip(named_now, named_before)) if a != b][:10],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=400, help="seeded sample of the test split; 0 = all")
    ap.add_argument("--run", default=None, help="a train RUN (SmolLM2 base + adapter) to time beside the base")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="evaluate.KEY=VALUE")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from adaptive_ft.config import load_config
    from adaptive_ft.lm.models import resolve_model

    cfg = load_config(None, args.overrides).evaluate
    test, labels = test_split(args.examples, args.seed, args.run)
    specs = [("base", str(resolve_model("smollm2")), "")]
    if args.run:
        manifest = json.loads((Path(args.run) / "manifest.json").read_text())
        specs.append((args.run, args.run, manifest.get("system_prompt", "")))
    rows = [bench_model(name, spec, test, labels, cfg, system) for name, spec, system in specs]
    print(f"\n{len(test)} test prompts ({args.run or 'Banking77'}), batch {cfg.batch_size}, "
          f"max_new_tokens {cfg.max_new_tokens}, {torch.get_num_threads()} threads")
    print(f"{'model':<28}{'forced s':>9}{'now s':>8}{'now/forced':>11}{'before s':>9}{'before/forced':>14}"
          f"{'acc':>7}{'same':>6}")
    for r in rows:
        print(f"{r['model'][-28:]:<28}{r['forced_s']:>9.1f}{r['now_s']:>8.1f}{r['now_x_forced']:>11.2f}"
              f"{r['before_s']:>9.1f}{r['before_x_forced']:>14.2f}{100 * r['accuracy']:>6.1f}%"
              f"{'yes' if r['same_labels'] else 'NO':>6}")
    for r in rows:
        met = r["now_x_forced"] <= 1.5
        print(f"{'met ' if met else 'MISS'}  {r['model']}: evaluating <= 1.5x one teacher-forced pass "
              f"({r['now_x_forced']:.2f}x; before {r['before_x_forced']:.2f}x)")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
