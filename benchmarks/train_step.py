"""Where an all-layer LoRA training step goes, and what each of the trainer's CPU speed paths buys.

Three measurements on SmolLM2-135M-Instruct and Banking77 batches of 16 (the same model, LoRA r 8 on all 30
layers, and length-grouped batches as ``adaptive-ft train``), all through the trainer's own ``train_step``:

  --profile MODE   torch.profiler over a few steps of one mode: the ops' share of the step, largest first
                   (``--shapes``: one row per op and input shapes, e.g. to tell the base GEMMs from LoRA's)
  --omp-ab MODES   the same steps in alternating processes, OpenMP's threads sleeping between ops
                   (OMP_WAIT_POLICY=PASSIVE) or spinning as the ``adaptive-ft`` command sets them
  --ab MODES       interleaved A/B: every mode runs the same batches, in alternating order each round (so a
                   change in the shared machine's load falls on all of them); prints each mode's real
                   tokens/s and its paired median step speed-up over the first mode, with the IQR

A mode is a precision, ``fp32`` or ``bf16`` (autocast, as ``train.precision: auto`` on a CPU with native
bf16), plus ``+``-joined switches that turn one speed path off, to measure what it gives:

  torchmask  LoRA dropout masks from torch's ``bernoulli_`` instead of the trainer's ``dropout_mask``
  boolmask   ``dropout_mask``'s boolean masks, converted by each product, instead of masks in the input's dtype
  nogroup    no ``LoraGroup``: q/k/v and gate/up run as separate LoRA layers, each with its own mask
  flash      under bf16, the default SDPA kernel instead of the math one the trainer picks on a CPU
  nocast     under bf16, the frozen base re-cast by autocast on every forward (no ``keep_frozen_casts``)
  loopadam   torch's default AdamW on a CPU (its for-loop form) instead of ``make_optimizer``'s fused one

\b
    .venv/bin/python benchmarks/train_step.py --profile bf16
    .venv/bin/python benchmarks/train_step.py --ab bf16,bf16+torchmask,bf16+nogroup,fp32,fp32+torchmask
    .venv/bin/python benchmarks/train_step.py --ab bf16,bf16+flash --rounds 4 --steps-per-round 3
    .venv/bin/python benchmarks/train_step.py --omp-ab bf16,fp32 --rounds 2 --steps-per-round 5

Run it alone (the heavy-job lock): the A/B is a ratio within one run, but a busy machine widens its IQR.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adaptive_ft import spin_openmp_threads  # noqa: E402

# what the CLI sets before torch loads; OMP_WAIT_POLICY=PASSIVE in the environment measures without it
spin_openmp_threads()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from adaptive_ft.config import load_config  # noqa: E402
from adaptive_ft.finetune import data as fdata  # noqa: E402
from adaptive_ft.finetune import trainer as T  # noqa: E402
from adaptive_ft.lm import tokens as tk  # noqa: E402
from adaptive_ft.lm.models import load_model  # noqa: E402
from adaptive_ft.simulate import load_pool  # noqa: E402

SWITCHES = ("torchmask", "boolmask", "nogroup", "flash", "nocast", "loopadam")


def parse_mode(mode: str) -> tuple[torch.dtype | None, set[str]]:
    """``bf16+nogroup`` -> (torch.bfloat16, {"nogroup"}); ``fp32`` -> (None, set())."""
    precision, *switches = mode.split("+")
    if precision not in ("fp32", "bf16"):
        raise SystemExit(f"mode {mode!r}: the precision must be fp32 or bf16 (then +switches: {', '.join(SWITCHES)})")
    unknown = set(switches) - set(SWITCHES)
    if unknown:
        raise SystemExit(f"mode {mode!r}: unknown switch {sorted(unknown)}; known: {', '.join(SWITCHES)}")
    if precision == "fp32" and {"flash", "nocast"} & set(switches):
        raise SystemExit(f"mode {mode!r}: flash and nocast only change bf16 autocast")
    return (torch.bfloat16 if precision == "bf16" else None), set(switches)


def torch_mask(shape: tuple[int, ...], p: float, device: torch.device, dtype=None) -> tuple[torch.Tensor, float]:
    """torch's own Bernoulli keep-mask (what the trainer drew before ``dropout_mask``)."""
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p), p


