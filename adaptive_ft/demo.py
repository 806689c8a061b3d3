"""The loop end to end, as a team would live it: a deployed v1, its users' feedback, and a v2 audited against it.

1. **launch**: a launch log's examples are ingested and v1 is fine-tuned on a skewed mix -- the domains the
   product launched with at their full share, two it barely saw at 4% (``loop.launch_plan``).
2. **simulate**: users of several segments ask v1; its own right and wrong answers decide the feedback
   (``simulate(responder=v1)``), and the log is ingested.
3. **loop**: prioritize reads where v1 fails, v2 trains from v1's adapter on v1's layers with the plan's sample,
   is exported (merged, int8, nf4, GGUF), and v1, v2 and v2's quantized variants are evaluated on the same
   held-out test split with v1 as every paired interval's baseline; the report gets the v1 -> v2 view.

Every stage is the same library function the CLI calls; the demo only chains them over one work folder and
prints what a person would want to know at the end.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import polars as pl

from adaptive_ft.config import Config, load_config
from adaptive_ft.errors import InputError
from adaptive_ft.finetune import train
from adaptive_ft.lm.models import build_tiny_model
from adaptive_ft.lm.responder import ModelResponder
from adaptive_ft.loop import launch_plan, run_loop
from adaptive_ft.simulate import simulate
from adaptive_ft.store import Store, ingest

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGES = ("launch log", "train v1", "v1 answers users", "ingest", "prioritize", "train", "export", "evaluate",
          "report")
MARKER = ".adaptive-ft-demo"  # written into a demo's folder: only such a folder's artifacts are ever replaced
WEAK_DOMAINS = 2           # the domains v1 barely saw
WEAK_FACTOR = 0.04         # ... at 4% of their share


@dataclass
class DemoResult:
    """Where everything went, how long each stage took, and the closing summary lines."""

    out: Path
    report: Path
    artifacts: dict[str, Path]
    timings: dict[str, float] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)


def demo_config(quick: bool, path: str | Path | None = None, overrides: tuple[str, ...] = ()) -> Config:
    """The shipped config for the demo (``configs/demo.yaml``, or ``configs/tiny.yaml`` with ``quick``)."""
    if path is None:
        path = CONFIGS / ("tiny.yaml" if quick else "demo.yaml")
        if not path.is_file():
            raise InputError(f"the demo's config {path} is missing; pass one with --config (see configs/ in the repo)")
    return load_config(path, overrides)


def _tiny_model(out: Path, log: Path, seed: int) -> str:
    """A tiny Llama with a tokenizer trained on the log's own prompts and answers (``demo --quick``)."""
    frame = pl.read_parquet(log).select("prompt", "reference").drop_nulls().unique()
    texts = frame["prompt"].to_list() + frame["reference"].to_list()
    return str(build_tiny_model(out / "tiny-model", texts=texts, n_layers=4, hidden=64, seed=seed))


class _Stages:
    """Runs named stages in order, timing each and echoing progress."""

    def __init__(self, echo: Callable[[str], None]):
        self.echo = echo
        self.timings: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        i = STAGES.index(name) + 1
        self.echo(click.style(f"[{i}/{len(STAGES)}] {name}", bold=True))
        t = time.perf_counter()
        result = fn()
        self.timings[name] = time.perf_counter() - t
        self.echo(f"      done in {self.timings[name]:.1f} s")
        return result


def _clear_previous(out: Path, artifacts: dict[str, Path], echo: Callable[[str], None]) -> None:
    """A re-run starts clean, so the demo's numbers are its own -- but only in a folder a demo made (it holds
    the marker file): anything else there is the user's, and the demo refuses rather than delete it."""
    old = [p for p in artifacts.values() if p.exists()]
    if old and not (out / MARKER).is_file():
        raise InputError(f"demo --out {out}: the folder has files the demo did not write "
                         f"({', '.join(p.name for p in old[:4])}); pass an empty or new folder")
    if old:
        echo(f"replacing the previous demo's artifacts in {out}")
    for p in old:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _weak_domains(domains: list[str], seed: int) -> list[str]:
    """The domains v1 barely trains on: drawn by the seed, so another seed tells the story elsewhere."""
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(sorted(domains), size=min(WEAK_DOMAINS, len(domains) - 1), replace=False).tolist())


