"""Training speed and accuracy against the plain transformers ``Trainer`` + peft, in one run.

Five ways to fine-tune the same base on the same training split, with the same batch size:

  trainer       transformers.Trainer + peft, LoRA on all layers, the model's default chat template
  aft-all       adaptive-ft train, all layers (train.precision auto: bf16 autocast where the CPU has it)
  aft-all-fp32  the same in fp32
  aft-plan      adaptive-ft train, the plan's k selected layers (--plan plan.json, or --plan-layers)
  aft-last      adaptive-ft train, the last k layers (LLaMA-Factory's freeze_trainable_layers, Unsloth's
                finetune_last_n_layers)

Each runs ``--steps`` optimizer steps (equal steps), and the ``--equal-time`` variants (default: the plan's
layers) run again for the Trainer's training time (equal wall-clock time). Every run is a separate process,
so peak memory is its own. The ceiling is measured in the same run, before and after the variants: the real
tokens/s a step would reach if it were only its necessary matmuls, timed at the model's shapes (fp32, and bf16
where the CPU has it natively). Printed per run: examples/s, real (non-padding) tokens/s, its share of the
fp32 ceiling, peak memory, and exact-match accuracy on the
held-out test split (teacher-forced: every answer token is the argmax, which is exactly when greedy
decoding reproduces the reference and stops; each model is asked in the format it was trained with).

\b
    .venv/bin/python benchmarks/train.py                                   # SmolLM2 + Banking77, 150 x 16
    .venv/bin/python benchmarks/train.py --steps 20 --test-examples 200    # a reduced run
    .venv/bin/python benchmarks/train.py --plan plan.json                  # layers from `adaptive-ft prioritize`
    .venv/bin/python benchmarks/train.py --model tiny --steps 5            # smoke test
    .venv/bin/python benchmarks/train.py --score-run RUN --test-examples 0 # accuracy of one run's adapter
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adaptive_ft import spin_openmp_threads  # noqa: E402

# what the CLI sets before torch loads, for every variant and the ceiling (the Trainer's run too);
# OMP_WAIT_POLICY=PASSIVE in the environment measures without it
spin_openmp_threads()

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("trainer", "aft-all", "aft-all-fp32", "aft-plan", "aft-last")


# --------------------------------------------------------------------------------------------- data


def banking77_examples() -> pl.DataFrame:
    """example_id, domain, prompt, reference for Banking77 (intent name as the reference)."""
    from adaptive_ft.simulate import load_pool

    return load_pool("banking77").frame


def tiny_model(workdir: Path, examples: pl.DataFrame) -> str:
    from adaptive_ft.lm.models import build_tiny_model

    folder = workdir / "tiny-model"
    if not (folder / "config.json").is_file():
        build_tiny_model(folder, texts=list(examples["prompt"][:2000]) + list(examples["reference"].unique()),
                         n_layers=4, hidden=64)
    return str(folder)


def split(examples: pl.DataFrame, seed: int) -> pl.DataFrame:
    from adaptive_ft.finetune.data import split_examples

    return split_examples(examples, 0.1, 0.2, seed)


# --------------------------------------------------------------------------------------------- accuracy


@torch.no_grad()
def exact_match(model: Any, tok: Any, test: pl.DataFrame, system: str | None, batch: int = 32) -> float:
    """Share of test examples whose every answer token (and the end token) is the model's argmax."""
    from adaptive_ft.lm import tokens as tk

    T = importlib.import_module("adaptive_ft.finetune.trainer")
    enc = tk.encode_all(tok, test, 256, system)
    order = np.argsort([len(e.ids) for e in enc])
    right = 0
    model.eval()
    for i in range(0, len(order), batch):
        items = [enc[j] for j in order[i:i + batch]]
        b = tk.collate(items, tok.pad_token_id)
        wrong = (tk.answer_logits(model, b["input_ids"], b["predict_pos"]).argmax(-1) != b["targets"]).float()
        per_row = torch.zeros(len(items)).index_add_(0, b["row"], wrong)
        right += int((per_row == 0).sum())
    return right / len(enc)


# --------------------------------------------------------------------------------------------- the ceiling


