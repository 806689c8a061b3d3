"""``adaptive-ft train``: the selective LoRA fine-tune driven by a plan."""

from __future__ import annotations

import os
from pathlib import Path

import click

from adaptive_ft.cli.common import config_option, flag_overrides, overrides_argument, store_option
from adaptive_ft.config import load_config
from adaptive_ft.files import refuse_overwrite


@click.command("train")
@store_option
@click.option("--plan", "plan_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="plan.json from `adaptive-ft prioritize` (or written by hand).")
@click.option("--model", default=None,
              help="Base model: 'smollm2', a folder, a .gguf file or an HF id (default: the config's model).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder: adapter/, metrics.jsonl, manifest.json, split.parquet, checkpoints/.")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps (overrides train.max_steps).")
@click.option("--epochs", type=float, default=None, help="Passes over the training split (train.epochs).")
@click.option("--lr", type=float, default=None, help="Peak learning rate (train.lr).")
@click.option("--batch-size", type=int, default=None, help="Examples per step per process (train.batch_size).")
@click.option("--layers", default=None,
              help="Adapted layers instead of the plan's: 'all', 'last:K', '12,13' or '15-29'.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option("--init-adapter", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Start from an earlier adapter (e.g. RUN/adapter of a broader fine-tune).")
@click.option("--teacher", default=None,
              help="Distil toward this model's token distribution (same tokenizer); see train.distill_*.")
@config_option
@overrides_argument
def train_cmd(store: str, plan_path: Path, model: str | None, out: Path, max_steps: int | None,
              epochs: float | None, lr: float | None, batch_size: int | None, layers: str | None, resume: bool,
              init_adapter: Path | None, teacher: str | None, config_path: str | None,
              overrides: tuple[str, ...]) -> None:
    """Fine-tune a LoRA adapter on the plan's domains, examples and layers.

    Examples are drawn with the plan's weights, the loss is on answer tokens only, validation runs every
    train.eval_every steps with early stopping, and checkpoints let --resume continue to the same result.
    Runs on several processes too: torchrun --nproc_per_node=N $(which adaptive-ft) train ...

    \b
    Examples:
      adaptive-ft train --plan plan.json --out runs/r1
      adaptive-ft train --plan plan.json --out runs/r1 --config configs/banking77-smollm2.yaml
      adaptive-ft train --plan plan.json --out runs/r1 --max-steps 200 --lr 1e-3 train.lora.r=8
      adaptive-ft train --plan plan.json --out runs/r1 --layers last:6
      adaptive-ft train --plan plan.json --out runs/r1 --resume
      adaptive-ft train --plan plan2.json --out runs/r2 --init-adapter runs/r1/adapter
    """
    from adaptive_ft.finetune import train  # deferred: the stage imports torch; --help stays fast
    from adaptive_ft.finetune.trainer import run_settings  # deferred with it

    refuse_overwrite([out / name for name in ("manifest.json", "split.parquet", "metrics.jsonl", "adapter")],
                     {"--plan": plan_path, "--store": store, "--config": config_path, "--init-adapter": init_adapter})
    flags = {"train.max_steps": max_steps, "train.epochs": epochs, "train.lr": lr, "train.batch_size": batch_size}
    # a resumed run starts from its own settings; anything given here must agree with them (train checks)
    prior = run_settings(out) if resume and out.is_dir() else None
    cfg = load_config(config_path, flag_overrides(flags, overrides), base=(prior or {}).get("config"),
                      base_name=f"{out}'s own settings" if prior else "")
    r = train(cfg, store, plan_path, model, out, resume=resume, init_adapter=init_adapter, teacher=teacher,
              layers=layers)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    best = f"; best validation loss {r.best_val_loss:.4f} at step {r.best_step}" if r.best_val_loss is not None else ""
    steps = f"{r.steps} steps" if r.resumed_from is None else \
        f"{r.session_steps} steps (resumed at step {r.resumed_from}, now {r.steps})"
    whole = "" if r.resumed_from is None else f"; {r.train_seconds:.0f}s over the whole run"
    click.echo(f"trained {steps} on layers {_short(r.layers)} in {r.session_seconds:.0f}s "
               f"({r.examples_per_s:.1f} examples/s, {r.tokens_per_s:.0f} tokens/s{whole}){best}; {r.stop_reason}")
    click.echo(f"adapter: {r.adapter_dir}  (train/val/test: {r.n_train}/{r.n_val}/{r.n_test} examples)")


def _short(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            parts.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(parts)


COMMANDS = [train_cmd]
