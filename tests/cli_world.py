"""One small pipeline built through the CLI, shared by the issue-16 tests (test_guarantees, test_user_errors).

A tiny Llama, a simulated log, its store, a plan, a 4-step run with checkpoints at steps 2 and 4, and the run's
evaluation: built once per test process, so both modules pay for it once.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from adaptive_ft.cli import cli

from adaptive_ft.lm.models import build_tiny_model

TRAIN = ["train.max_steps=4", "train.eval_every=2", "train.checkpoint_every=2", "train.keep_checkpoints=3",
         "train.threads=1", "train.batch_size=8", "train.lora.r=4", "train.lora.alpha=8", "train.max_seq_len=64",
         "train.patience=0"]


def aft(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(r) -> None:
    assert r.exit_code == 0, r.output + repr(r.exception)


def refused(r, *words: str) -> None:
    """A clean refusal: exit code 1 and one ``Error:`` message (no traceback) containing each of ``words``."""
    assert isinstance(r.exception, SystemExit) and r.exit_code == 1, r.output + repr(r.exception)
    assert "Error:" in r.output, r.output
    for w in words:
        assert w in r.output, (w, r.output)


def digest(path: Path) -> bytes:
    return path.read_bytes()


_WORLD: dict[str, Path] = {}


def build_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if _WORLD:
        return _WORLD
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("world")
    w = {"root": root, "base": build_tiny_model(root / "tiny-model", n_layers=2), "log": root / "logs.jsonl",
         "store": root / "s.duckdb", "plan": root / "plan.json", "run": root / "r1", "eval": root / "eval.json"}
    ok(aft("simulate", "--out", w["log"], "simulate.users=40", "simulate.events=1500"))
    ok(aft("ingest", w["log"], "--store", w["store"]))
    ok(aft("prioritize", "--store", w["store"], "--out", w["plan"], "--quiet", "prioritize.factors=4",
           "prioritize.iterations=3"))
    ok(aft("train", "--store", w["store"], "--plan", w["plan"], "--model", w["base"], "--out", w["run"], *TRAIN))
    ok(aft("evaluate", "--store", w["store"], "--models", f"base,{w['run']}", "--out", w["eval"],
           "evaluate.bootstrap=50"))
    _WORLD.update(w)
    return _WORLD


def copy_run(world: dict[str, Path], dest: Path) -> Path:
    shutil.copytree(world["run"], dest)
    return dest
