"""The whole pipeline end to end: simulate -> ingest -> prioritize -> train -> export -> evaluate -> report.

Every stage is the same library function the CLI calls; the demo only chains them over one work folder and
prints what a person would want to know at the end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from adaptive_ft.config import Config, load_config
from adaptive_ft.errors import InputError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGES = ("simulate", "ingest", "prioritize", "train", "export", "evaluate", "report")


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
    import polars as pl

    from adaptive_ft.models import build_tiny_model

    frame = pl.read_ndjson(log, infer_schema_length=None).select("prompt", "reference").drop_nulls().unique()
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


def _clear_previous(artifacts: dict[str, Path], echo: Callable[[str], None]) -> None:
    """A re-run starts clean, so the demo's numbers are its own: remove the artifacts an earlier demo left."""
    import shutil

    old = [p for p in artifacts.values() if p.exists()]
    if old:
        echo(f"replacing the previous demo's artifacts in {old[0].parent}")
    for p in old:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def run_demo(out: str | Path = "demo-out", quick: bool = False, pool: str = "builtin", config: str | Path | None = None,
             overrides: tuple[str, ...] = (), echo: Callable[[str], None] = click.echo) -> DemoResult:
    """Run every stage into ``out`` and return the artifacts and a five-line summary."""
    from adaptive_ft.evaluate import evaluate
    from adaptive_ft.export import export
    from adaptive_ft.finetune import train
    from adaptive_ft.prioritize import prioritize
    from adaptive_ft.report import ReportInputs, build_report
    from adaptive_ft.simulate import simulate
    from adaptive_ft.store import ingest

    cfg = demo_config(quick, config, overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    a = {"log": out / "logs.jsonl", "store": out / "store.duckdb", "plan": out / "plan.json", "run": out / "run",
         "export": out / "export", "eval": out / "eval.json", "report": out / "report.html"}
    _clear_previous(a, echo)
    st = _Stages(echo)
    sim = st.run("simulate", lambda: simulate(cfg.simulate, a["log"], "jsonl", pool=pool, seed=cfg.seed))
    echo(f"      {sim.n_events:,} events from {sim.n_users:,} users over {sim.n_examples:,} examples")
    rep = st.run("ingest", lambda: ingest([a["log"]], store=a["store"], config=cfg.ingest))
    echo(f"      {rep.summary()}")
    model = _tiny_model(out, a["log"], cfg.seed) if quick or cfg.model == "tiny" else cfg.model
    pr = st.run("prioritize", lambda: prioritize(a["store"], cfg, a["plan"], model=model, progress=True))
    tr = st.run("train", lambda: train(cfg, a["store"], a["plan"], model, a["run"]))
    echo(f"      {tr.steps} steps on layers {tr.layers}, {tr.tokens_per_s:.0f} tokens/s ({tr.stop_reason})")
    ex = st.run("export", lambda: export(a["run"], a["export"], cfg.export))
    models = ["base", str(a["run"])] + [str(a["export"] / v.path) for v in ex.variants if v.name in ("int8", "nf4")]
    ev = st.run("evaluate", lambda: evaluate(a["store"], models, a["eval"], cfg.evaluate, run=a["run"]))
    inputs = ReportInputs(store=a["store"], plan=a["plan"], run=a["run"], eval=a["eval"], export=a["export"],
                          title="adaptive-ft demo" + (" (quick)" if quick else ""))
    rr = st.run("report", lambda: build_report(inputs, a["report"]))
    report_path = rr.html
    summary = summarize(pr.plan, ev.data, ex.variants, json.loads(sim.truth_path.read_text()), str(a["run"]))
    return DemoResult(out=out, report=report_path, artifacts=a, timings=st.timings, summary=summary)


def _cell(data: dict[str, Any], model: str, scope: str, segment: str | None = None) -> dict[str, Any] | None:
    metric = data.get("primary_metric", "accuracy")
    for m in data.get("metrics", []):
        if (m["model"] == model and m["scope"] == scope and m["metric"] == metric
                and (segment is None or m.get("segment") == segment)):
            return m
    return None


def _fmt(cell: dict[str, Any] | None) -> str:
    if not cell or cell.get("value") is None:
        return "n/a (too little traffic)"
    return f"{cell['value']:.1%}"


def summarize(plan: Any, data: dict[str, Any], variants: list[Any], truth: dict[str, Any], run: str) -> list[str]:
    """Five lines: what was prioritized and why, before/after on the highest-need segments, the worst
    segment, and the size of the quantized model."""
    top = plan.domains[:3]
    lines = ["Prioritized: " + "; ".join(f"{d.domain} ({d.why})" if d.why else d.domain for d in top)]
    need = sorted(truth.get("need", []), key=lambda r: -r["need"])
    segs = list(dict.fromkeys(r["segment"] for r in need))[:2]
    base_name = "base"
    ft = next((m for m in data.get("models", []) if m != base_name and Path(m).name == Path(run).name), run)
    lines.append("Highest-need segments (planted): " + ", ".join(segs))
    lines.append("Before -> after: " + "; ".join(
        f"{s}: {_fmt(_cell(data, base_name, 'segment', s))} -> {_fmt(_cell(data, ft, 'segment', s))}" for s in segs)
        + f" (overall {_fmt(_cell(data, base_name, 'overall'))} -> {_fmt(_cell(data, ft, 'overall'))})")
    worst = data.get("worst_segment") or {}
    flags = data.get("flags") or []
    lines.append(f"Worst segment: {worst.get('segment', 'n/a')} at {_fmt(worst)}"
                 + (f"; flagged worse than base: {', '.join(f['segment'] for f in flags)}" if flags
                    else "; no segment got significantly worse"))
    sizes = {v.name: v.size_bytes for v in variants}
    q = "nf4" if "nf4" in sizes else ("int8" if "int8" in sizes else None)
    if q and "merged" in sizes:
        lines.append(f"Quantized model ({q}): {sizes[q] / 2**20:.1f} MiB vs {sizes['merged'] / 2**20:.1f} MiB merged")
    elif sizes:
        name, size = next(iter(sizes.items()))
        lines.append(f"Exported {name}: {size / 2**20:.1f} MiB")
    return lines