def bool_mask(shape: tuple[int, ...], p: float, device: torch.device, dtype=None) -> tuple[torch.Tensor, float]:
    """``dropout_mask``'s boolean form (what the trainer used before typed masks): converted by each product."""
    return REAL_MASK(shape, p, device)


REAL_MASK = T.dropout_mask


class FlashCtx(T.Ctx):
    """The trainer's context with plain autocast: SDPA keeps its default (flash) kernel."""

    def forward(self):
        return torch.autocast("cpu", dtype=self.amp) if self.amp is not None else contextlib.nullcontext()


def build(mode: str, tc) -> tuple[T.Ctx, list[torch.Tensor], set[str], object]:
    """A fresh SmolLM2 with LoRA on every layer, set up as ``train`` does for ``mode``."""
    amp, switches = parse_mode(mode)
    base, tok = load_model("smollm2")
    torch.manual_seed(0)
    model = T.attach_lora(base, tc, list(range(base.config.num_hidden_layers)), {})
    T.fuse_lora(model)
    model.train()
    if "nogroup" not in switches:
        T.group_lora(model)
    if amp is not None and "nocast" not in switches:
        T.keep_frozen_casts(model, amp)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay) if "loopadam" in switches
           else T.make_optimizer(params, tc, T.Dist().device))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cls = FlashCtx if "flash" in switches else T.Ctx
    return cls(model, opt, sched, tc, T.Dist(), tok.pad_token_id, amp=amp), params, switches, tok


def batches_for(tok, tc, n_examples: int, batch_size: int) -> tuple[list, list[np.ndarray]]:
    """Banking77 examples encoded as training encodes them, in the trainer's length-grouped batches."""
    frame = load_pool("banking77").frame.sample(n_examples, seed=0)
    enc = tk.encode_all(tok, frame, tc.max_seq_len)
    lengths = np.array([len(e.ids) for e in enc])
    return enc, fdata.epoch_batches(np.full(len(enc), 1 / len(enc)), lengths, batch_size, 0, 0)


def step(ctx, params, switches, enc, batch) -> T.StepOut:
    """One ``train_step`` with ``switches``' dropout masks."""
    real = T.dropout_mask
    T.dropout_mask = torch_mask if "torchmask" in switches else bool_mask if "boolmask" in switches else real
    try:
        return T.train_step(ctx, [[enc[j] for j in batch]], params)
    finally:
        T.dropout_mask = real


def profile(mode: str, tc, args) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    ctx, params, switches, tok = build(mode, tc)
    enc, batches = batches_for(tok, tc, args.examples, args.batch_size)
    for i in range(args.warmup):
        step(ctx, params, switches, enc, batches[i])
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        for i in range(args.warmup, args.warmup + args.steps_per_round):
            step(ctx, params, switches, enc, batches[i])
    print(f"{mode}: {args.steps_per_round} steps after {args.warmup} warm-up steps")
    print(prof.key_averages(group_by_input_shape=args.shapes).table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                                                   max_shapes_column_width=80))