def linear_shapes(config: dict[str, Any]) -> list[tuple[int, int]]:
    """(in, out) of one decoder layer's Linear layers (attention q, k, v, o; MLP gate, up, down)."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    head = config.get("head_dim") or h // config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    return [(h, h), (h, kv * head), (h, kv * head), (h, h), (h, inter), (h, inter), (inter, h)]


def matmul_seconds(shapes: list[tuple[int, int]], rows: int, dtype: torch.dtype, backward: bool = True,
                   repeat: int = 15) -> float:
    """Median time of ``x @ W^T`` (and the input gradient ``g @ W``) for each (in, out) at ``rows`` rows."""
    ws = [torch.randn(o, i, dtype=dtype) for i, o in shapes]
    xs = [torch.randn(rows, i, dtype=dtype) for i, _ in shapes]
    gs = [torch.randn(rows, o, dtype=dtype) for _, o in shapes]
    times = []
    for _ in range(repeat + 2):
        t = time.perf_counter()
        for w, x, g in zip(ws, xs, gs):
            torch.nn.functional.linear(x, w)
            if backward:
                torch.mm(g, w)
        times.append(time.perf_counter() - t)
    return float(np.median(times[2:]))


def ceiling(model_dir: str, tokens: int, answers: int, dtype: torch.dtype) -> dict[str, float]:
    """Real tokens/s if a training step were only its necessary matmuls, timed here at the model's shapes.

    A step of LoRA on every layer of a frozen base needs, per real token, each decoder Linear forward and its
    input gradient (no weight gradient: the base is frozen), and the output layer at the answer positions
    only: about 4 x (decoder Linear parameters) FLOP per token plus 4 x vocab x hidden per answer token.
    ``tokens`` / ``answers``: real and answer tokens of a mean batch. LoRA's own matmuls, attention scores,
    norms and the optimizer are left out: they are what the loop spends beyond the ceiling.
    """
    config = json.loads((Path(model_dir) / "config.json").read_text())
    shapes = linear_shapes(config)
    n_layers, vocab, hidden = config["num_hidden_layers"], config["vocab_size"], config["hidden_size"]
    t_layers = matmul_seconds(shapes, tokens, dtype) * n_layers
    t_head = matmul_seconds([(hidden, vocab)], answers, dtype)
    flop = 4 * tokens * sum(i * o for i, o in shapes) * n_layers + 4 * answers * hidden * vocab
    return {"tokens_per_s": tokens / (t_layers + t_head), "gflop_per_s": flop / (t_layers + t_head) / 1e9,
            "flop_per_token": flop / tokens, "tokens": tokens, "answers": answers}


def batch_shape(a: argparse.Namespace, train: pl.DataFrame) -> tuple[int, int]:
    """Real and answer tokens of a mean training batch (``--batch-size`` examples as the trainer encodes them)."""
    from adaptive_ft.lm import tokens as tk
    from adaptive_ft.lm.models import load_model

    _, tok = load_model(a.model)
    enc = tk.encode_all(tok, train, a.max_seq_len)
    mean_len = float(np.mean([len(e.ids) for e in enc]))
    mean_answer = float(np.mean([len(e.ids) - e.n_prompt for e in enc]))
    return round(a.batch_size * mean_len), round(a.batch_size * mean_answer)


# --------------------------------------------------------------------------------------------- one run


def run_trainer(a: argparse.Namespace, train: pl.DataFrame, test: pl.DataFrame) -> dict[str, Any]:
    """Plain transformers Trainer + peft, LoRA on every layer, the model's own default chat template."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from adaptive_ft.lm import tokens as tk
    from adaptive_ft.lm.models import load_model

    model, tok = load_model(a.model)
    enc = tk.encode_all(tok, train, a.max_seq_len, system=None)  # None: the template's default system turn
    rows = [{"input_ids": e.ids, "labels": [-100] * e.n_prompt + e.ids[e.n_prompt:]} for e in enc]
    peft = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=0.05, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]))
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    seen = {"tokens": 0, "examples": 0}

    def counting(features: list[dict[str, Any]]) -> dict[str, Any]:
        seen["tokens"] += sum(len(f["input_ids"]) for f in features)
        seen["examples"] += len(features)
        return collator(features)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=a.batch_size, max_steps=a.steps,
                                 learning_rate=a.trainer_lr, lr_scheduler_type="cosine", warmup_steps=a.warmup,
                                 logging_steps=max(1, a.steps // 10), save_strategy="no", report_to=[],
                                 use_cpu=not torch.cuda.is_available(), seed=a.seed, dataloader_num_workers=0,
                                 disable_tqdm=False)
        trainer = Trainer(model=peft, args=args, train_dataset=rows, data_collator=counting)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "examples": seen["examples"], "tokens": seen["tokens"], "steps": a.steps,
            "accuracy": exact_match(peft, tok, test, system=None)}


