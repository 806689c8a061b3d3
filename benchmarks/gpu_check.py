"""One short check of adaptive-ft's GPU path: QLoRA through ``train()``, LoRA, export; runs on CPU too.

Usage (the same command on both; it uses CUDA when torch sees a GPU, else the CPU, and says which)::

    python benchmarks/gpu_check.py --out /tmp/gpu_check            # writes /tmp/gpu_check/gpu_check.json

What it does, all on models built in-process (no downloads, nothing from the store):

1. ``tiny-qlora``: adaptive_ft.finetune.train() with train.quantize_base=nf4 (bitsandbytes 4-bit base)
   on a tiny Llama (3 layers, hidden 64) and 180 synthetic intent examples given directly (no duckdb store).
   Checks: the train loss falls, only ``lora_`` tensors change (the 4-bit base's packed weights and quant
   state included), the saved adapter reloads with plain peft on a 4-bit base and reproduces the run's best
   validation loss, and where the base and the adapter live (cuda or cpu). Records tokens/s (the run's own
   figure and a steady-state one that skips the first 5 steps, each step timed with a device sync).
2. ``export``: adaptive_ft.export.export() of that run to merged / int8 / nf4; the manifest's agreement,
   sizes and ms/token. Then (on CUDA) each variant is also reloaded with plain ``from_pretrained`` onto the
   GPU and its top-1 predictions compared with the merged model's on the same probes.
3. ``tiny-lora``: the same run without quantization (fp32 base; train() has no bf16 option).
5. ``resume``: a run with LoRA dropout 0.1 interrupted at step 8 and resumed equals an uninterrupted one (losses,
   adapter weights); on CUDA a control resume with the CUDA RNG state not restored must differ.
6. ``tiny-distill``: ``--teacher`` (the tiny base as its own teacher) on the device; the loss falls.
4. ``smol-lora-bN`` / ``smol-qlora-bN`` (unless --no-smol): a SmolLM2-135M-shaped body (30 layers, hidden
   576, 9 heads / 3 KV heads, intermediate 1536) with random weights and the tiny tokenizer, for a throughput
   figure the tiny model is too small to give on a GPU; one pair per --smol-batch-sizes value, and with
   --profile one step of each under torch.profiler (GPU kernel time against wall time).

Results and the device command: docs/gpu.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl  # noqa: E402

from adaptive_ft.config import ExportConfig, load_config  # noqa: E402
from adaptive_ft.lm import tokens as tk
from adaptive_ft.lm.models import build_tiny_model  # noqa: E402

T = importlib.import_module("adaptive_ft.finetune.trainer")
INTENTS = ["card", "transfer", "refund", "pin", "atm", "cash"]
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def examples(n: int = 180) -> pl.DataFrame:
    """The synthetic examples tests/test_finetune_train.py uses: six intents, two domains."""
    rows = []
    for i in range(n):
        word = INTENTS[i % len(INTENTS)]
        rows.append({"example_id": f"e{i:04d}", "domain": "cards" if i % 2 else "money",
                     "prompt": f"question {i % 11} about my {word} please", "reference": f"{word}_intent"})
    return pl.DataFrame(rows)


def plan(path: Path) -> Path:
    path.write_text(json.dumps({"domains": ["cards", "money"]}))
    return path


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer:
    """Wraps train.train_step: per-step wall time (device-synchronized) and tokens."""

    def __init__(self, profile_step: int = -1) -> None:
        self.steps: list[tuple[float, int]] = []
        self.real = T.train_step
        self.profile_step = profile_step  # profile this step (0-based) with torch.profiler
        self.profile: dict[str, Any] = {}
        self.calls = 0

    def __enter__(self) -> "StepTimer":
        def timed(ctx, micro, params):
            self.calls += 1
            if self.calls - 1 == self.profile_step:  # not counted in self.steps: the profiler slows it
                return self._profiled(ctx, micro, params)
            sync()
            t0 = time.perf_counter()
            out = self.real(ctx, micro, params)
            sync()
            self.steps.append((time.perf_counter() - t0, out.tokens))
            return out

        T.train_step = timed
        return self

    def __exit__(self, *exc: Any) -> None:
        T.train_step = self.real

    def _profiled(self, ctx, micro, params):
        """One step under torch.profiler: GPU kernel time vs wall time, kernel launches, top ops by CPU time."""
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        sync()
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            out = self.real(ctx, micro, params)
            sync()
        wall = time.perf_counter() - t0
        events = prof.key_averages()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        self.profile = {"wall_ms_profiled": round(1000 * wall, 2),
                        "gpu_kernel_ms": round(sum(e.device_time for e in kernels) / 1000, 2),
                        "kernels": len(kernels),
                        "top_cpu_ops": events.table(sort_by="self_cpu_time_total", row_limit=12)}
        return out

    def steady(self, skip: int = 5) -> float:
        rest = self.steps[skip:] or self.steps
        return sum(n for _, n in rest) / max(sum(t for t, _ in rest), 1e-9)


class Capture:
    """Wraps train.attach_lora: keeps the peft model and a CPU copy of its state before training."""

    def __init__(self) -> None:
        self.model: Any = None
        self.before: dict[str, torch.Tensor] = {}
        self.real = T.attach_lora

    def __enter__(self) -> "Capture":
        def attach(*a, **k):
            m = self.real(*a, **k)
            self.model = m
            self.before = {n: t.detach().cpu().clone() for n, t in m.state_dict().items()}
            return m

        T.attach_lora = attach
        return self

    def __exit__(self, *exc: Any) -> None:
        T.attach_lora = self.real

    def changed(self) -> list[str]:
        after = {n: t.detach().cpu() for n, t in self.model.state_dict().items()}
        assert after.keys() == self.before.keys(), "the model's state keys changed during training"
        return [n for n in after if not torch.equal(after[n], self.before[n])]


def run_train(name: str, model_dir: Path, ex: pl.DataFrame, out: Path, overrides: list[str],
              profile_step: int = -1, teacher: str | None = None) -> dict[str, Any]:
    cfg = load_config(None, overrides)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the manifest's peak is the process's: make it this run's
    with Capture() as cap, StepTimer(profile_step) as timer:
        t0 = time.perf_counter()
        r = T.train(cfg, None, plan(out.parent / f"{name}-plan.json"), str(model_dir), out, examples=ex,
                    teacher=teacher)
        wall = time.perf_counter() - t0
    changed = cap.changed()
    m = cap.model
    n4 = sum(type(x).__name__ == "Linear4bit" for x in m.modules())
    devices = sorted({str(p.device) for p in m.parameters()})
    lora_devices = sorted({str(p.device) for n, p in m.named_parameters() if "lora_" in n})
    losses = [x["train_loss"] for x in r.metrics]
    vals = [x["val_loss"] for x in r.metrics if "val_loss" in x]
    man = json.loads((out / "manifest.json").read_text())
    rec = {
        "steps": r.steps, "first5_train_loss": sum(losses[:5]) / 5, "last5_train_loss": sum(losses[-5:]) / 5,
        "val_losses": [round(v, 4) for v in vals], "best_val_loss": r.best_val_loss,
        "loss_fell": sum(losses[-5:]) < sum(losses[:5]),
        "changed_tensors": len(changed), "only_lora_changed": bool(changed) and all("lora_" in n for n in changed),
        "linear4bit_modules": n4, "param_devices": devices, "lora_devices": lora_devices,
        "tokens_per_s_run": round(r.tokens_per_s, 1), "tokens_per_s_steady": round(timer.steady(), 1),
        "mean_step_ms_steady": round(1000 * sum(t for t, _ in timer.steps[5:]) / max(1, len(timer.steps[5:])), 2),
        "tokens_per_step": round(sum(n for _, n in timer.steps) / max(1, len(timer.steps)), 1),
        "train_s": round(r.train_seconds, 2), "wall_s": round(wall, 2),
        "peak_memory_mb": man.get("peak_memory_mb"), "timings": man.get("timings"),
    }
    print(f"[{name}] {json.dumps(rec)}", flush=True)
    if timer.profile:
        rec["profile"] = timer.profile
        print(f"[{name}] profiled step {profile_step + 1}: wall {timer.profile['wall_ms_profiled']} ms, GPU kernels "
              f"{timer.profile['gpu_kernel_ms']} ms in {timer.profile['kernels']} kernels\n"
              f"{timer.profile['top_cpu_ops']}", flush=True)
    return rec


def reload_with_plain_peft(model_dir: Path, run: Path, quantized: bool, device: torch.device) -> float:
    """The run's val loss from base + adapter loaded the plain way (4-bit base when ``quantized``), one by one."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaptive_ft.lm.models import bnb_config

    kw: dict[str, Any] = {"dtype": torch.float32}
    if quantized:
        kw.update(quantization_config=bnb_config("nf4"), device_map={"": device.index or 0} if device.type == "cuda"
                  else "cpu")
    base = AutoModelForCausalLM.from_pretrained(model_dir, **kw)
    if not quantized:
        base = base.to(device)
    model = PeftModel.from_pretrained(base, run / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    val = pl.read_parquet(run / "split.parquet").filter(pl.col("split") == "val")
    total, n = 0.0, 0
    with torch.no_grad():
        for e in tk.encode_all(tok, val, 64):
            ids = torch.tensor([e.ids], device=device)
            labels = ids.clone()
            labels[0, : e.n_prompt] = -100
            k = len(e.ids) - e.n_prompt
            total += model(input_ids=ids, labels=labels).loss.item() * k
            n += k
    return total / n


def cuda_variant_agreement(exp: Path, probes: list[str]) -> dict[str, Any]:
    """Each exported variant reloaded onto the GPU with plain from_pretrained; top-1 agreement with merged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exp / "merged")
    out: dict[str, Any] = {}
    ref = None
    for name in ("merged", "int8", "nf4"):
        model = AutoModelForCausalLM.from_pretrained(exp / name, dtype=torch.float32, device_map={"": 0}).eval()
        preds = []
        with torch.no_grad():
            for text in probes:
                ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids.cuda()
                preds.append(model(input_ids=ids).logits[0].float().argmax(-1).cpu())
        ref = ref or preds
        agree = sum(int((a == b).sum()) for a, b in zip(preds, ref))
        total = sum(len(a) for a in ref)
        kinds = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__})
        out[name] = {"agreement_cuda": round(agree / total, 4), "positions": total, "linear_classes": kinds,
                     "device": str(next(model.parameters()).device)}
        del model
    return out


def guarded(report: dict[str, Any], title: str, fn: Any) -> None:
    """Run one section; a failure is recorded (with its traceback) as a failed check and the rest still run."""
    import traceback

    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the point is to see every section's outcome in one device call
        tb = traceback.format_exc()
        print(f"[{title}] FAILED: {type(e).__name__}: {e}\n{tb}", flush=True)
        report.setdefault("errors", {})[title] = tb
        report["checks"][f"ran: {title}"] = False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/gpu_check"))
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps of the tiny runs")
    ap.add_argument("--smol-steps", type=int, default=15, help="optimizer steps of the SmolLM2-shaped runs")
    ap.add_argument("--no-smol", action="store_true", help="skip the SmolLM2-shaped throughput runs")
    ap.add_argument("--smol-batch-sizes", default="8", help="comma-separated train.batch_size values of the smol runs")
    ap.add_argument("--only-smol", action="store_true", help="run the SmolLM2-shaped throughput runs alone")
    ap.add_argument("--only-resume", action="store_true", help="run the resume check alone")
    ap.add_argument("--profile", action="store_true", help="profile the 11th step of each smol run")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = all cores)")
    args = ap.parse_args()

    import bitsandbytes
    import peft
    import transformers

    cuda = torch.cuda.is_available()
    device = torch.device("cuda:0" if cuda else "cpu")
    env = {"device": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores, {platform.processor()})",
           "on_cuda": cuda, "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "transformers": transformers.__version__, "peft": peft.__version__,
           "bitsandbytes": bitsandbytes.__version__, "polars": pl.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"gpu_check on {'CUDA: ' if cuda else 'CPU (no CUDA here): '}{env['device']}", flush=True)
    print(json.dumps(env), flush=True)
    root = args.out
    root.mkdir(parents=True, exist_ok=True)
    ex = examples()
    texts = list(ex["prompt"]) + list(ex["reference"])
    tiny = build_tiny_model(root / "tiny-model", texts=texts, n_layers=3, hidden=64)
    threads = [f"train.threads={args.threads}"] if args.threads else []
    base = ["train.batch_size=8", "train.lr=0.01", "train.warmup_steps=2", "train.lora.r=4", "train.lora.alpha=8",
            "train.max_seq_len=64", "train.patience=0", "train.checkpoint_every=0", "train.max_eval_examples=0",
            *threads]
    report: dict[str, Any] = {"env": env, "checks": {}}
    tiny_cfg = [*base, f"train.max_steps={args.steps}", f"train.eval_every={max(1, args.steps // 4)}"]

    run_q = root / "tiny-qlora"

    def qlora() -> None:
        rec = run_train("tiny-qlora", tiny, ex, run_q, [*tiny_cfg, "train.quantize_base=nf4"])
        report["tiny-qlora"] = rec
        report["checks"].update(qlora_loss_fell=rec["loss_fell"], qlora_only_lora_changed=rec["only_lora_changed"],
                                qlora_base_is_4bit=rec["linear4bit_modules"] > 0,
                                qlora_on_device=rec["param_devices"] == [str(device)])
        rec["reload_val_loss_4bit_base"] = reload_with_plain_peft(tiny, run_q, True, device)
        rec["reload_val_loss_fp32_base"] = reload_with_plain_peft(tiny, run_q, False, device)
        rec["reload_matches_best_val"] = abs(rec["reload_val_loss_4bit_base"] - rec["best_val_loss"]) <= 2e-3 * max(
            1.0, abs(rec["best_val_loss"]))
        report["checks"]["qlora_adapter_reloads"] = rec["reload_matches_best_val"]

    def export_variants() -> None:
        from adaptive_ft.export import export, probe_prompts
        from adaptive_ft.lm.models import read_run

        t0 = time.perf_counter()
        res = export(run_q, root / "export", ExportConfig(variants=["merged", "int8", "nf4"], probe_prompts=16,
                                                          latency_prompts=2, latency_tokens=8))
        man = json.loads(res.manifest_path.read_text())
        report["export"] = {"wall_s": round(time.perf_counter() - t0, 2), "variants": man["variants"]}
        for v in man["variants"]:
            print(f"[export] {v['name']}: agreement {v['agreement']} on {v['probe_positions']} positions, "
                  f"{v['size_bytes']} bytes, {v['ms_per_token']} ms/token ({v['runtime']})", flush=True)
        agree = {v["name"]: v["agreement"] for v in man["variants"]}
        # On a width-64 model 4-bit rounding flips many near-tied argmaxes (nf4 ~0.65 on CPU); chance is 1/500.
        report["checks"].update(export_merged_agrees=agree.get("merged") == 1.0,
                                export_int8_agrees_90=agree.get("int8", 0) >= 0.9,
                                export_nf4_agrees_50=agree.get("nf4", 0) >= 0.5)
        if cuda:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(root / "export" / "merged")
            probes = probe_prompts(run_q, tok, 16, read_run(run_q))
            report["export"]["cuda_reload"] = cr = cuda_variant_agreement(root / "export", probes)
            print(f"[export-cuda] {json.dumps(cr)}", flush=True)
            report["checks"].update(cuda_reload_on_gpu=all(v["device"].startswith("cuda") for v in cr.values()),
                                    cuda_int8_agrees_90=cr["int8"]["agreement_cuda"] >= 0.9,
                                    cuda_nf4_agrees_50=cr["nf4"]["agreement_cuda"] >= 0.5)

    def lora() -> None:
        rec = run_train("tiny-lora", tiny, ex, root / "tiny-lora", tiny_cfg)
        report["tiny-lora"] = rec
        report["checks"].update(lora_loss_fell=rec["loss_fell"], lora_only_lora_changed=rec["only_lora_changed"],
                                lora_on_device=rec["param_devices"] == [str(device)])

    def smol() -> None:
        model = build_tiny_model(root / "smol-model", texts=texts, n_layers=30, hidden=576, heads=9, kv_heads=3,
                                 intermediate=1536, init_std=0.02)
        for bs in [int(b) for b in args.smol_batch_sizes.split(",")]:
            smol_cfg = [*base, f"train.max_steps={args.smol_steps}", "train.eval_every=0", "train.lr=1e-3",
                        "train.lora.r=8", "train.lora.alpha=16", f"train.batch_size={bs}"]
            for kind, extra in (("lora", []), ("qlora", ["train.quantize_base=nf4"])):
                name = f"smol-{kind}-b{bs}"
                report[name] = run_train(name, model, ex, root / name, [*smol_cfg, *extra],
                                         profile_step=10 if args.profile else -1)
                report["checks"][f"{name}_only_lora_changed"] = report[name]["only_lora_changed"]

    def resume() -> None:
        """Interrupted at step 8 (last checkpoint: step 4), resumed: the same losses and adapter as one run.

        LoRA dropout 0.1 draws from the device's generator, so on CUDA this holds only if the checkpoint's CUDA RNG
        state is restored. The control resumes once more with ``torch.cuda.set_rng_state_all`` made a no-op: it
        must differ (on CUDA), or the check could not have failed."""
        from safetensors.torch import load_file

        cfg = [*base, "train.max_steps=12", "train.eval_every=4", "train.checkpoint_every=4", "train.lora.dropout=0.1"]
        rec: dict[str, Any] = {}

        def go(name: str, resume: bool = False) -> None:
            T.train(load_config(None, cfg), None, plan(root / "resume-plan.json"), str(tiny), root / name,
                    examples=ex, resume=resume)

        def cut_run(name: str) -> None:
            real, calls = T.train_step, {"n": 0}

            def crash(*a: Any, **k: Any) -> Any:
                calls["n"] += 1
                if calls["n"] == 8:
                    raise KeyboardInterrupt
                return real(*a, **k)

            T.train_step = crash
            try:
                go(name)
            except KeyboardInterrupt:
                pass
            finally:
                T.train_step = real

        def losses(name: str) -> list[float]:
            rows = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
            return [m["train_loss"] for m in rows]

        def diffs(name: str) -> tuple[float, float]:
            """Largest train-loss and adapter-weight differences of run ``name`` from the uninterrupted one."""
            wa = load_file(str(root / "resume-full" / "adapter" / "adapter_model.safetensors"))
            wb = load_file(str(root / name / "adapter" / "adapter_model.safetensors"))
            return (max(abs(x - y) for x, y in zip(losses("resume-full"), losses(name))),
                    max(float((wa[k] - wb[k]).abs().max()) for k in wa))

        go("resume-full")
        cut_run("resume-cut")
        go("resume-cut", resume=True)
        rec["steps"] = [len(losses("resume-full")), len(losses("resume-cut"))]
        rec["max_loss_diff"], rec["max_weight_diff"] = diffs("resume-cut")
        report["checks"]["resume_equals_uninterrupted"] = (rec["steps"] == [12, 12] and rec["max_loss_diff"] < 1e-4
                                                           and rec["max_weight_diff"] < 1e-5)
        if cuda:  # the control: the same resume without the CUDA RNG restored
            real_set = torch.cuda.set_rng_state_all
            cut_run("resume-norng")
            torch.cuda.set_rng_state_all = lambda *_a, **_k: None
            try:
                go("resume-norng", resume=True)
            finally:
                torch.cuda.set_rng_state_all = real_set
            rec["control_max_loss_diff"], rec["control_max_weight_diff"] = diffs("resume-norng")
            report["checks"]["resume_control_differs"] = rec["control_max_weight_diff"] > 1e-5
        report["resume"] = rec
        print(f"[resume] {json.dumps(rec)}", flush=True)

    def distill() -> None:
        """``--teacher``: a KL term toward a teacher (here the tiny base itself) on the device; loss must fall."""
        rec = run_train("tiny-distill", tiny, ex, root / "tiny-distill",
                        [*tiny_cfg, "train.distill_weight=0.5"], teacher=str(tiny))
        report["tiny-distill"] = rec
        report["checks"].update(distill_loss_fell=rec["loss_fell"], distill_on_device=rec["param_devices"] == [str(device)])

    if args.only_resume:
        guarded(report, "5. resume on the device", resume)
    elif not args.only_smol:
        guarded(report, "1. QLoRA on a 4-bit base", qlora)
        guarded(report, "2. export merged/int8/nf4", export_variants)
        guarded(report, "3. LoRA on an fp32 base", lora)
        guarded(report, "5. resume on the device", resume)
        guarded(report, "6. distillation (--teacher)", distill)
    if not args.no_smol and not args.only_resume:
        guarded(report, "4. SmolLM2-shaped throughput", smol)

    (root / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    failed = [k for k, v in report["checks"].items() if not v]
    print(f"checks: {json.dumps(report['checks'])}", flush=True)
    print("ALL CHECKS PASSED" if not failed else f"FAILED: {failed}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