def ab(modes: list[str], tc, args) -> None:
    built = {m: build(m, tc) for m in modes}
    enc, batches = batches_for(built[modes[0]][3], tc, args.examples, args.batch_size)
    times: dict[str, list[float]] = {m: [] for m in modes}
    tokens = dict.fromkeys(modes, 0)
    losses: dict[str, list[float]] = {m: [] for m in modes}
    start = 0
    for r in range(args.rounds + 1):  # round 0 warms every mode up and is not counted
        for m in (modes if r % 2 == 0 else modes[::-1]):
            ctx, params, switches, _ = built[m]
            for k in range(args.steps_per_round):
                t = time.perf_counter()
                out = step(ctx, params, switches, enc, batches[(start + k) % len(batches)])
                dt = time.perf_counter() - t
                if r > 0:
                    times[m].append(dt)
                    tokens[m] += out.tokens
                    losses[m].append(out.loss)
        start += args.steps_per_round
    ref = np.array(times[modes[0]])
    print(f"{len(ref)} timed steps per mode, batch {args.batch_size}, LoRA r {tc.lora.r} on all layers")
    for m in modes:
        ratio = ref / np.array(times[m])
        print(f"{m:24s} {tokens[m] / sum(times[m]):7.0f} real tokens/s   median step {np.median(times[m]):.3f} s   "
              f"speed-up over {modes[0]}: median {np.median(ratio):.3f} (IQR {np.percentile(ratio, 25):.3f}-"
              f"{np.percentile(ratio, 75):.3f})   mean loss {np.mean(losses[m]):.4f}", flush=True)


def omp_ab(modes: str, args) -> None:
    """``--ab modes`` in fresh processes, alternately with OpenMP's threads sleeping between ops
    (OMP_WAIT_POLICY=PASSIVE) and with the CLI's setting (``spin_openmp_threads``): libgomp reads its wait
    policy once, when torch loads, so each setting needs its own process. Prints each process's tokens/s."""
    import subprocess

    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    settings = {"OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}, "the CLI's": {}}
    cmd = [sys.executable, __file__, "--ab", modes, "--rounds", "1", "--steps-per-round", str(args.steps_per_round),
           "--batch-size", str(args.batch_size), "--examples", str(args.examples), "--threads", str(args.threads)]
    rates: dict[str, dict[str, list[float]]] = {name: {} for name in settings}
    for r in range(args.rounds):
        for name in (list(settings) if r % 2 == 0 else list(settings)[::-1]):
            out = subprocess.run(cmd, env={**base, **settings[name]}, capture_output=True, text=True, check=True)
            for line in out.stdout.splitlines():
                if "real tokens/s" in line:
                    mode, rate = line.split()[0], float(line.split()[1])
                    rates[name].setdefault(mode, []).append(rate)
                    print(f"round {r + 1}  {name:24s} {mode:16s} {rate:6.0f} real tokens/s", flush=True)
    for mode in modes.split(","):
        passive, cli = (np.median(rates[name][mode]) for name in settings)
        print(f"{mode}: median {passive:.0f} (PASSIVE) vs {cli:.0f} (the CLI's) real tokens/s: {cli / passive:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--profile", metavar="MODE", help="profile this mode's steps")
    what.add_argument("--ab", metavar="MODES", help="comma-separated modes, the first the reference")
    what.add_argument("--omp-ab", metavar="MODES", help="--ab MODES in alternating processes, OpenMP threads "
                                                          "sleeping (PASSIVE) or spinning as the CLI sets them")
    p.add_argument("--rounds", type=int, default=4, help="A/B rounds after the warm-up round")
    p.add_argument("--steps-per-round", type=int, default=3, help="steps per mode per round (profile: steps profiled)")
    p.add_argument("--warmup", type=int, default=2, help="profile: steps before profiling")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--examples", type=int, default=2000, help="Banking77 examples drawn for the batches")
    p.add_argument("--rows", type=int, default=35, help="profile: ops shown")
    p.add_argument("--shapes", action="store_true", help="profile: one row per op and input shapes")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tc = load_config(None, ["train.lora.r=8", "train.lora.alpha=16", "train.max_seq_len=96"]).train
    if args.profile:
        profile(args.profile, tc, args)
    elif args.omp_ab:
        omp_ab(args.omp_ab, args)
    else:
        ab(args.ab.split(","), tc, args)


if __name__ == "__main__":
    main()