def run_aft(a: argparse.Namespace, examples: pl.DataFrame, test: pl.DataFrame, layers: str,
            minutes: float, precision: str = "auto") -> dict[str, Any]:
    """adaptive-ft's train(): ``--steps`` steps, or as many as fit in ``minutes`` when given."""
    from peft import PeftModel

    from adaptive_ft.config import load_config
    from adaptive_ft.finetune import train
    from adaptive_ft.lm.models import load_model

    steps = a.steps if minutes <= 0 else 100_000
    cfg = load_config(None, [f"model={a.model}", f"seed={a.seed}", f"train.max_steps={steps}",
                             f"train.batch_size={a.batch_size}", f"train.lr={a.lr}", f"train.lora.r={a.r}",
                             f"train.lora.alpha={2 * a.r}", f"train.warmup_steps={a.warmup}",
                             f"train.max_seq_len={a.max_seq_len}", "train.eval_every=0", "train.patience=0",
                             "train.checkpoint_every=0", "train.max_eval_examples=1", "train.keep_best=false",
                             f"train.max_minutes={minutes}", f"train.precision={precision}"])
    plan = Path(a.workdir) / "bench-plan.json"
    plan.write_text(json.dumps({"domains": sorted(examples["domain"].unique())}))
    with tempfile.TemporaryDirectory(dir=a.workdir) as out:
        r = train(cfg, None, plan, a.model, out, layers=layers, examples=examples)
        base, tok = load_model(a.model)
        model = PeftModel.from_pretrained(base, Path(out) / "adapter")
        acc = exact_match(model, tok, test, system="")
        used = json.loads((Path(out) / "manifest.json").read_text())["precision"]
    return {"seconds": r.train_seconds, "examples": round(r.examples_per_s * r.train_seconds),
            "tokens": round(r.tokens_per_s * r.train_seconds), "steps": r.steps, "accuracy": acc,
            "layers": r.layers, "precision": used}


def score_run(run: Path, n: int, seed: int) -> None:
    """Exact-match accuracy of RUN/adapter on (a seeded sample of) RUN/split.parquet's test split."""
    from peft import PeftModel

    from adaptive_ft.lm.models import load_model

    manifest = json.loads((run / "manifest.json").read_text())
    test = pl.read_parquet(run / "split.parquet").filter(pl.col("split") == "test")
    if n and test.height > n:
        test = test.sample(n, seed=seed, shuffle=False)
    base, tok = load_model(manifest["base_model_path"])
    t0 = time.perf_counter()
    acc = exact_match(PeftModel.from_pretrained(base, run / "adapter"), tok, test, manifest.get("system_prompt", ""))
    print(f"{run}: exact-match accuracy {100 * acc:.1f}% on {test.height} test examples "
          f"(adapter from step {manifest.get('adapter_step')}, {manifest['timings']}; scored in "
          f"{time.perf_counter() - t0:.0f}s)")