def run_demo(out: str | Path = "demo-out", quick: bool = False, pool: str = "builtin", config: str | Path | None = None,
             overrides: tuple[str, ...] = (), echo: Callable[[str], None] = click.echo) -> DemoResult:
    """Run the loop into ``out`` and return the artifacts and the closing summary."""
    cfg = demo_config(quick, config, overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    a = {"launch": out / "launch", "v1": out / "v1", "log": out / "logs.jsonl", "truth": out / "logs.truth.json",
         "store": out / "store.duckdb", "plan": out / "plan.json", "run": out / "run", "export": out / "export",
         "eval": out / "eval.json", "report": out / "report.html", "tiny": out / "tiny-model"}
    _clear_previous(out, a, echo)
    (out / MARKER).write_text("written by `adaptive-ft demo`; the demo replaces only its own artifacts here\n")
    a["launch"].mkdir()
    st = _Stages(echo)
    launch_log, launch_store = a["launch"] / "logs.parquet", a["launch"] / "store.duckdb"

    def launch() -> tuple[dict[str, int], list[str]]:
        simulate(cfg.simulate, launch_log, "parquet", pool=pool, seed=cfg.seed)
        ingest([launch_log], store=launch_store, config=cfg.ingest)
        with Store.open(launch_store, read_only=True) as s:
            counts = dict(s.examples().group_by("domain").len().iter_rows())
        weak = _weak_domains(list(counts), cfg.seed)
        launch_plan(counts, weak, WEAK_FACTOR).save(a["launch"] / "plan.json")
        return counts, weak

    counts, weak = st.run("launch log", launch)
    echo(f"      v1 will launch on {', '.join(d for d in sorted(counts) if d not in weak)}; "
         f"it barely sees {', '.join(weak)} ({WEAK_FACTOR:.0%} of their share)")
    model = _tiny_model(out, launch_log, cfg.seed) if quick or cfg.model == "tiny" else cfg.model
    v1_layers = f"last:{cfg.prioritize.layers_k}"
    v1 = st.run("train v1", lambda: train(cfg, launch_store, a["launch"] / "plan.json", model, a["v1"],
                                          layers=v1_layers))
    echo(f"      v1: {v1.steps} steps on layers {v1.layers}")
    responder = ModelResponder(str(a["v1"]), batch_size=cfg.evaluate.batch_size,
                               max_new_tokens=cfg.evaluate.max_new_tokens, name="v1")
    sim = st.run("v1 answers users", lambda: simulate(dataclasses.replace(cfg.simulate, model_version="v1"),
                                                      a["log"], "jsonl", pool=pool, seed=cfg.seed + 1,
                                                      responder=responder))
    echo(f"      {sim.n_events:,} events from {sim.n_users:,} users over {sim.n_examples:,} examples, "
         "feedback from v1's own answers")
    rep = st.run("ingest", lambda: ingest([a["log"]], store=a["store"], config=cfg.ingest))
    echo(f"      {rep.summary()}")
    res = run_loop(a["store"], a["v1"], out, cfg, echo=echo, export_cfg=cfg.export, v2_name="run",
                   run_step=st.run)
    truth = json.loads(sim.truth_path.read_text())
    summary = res.summary + [_v1_truth_line(truth, weak), _size_line(out / "export" / "manifest.json")]
    return DemoResult(out=out, report=res.report or a["report"], artifacts=a, timings=st.timings, summary=summary)


def _v1_truth_line(truth: dict[str, Any], weak: list[str]) -> str:
    """What v1 really failed (the simulation's measured truth), to hold the plan's reading of the logs against."""
    fails: dict[str, list[float]] = {}
    for row in truth.get("need", []):
        if row["queries"]:
            f = fails.setdefault(row["domain"], [0.0, 0.0])
            f[0] += row["failure_rate"] * row["queries"]
            f[1] += row["queries"]
    rates = {d: w / n for d, (w, n) in fails.items() if n}
    worst = sorted(rates, key=lambda d: -rates[d])[:3]
    return ("v1's measured failure (simulation truth): " + "; ".join(f"{d} {rates[d]:.0%}" for d in worst)
            + f" (barely trained: {', '.join(weak)})")


def _size_line(manifest: Path) -> str:
    if not manifest.is_file():
        return "Quantized model: not exported"
    sizes = {v["name"]: v["size_bytes"] for v in json.loads(manifest.read_text()).get("variants", [])}
    q = "nf4" if "nf4" in sizes else ("int8" if "int8" in sizes else None)
    if q and "merged" in sizes:
        return f"Quantized model ({q}): {sizes[q] / 2**20:.1f} MiB vs {sizes['merged'] / 2**20:.1f} MiB merged"
    return "Quantized model: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items())
