"""``adaptive-ft simulate``: a synthetic interaction log with its planted truth."""

from __future__ import annotations

from pathlib import Path

import click

from adaptive_ft.cli.common import config_option, flag_overrides, overrides_argument
from adaptive_ft.config import load_config
from adaptive_ft.errors import InputError
from adaptive_ft.files import refuse_overwrite
from adaptive_ft.simulate import FORMATS, simulate, truth_path_for


def _guess_format(out: Path) -> str:
    """``logs.parquet`` -> parquet, ``logs.csv`` -> csv, ``*.chat.jsonl`` -> chat, anything else jsonl."""
    name = out.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".csv"):
        return "csv"
    if ".chat." in name or name.endswith(".chat"):
        return "chat"
    return "jsonl"


@click.command("simulate")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Log file to write; the truth goes beside it as <stem>.truth.json.")
@click.option("--format", "fmt", type=click.Choice(("auto", *FORMATS)), default="auto", show_default=True,
              help="Log format; auto picks it from --out's extension (jsonl when unsure).")
@click.option("--examples", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Example pool CSV: text,category (Banking77) or prompt,reference[,domain].")
@click.option("--pool", type=click.Choice(("builtin", "banking77")), default="builtin", show_default=True,
              help="Built-in support requests, or Banking77 from ../shared/data/banking77 (ignored with --examples).")
@click.option("--users", type=int, default=None, help="Number of users (overrides simulate.users).")
@click.option("--events", type=int, default=None, help="About this many events (overrides simulate.events).")
@click.option("--seed", type=int, default=None, help="Random seed (overrides the config's seed).")
@click.option("--responder", type=click.Path(path_type=Path), default=None,
              help="A deployed model answers the users: a RUN folder, an EXPORT variant, an HF folder or a .gguf. "
                   "Its own right and wrong answers decide the feedback (instead of planted failure rates).")
@click.option("--responder-batch", type=int, default=32, show_default=True, help="Prompts per batch for --responder.")
@click.option("--force", is_flag=True, help="Write over an existing log and truth file at --out.")
@config_option
@overrides_argument
def simulate_cmd(out: Path, fmt: str, examples: Path | None, pool: str, users: int | None, events: int | None,
                 seed: int | None, responder: Path | None, responder_batch: int, force: bool,
                 config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Write a realistic interaction log and the need planted in it.

    Users in segments with different domain preferences ask questions from an example pool; a simulated
    model fails more in some segment x domain cells; feedback (thumbs, ratings, edits, escalations...)
    follows whether the answer was right, with noise. Same seed, same bytes.

    With --responder, a real model answers instead: each distinct prompt once, the answer goes into
    `response`, right or wrong (exact label for label tasks) decides the feedback, `model_version` names
    the model, and the truth file records its measured failure per segment x domain. This is v1's log in
    the loop (`adaptive-ft loop`).

    \b
    Examples:
      adaptive-ft simulate --out logs.jsonl
      adaptive-ft simulate --out logs.parquet --events 1000000 --seed 3
      adaptive-ft simulate --out b77.jsonl --examples ../shared/data/banking77/train.csv
      adaptive-ft simulate --out chat.jsonl --format chat simulate.bad_cells=5 simulate.noise=0.1
      adaptive-ft simulate --out v1-logs.jsonl --pool banking77 --responder runs/v1
    """
    cfg = load_config(config_path, flag_overrides({"simulate.users": users, "simulate.events": events, "seed": seed},
                                                  overrides))
    written = [out, truth_path_for(out), out.with_name(out.stem + ".users.csv") if cfg.simulate.users_file else None]
    refuse_overwrite(written, {"--examples": examples, "--config": config_path, "--responder": responder})
    existing = [str(p) for p in written if p is not None and p.exists()]
    if existing and not force:
        raise InputError(f"simulate: {', '.join(existing)} already exist(s); pass --force to write over, or "
                         f"choose another --out")
    model = None
    if responder is not None:
        from adaptive_ft.lm.responder import ModelResponder  # deferred: the stage imports torch; --help stays fast

        model = ModelResponder(str(responder), batch_size=responder_batch,
                               max_new_tokens=cfg.evaluate.max_new_tokens)
    result = simulate(cfg.simulate, out, fmt=_guess_format(out) if fmt == "auto" else fmt,
                      pool=examples if examples is not None else pool,
                      seed=cfg.seed, responder=model)
    click.echo(f"wrote {result.n_events:,} events ({result.n_queries:,} queries, {result.n_users:,} users, "
               f"{result.n_examples:,} examples) to {result.log_path} [{result.format}] in {result.seconds:.1f}s; "
               f"truth: {result.truth_path}" + (f"; users: {result.users_path}" if result.users_path else ""))


COMMANDS = [simulate_cmd]