def worker(a: argparse.Namespace) -> None:
    """One variant in this process; the result (with peak memory) as JSON on the last line of stdout."""
    torch.manual_seed(a.seed)
    examples = banking77_examples()
    if a.model == "tiny":
        a.model = tiny_model(Path(a.workdir), examples)
    s = split(examples, a.seed)
    test = s.filter(pl.col("split") == "test").sample(min(a.test_examples, (s["split"] == "test").sum()),
                                                      seed=a.seed, shuffle=False)
    if a.worker == "trainer":
        res = run_trainer(a, s.filter(pl.col("split") == "train"), test)
    else:
        res = run_aft(a, examples, test, a.layers, a.minutes, "fp32" if a.worker.endswith("-fp32") else "auto")
    res["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res.update(variant=a.worker, layers_arg=a.layers, minutes=a.minutes)
    with open(Path(a.workdir) / "results.jsonl", "a") as f:  # partial results survive an interrupted benchmark
        f.write(json.dumps(res) + "\n")
    print("RESULT " + json.dumps(res))


# --------------------------------------------------------------------------------------------- driver


def spawn(a: argparse.Namespace, variant: str, layers: str = "", minutes: float = 0.0) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", variant, "--layers", layers, "--minutes", str(minutes)]
    for key in ("model", "steps", "batch_size", "lr", "trainer_lr", "r", "warmup", "max_seq_len", "test_examples",
                "seed", "workdir"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(a, key))]
    print(f"\n=== {variant} {layers} {'(%.1f min)' % minutes if minutes else '(%d steps)' % a.steps}", flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed (exit {done.returncode})")
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    res.update(variant=variant, examples_per_s=res["examples"] / res["seconds"],
               tokens_per_s=res["tokens"] / res["seconds"])
    return res


def plan_layers(a: argparse.Namespace) -> str:
    if a.plan:
        from adaptive_ft.artifacts.plan import Plan

        p = Plan.load(a.plan)
        if not p.layers or not p.layers.selected:
            raise SystemExit(f"{a.plan} selects no layers; run prioritize with layer probes or pass --plan-layers")
        return ",".join(map(str, p.layers.selected))
    return a.plan_layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="'smollm2', a folder, or 'tiny' (a smoke test)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3, help="adaptive-ft's learning rate")
    ap.add_argument("--trainer-lr", type=float, default=2e-4, help="the Trainer's (its LoRA default)")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--max-seq-len", type=int, default=96)
    ap.add_argument("--test-examples", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plan", default=None, help="plan.json whose layers.selected is 'the plan's layers'")
    ap.add_argument("--plan-layers", default="15-29", help="the plan's layers when --plan is not given")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--no-equal-time", action="store_true", help="skip the equal wall-clock runs")
    ap.add_argument("--equal-time", default="aft-plan",
                    help="variants that run again for the Trainer's wall-clock time (comma-separated)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "aft-bench-train"))
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--score-run", default=None, help="only score RUN/adapter on RUN's test split, then exit")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--layers", default="", help=argparse.SUPPRESS)
    ap.add_argument("--minutes", type=float, default=0.0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    if a.worker:
        return worker(a)
    if a.score_run:
        return score_run(Path(a.score_run), a.test_examples, a.seed)
    chosen = plan_layers(a)
    from adaptive_ft.finetune.trainer import parse_layers

    n_layers = 30 if a.model == "smollm2" else int(json.loads((Path(a.model) / "config.json").read_text())[
        "num_hidden_layers"]) if a.model != "tiny" else 4
    k = len(parse_layers(chosen, n_layers))
    layer_sets = {"aft-all": "all", "aft-all-fp32": "all", "aft-plan": chosen, "aft-last": f"last:{k}"}
    wanted = a.variants.split(",")
    ceilings = [measure_ceiling(a)]  # before the runs and after them: the machine is shared
    results = [spawn(a, v) if v == "trainer" else spawn(a, v, layer_sets[v]) for v in wanted]
    base = next((r for r in results if r["variant"] == "trainer"), None)
    if base and not a.no_equal_time:
        for v in a.equal_time.split(","):
            if v in layer_sets:
                r = spawn(a, v, layer_sets[v], minutes=base["seconds"] / 60)
                r["variant"] = v + "@time"
                results.append(r)
    ceilings.append(measure_ceiling(a))
    report(results, base, a, best_ceiling(ceilings))


def measure_ceiling(a: argparse.Namespace) -> dict[str, dict[str, float]]:
    """The all-layer ceiling (see :func:`ceiling`) in fp32, and in bf16 where the CPU has it natively."""
    from adaptive_ft.lm.models import resolve_model

    examples = banking77_examples()
    folder = tiny_model(Path(a.workdir), examples) if a.model == "tiny" else str(resolve_model(a.model))
    tokens, answers = batch_shape(argparse.Namespace(**{**vars(a), "model": folder}),
                                  split(examples, a.seed).filter(pl.col("split") == "train"))
    out = {"fp32": ceiling(folder, tokens, answers, torch.float32)}
    from adaptive_ft.finetune.trainer import native_bf16

    if native_bf16():
        out["bf16"] = ceiling(folder, tokens, answers, torch.bfloat16)
    return out


def best_ceiling(measured: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per precision, the faster of the measurements (the ratio to it is the harder one to meet)."""
    return {k: max((m[k] for m in measured), key=lambda c: c["tokens_per_s"]) for k in measured[0]}


def report(results: list[dict[str, Any]], base: dict[str, Any] | None, a: argparse.Namespace,
           ceilings: dict[str, dict[str, float]] | None = None) -> None:
    ceilings = ceilings or {}
    print(f"\nmodel {a.model}, batch {a.batch_size}, {a.steps} steps, test {a.test_examples} examples, "
          f"{torch.get_num_threads()} threads")
    for name, c in ceilings.items():
        print(f"ceiling ({name} matmuls at the model's shapes, {c['tokens']} tokens / {c['answers']} answer tokens "
              f"a batch): {c['gflop_per_s']:.0f} GFLOP/s = {c['tokens_per_s']:.0f} real tokens/s for all-layer LoRA "
              f"({c['flop_per_token'] / 1e6:.0f} MFLOP a token)")
    fp32 = ceilings.get("fp32", {}).get("tokens_per_s", float("nan"))
    print(f"{'run':<16}{'steps':>6}{'seconds':>9}{'ex/s':>8}{'tok/s':>8}{'x trainer':>10}{'of fp32 ceil':>13}"
          f"{'peak MiB':>10}{'acc':>8}")
    for r in results:
        ratio = r["examples_per_s"] / base["examples_per_s"] if base else float("nan")
        print(f"{r['variant']:<16}{r['steps']:>6}{r['seconds']:>9.1f}{r['examples_per_s']:>8.2f}"
              f"{r['tokens_per_s']:>8.0f}{ratio:>10.2f}{100 * r['tokens_per_s'] / fp32:>12.0f}%"
              f"{r['peak_memory_mb']:>10.0f}{100 * r['accuracy']:>7.1f}%")
    targets = check_targets(results, base)
    by = {r["variant"]: r for r in results}
    if "aft-all" in by and "aft-all-fp32" in by and by["aft-all"].get("precision") == "bf16":
        p, q, n = by["aft-all"]["accuracy"], by["aft-all-fp32"]["accuracy"], a.test_examples
        noise = 2 * (max(p * (1 - p), 1e-9) / n + max(q * (1 - q), 1e-9) / n) ** 0.5  # 2 s.e. of the difference
        speed = by["aft-all"]["tokens_per_s"] / by["aft-all-fp32"]["tokens_per_s"]
        targets["bf16 autocast: accuracy equal to fp32 within noise (2 s.e.)"] = (
            abs(p - q) <= noise, f"{100 * (p - q):+.1f} points (2 s.e. {100 * noise:.1f}); {speed:.2f}x the tokens/s")
    if "aft-all" in by and ceilings:
        precision = by["aft-all"].get("precision", "fp32")
        c = ceilings.get(precision, ceilings["fp32"])
        share = by["aft-all"]["tokens_per_s"] / c["tokens_per_s"]
        targets[f"aft-all >= 70% of the {precision} ceiling"] = (
            share >= 0.7, f"{100 * share:.0f}% ({by['aft-all']['tokens_per_s']:.0f} of {c['tokens_per_s']:.0f} "
                          f"tokens/s)")
    for name, (ok, detail) in targets.items():
        print(f"{'met ' if ok else 'MISS'}  {name}: {detail}")
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "results": results, "ceilings": ceilings,
                                           "targets": {k: {"met": ok, "detail": d} for k, (ok, d) in targets.items()}},
                                          indent=2) + "\n")


def check_targets(results: list[dict[str, Any]], base: dict[str, Any] | None) -> dict[str, tuple[bool, str]]:
    """Issue 4's targets, for the variants this run has: name -> (met, the figures behind it)."""
    by = {r["variant"]: r for r in results}
    out: dict[str, tuple[bool, str]] = {}
    if base:
        speed = {v: r["examples_per_s"] / base["examples_per_s"] for v, r in by.items()}
        if "aft-all" in by:
            gap = 100 * (by["aft-all"]["accuracy"] - base["accuracy"])
            out["aft-all >= 1.2x the Trainer's examples/s, accuracy within 1 point or better"] = (
                speed["aft-all"] >= 1.2 and gap >= -1, f"{speed['aft-all']:.2f}x, accuracy {gap:+.1f} points")
        if "aft-plan" in by:
            out["aft-plan >= 2x the Trainer's examples/s"] = (speed["aft-plan"] >= 2, f"{speed['aft-plan']:.2f}x")
        if "aft-plan@time" in by:
            gap = 100 * (by["aft-plan@time"]["accuracy"] - base["accuracy"])
            out["at equal wall-clock, aft-plan reaches the Trainer's accuracy"] = (gap >= 0, f"{gap:+.1f} points")
    if "aft-plan" in by and "aft-last" in by:
        gap = 100 * (by["aft-plan"]["accuracy"] - by["aft-last"]["accuracy"])
        out["aft-plan beats the last k layers by >= 5 points at equal steps"] = (gap >= 5, f"{gap:+.1f} points")
    return out


if __name__ == "__main__":
    main()
