"""Size on disk and CPU latency per generated token of every export variant, beside the merged fp32 model.

One run builds (or takes) a train run, exports merged, int8, nf4, GGUF Q8_0 and F16 through
``adaptive_ft.export.export`` — the same code the CLI runs — and prints each variant's figures and its ratio to
merged fp32. Latency is greedy decoding, batch 1, KV cache on, wall clock on this machine's CPU threads.

In the same run it rebuilds the earlier nf4 (what bitsandbytes does not quantize kept in fp32: ``nf4-fp32``)
beside today's (those weights in bfloat16), so the two sizes, agreements and, with ``--accuracy N``, the task
accuracies on N test examples of the run's split (``adaptive_ft.evaluate``, as ``adaptive-ft evaluate`` scores
them) sit side by side. Each GGUF file's llama.cpp check (``answer agree``: greedy answers equal to the merged
model's) is printed where llama-cpp-python is installed.

    .venv/bin/python benchmarks/export.py                 # a tiny Llama (4 layers, hidden 256), seconds
    .venv/bin/python benchmarks/export.py --smollm2       # SmolLM2-135M-Instruct + a random LoRA (minutes)
    .venv/bin/python benchmarks/export.py --run runs/r1 --accuracy 400   # an existing train run, and accuracy
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptive_ft.config import EvaluateConfig, ExportConfig  # noqa: E402
from adaptive_ft.export import export, measure_variants, probe_prompts, quantize_bnb  # noqa: E402
from adaptive_ft.lm.models import read_run  # noqa: E402

NF4_STORAGE = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_run(root: Path, base: Path, seed: int = 0) -> Path:
    """A train-run folder around ``base`` with a random non-zero LoRA (r=16, all linear layers)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    run = root / "run"
    model.save_pretrained(run / "adapter")
    (run / "manifest.json").write_text(json.dumps({"base_model": str(base), "base_model_path": str(base),
                                                   "task": "label", "seed": seed}))
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct instead of the tiny model")
    parser.add_argument("--run", type=Path, default=None, help="benchmark this existing train run")
    parser.add_argument("--out", type=Path, default=None, help="keep the export here (default: a temp folder)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per timed prompt")
    parser.add_argument("--nf4-baselines", default="fp32",
                        help="comma list of fp32,fp16,bf16: nf4 rebuilt with its unquantized weights stored so")
    parser.add_argument("--probes", type=int, default=8,
                        help="probe prompts (top-1 agreement for every variant; llama.cpp's answers for GGUF)")
    parser.add_argument("--accuracy", type=int, default=0,
                        help="also score merged and every nf4 on this many test examples of the run (label runs): "
                             "one teacher-forced pass per model, an answer right when greedy decoding would give "
                             "the reference token for token (evaluate.decode_rejected=false)")
    parser.add_argument("--accuracy-only", action="store_true",
                        help="skip the export: score the variants already in --out (an earlier run of this script)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = args.run
        if run is None:
            if args.smollm2:
                from adaptive_ft.lm.models import resolve_model

                base = resolve_model("smollm2")
            else:
                from adaptive_ft.lm.models import build_tiny_model

                base = build_tiny_model(root / "base", n_layers=4, hidden=256, heads=8, kv_heads=4)
            run = make_run(root, base)
        out = args.out or root / "export"
        if args.accuracy_only:
            names = [p.name for p in sorted(out.iterdir()) if p.name == "merged" or p.name.startswith("nf4")]
            accuracy(run, out, [n for n in names if n != "nf4-fp16"], args.accuracy, root)
            return
        cfg = ExportConfig(probe_prompts=args.probes, latency_prompts=3, latency_tokens=args.tokens)
        start = time.perf_counter()
        result = export(run, out, cfg)
        took = time.perf_counter() - start
        variants = result.variants + nf4_baselines(run, out, cfg, [b for b in args.nf4_baselines.split(",") if b])
        report(variants, run, took, args.threads)
        if args.accuracy:
            accuracy(run, out, [v.name for v in variants if v.name == "merged" or v.name.startswith("nf4")],
                     args.accuracy, root)


def nf4_baselines(run: Path, out: Path, cfg: ExportConfig, storages: list[str]) -> list:
    """nf4 rebuilt from EXPORT/merged with its unquantized weights stored as ``storages`` say, measured the way
    export measures its own variants (against the merged model, on the same probe prompts)."""
    from transformers import AutoTokenizer

    written = []
    for storage in storages:
        name = f"nf4-{storage}"
        quantize_bnb(out / "merged", out / name, "nf4", half_unquantized=NF4_STORAGE[storage])
        written.append((name, name, "hf"))
    if not written:
        return []
    probes = probe_prompts(run, AutoTokenizer.from_pretrained(out / "merged"), cfg.probe_prompts, read_run(run))
    return measure_variants(out, [("merged", "merged", "hf")] + written, probes, cfg)[1:]


def accuracy(run: Path, out: Path, names: list[str], n: int, root: Path) -> None:
    """Task accuracy (exact label match per example) of each variant on the same ``n`` seeded test examples."""
    from adaptive_ft.evaluate import evaluate

    specs = [str(out / name) for name in names]
    start = time.perf_counter()
    cfg = EvaluateConfig(max_examples=n, bootstrap=200, decode_rejected=False)
    data = evaluate(None, specs, root / "eval.json", cfg, run=run).data
    rows = {m["model"]: m for m in data["metrics"] if m["scope"] == "overall" and m["metric"] == data["primary_metric"]}
    print(f"\n{data['primary_metric']} on {data['n_test_examples']} test examples of {run} "
          f"({time.perf_counter() - start:.0f} s)")
    for name, spec in zip(names, specs):
        m = rows[spec]
        print(f"  {name:<10} {100 * m['value']:6.2f}%  [{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}]")


def report(variants: list, run: Path, took: float, threads: int) -> None:
    merged = next(v for v in variants if v.name == "merged")
    print(f"\nexport of {run} ({took:.0f} s), CPU, {threads} threads, torch {torch.__version__}")
    print(f"{'variant':<11} {'size MB':>9} {'x merged':>9} {'ms/token':>9} {'x merged':>9} {'load s':>7} "
          f"{'top-1 agree':>11} {'answer agree':>12}  verified by")
    for v in variants:
        answers = f"{100 * v.answer_agreement:>11.1f}%" if v.answer_agreement is not None else f"{'-':>12}"
        print(f"{v.name:<11} {v.size_bytes / 2**20:>9.2f} {v.size_bytes / merged.size_bytes:>9.3f} "
              f"{v.ms_per_token:>9.2f} {v.ms_per_token / merged.ms_per_token:>9.2f} {v.load_seconds:>7.2f} "
              f"{100 * v.agreement:>10.1f}% {answers}  {', '.join(v.verified_by)}"
              + (f" ({v.verify_error})" if v.verify_error else ""))
    for runtime in dict.fromkeys(v.runtime for v in variants):
        print(f"  {', '.join(v.name for v in variants if v.runtime == runtime)}: {runtime}")
    print("  (latency is wall clock on this machine's CPU while it runs: compare within one run, not across runs)")


if __name__ == "__main__":
    main()
