"""One turn of the loop: the deployed model v1's own logs -> plan -> v2 trained from v1's adapter -> v1 vs v2.

DESIGN.md, "Closing the loop": v1 answers users, its wrong answers draw the negative feedback, ``prioritize``
reads those logs, v2 continues v1's adapter (same layers, ``--init-adapter``) with the plan's sample, and
``evaluate`` scores v1 and v2 on the same held-out test split (examples neither trained on), per segment and
domain, with v1 as the baseline of every paired interval: what v2 fixed, and whom it harmed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from adaptive_ft.artifacts.eval import EvalView
from adaptive_ft.artifacts.plan import DomainScore, Plan
from adaptive_ft.artifacts.run import is_run
from adaptive_ft.config import Config
from adaptive_ft.errors import InputError
from adaptive_ft.evaluate import evaluate
from adaptive_ft.export import export
from adaptive_ft.finetune import train
from adaptive_ft.lm.models import read_run
from adaptive_ft.prioritize import prioritize
from adaptive_ft.report import ReportInputs, build_report


@dataclass
class LoopResult:
    """Where the turn's artifacts went, how long each step took, and the closing summary lines."""

    out: Path
    plan: Path
    v2: Path
    eval: Path
    report: Path | None
    timings: dict[str, float] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)
    eval_data: dict[str, Any] = field(default_factory=dict)


def launch_plan(domain_counts: dict[str, int], weak: list[str], weak_factor: float = 0.04) -> Plan:
    """The training mix of a v1 a team would have deployed (simulations of the loop): every domain in
    proportion to its examples, except ``weak``, the domains it barely saw, at ``weak_factor`` of their share."""
    unknown = sorted(set(weak) - set(domain_counts))
    if unknown:
        raise InputError(f"launch plan: weak domains {unknown} are not in the store (it has {sorted(domain_counts)})")
    shares = {d: n * (weak_factor if d in weak else 1.0) for d, n in domain_counts.items()}
    total = sum(shares.values())
    domains = [DomainScore(domain=d, priority=shares[d] / total, share=shares[d] / total) for d in sorted(shares)]
    return Plan(domains=domains, inputs={"derived_from": "launch mix", "weak_domains": sorted(weak),
                                         "weak_factor": weak_factor})


def check_v1(v1: str | Path) -> dict[str, Any]:
    """v1's manifest; a clear error when ``v1`` is not a train RUN (the loop continues its adapter)."""
    path = Path(v1)
    if not is_run(path):
        raise InputError(f"--v1 {v1}: not a train RUN folder (manifest.json and adapter/); the loop trains v2 "
                         "from v1's adapter, so pass the folder `adaptive-ft train --out` wrote for v1")
    return read_run(path)


def v1_examples(v1: Path) -> "pl.DataFrame":
    """The labelled examples v1 was split from (``RUN/split.parquet``, every split)."""
    path = Path(v1) / "split.parquet"
    if not path.is_file():
        raise InputError(f"{path}: missing; the loop needs v1's split to keep v2's test split the same")
    return pl.read_parquet(path).select("example_id", "domain", "prompt", "reference")


def v2_config(cfg: Config, v1_manifest: dict[str, Any]) -> Config:
    """The config v2 trains with: v1's LoRA shape and split (so its adapter loads and the test split is the
    same held-out set), the given training budget."""
    v1_cfg = v1_manifest.get("config") or {}
    lora = v1_cfg.get("train", {}).get("lora", {})
    train = cfg.train
    if lora:
        train = dataclasses.replace(train, lora=dataclasses.replace(train.lora, **{
            k: v for k, v in lora.items() if k in ("r", "alpha", "target_modules")}))
    split = {k: v1_cfg.get("train", {}).get(k) for k in ("val_fraction", "test_fraction")}
    train = dataclasses.replace(train, **{k: v for k, v in split.items() if v is not None})
    seed = v1_cfg.get("seed", cfg.seed)
    return dataclasses.replace(cfg, train=train, seed=seed)


def run_loop(store: str | Path, v1: str | Path, out: str | Path, cfg: Config, extra_models: list[str] | None = None,
             report: bool = True, echo: Callable[[str], None] = print, progress: bool = False,
             export_cfg: Any = None, v2_name: str = "v2",
             run_step: Callable[[str, Callable[[], Any]], Any] | None = None) -> LoopResult:
    """prioritize(store) -> train v2 from v1 -> [export v2] -> evaluate v1 vs v2 (+ ``extra_models`` and v2's
    int8 / nf4 when exported) -> report, into ``out``. ``run_step(name, fn)`` times and announces each step
    (the demo's stage printer); by default each is echoed and timed here."""

    v1 = Path(v1)
    man = check_v1(v1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = v2_config(cfg, man)
    paths = {"plan": out / "plan.json", "v2": out / v2_name, "eval": out / "eval.json", "report": out / "report.html",
             "export": out / "export"}
    timings: dict[str, float] = {}

    def step(name: str, fn: Callable[[], Any]) -> Any:
        if run_step is not None:
            return run_step(name, fn)
        echo(f"loop: {name}")
        t = time.perf_counter()
        result = fn()
        timings[name] = time.perf_counter() - t
        return result

    pr = step("prioritize", lambda: prioritize(store, cfg, paths["plan"], model=None, progress=progress))
    # v2 splits v1's own examples with v1's seed: the same test split, so no example v1 trained on is ever
    # scored, and v1 and v2 are compared on exactly the same held-out queries.
    examples = v1_examples(v1)
    tr = step("train", lambda: train(cfg, store, paths["plan"], man["base_model_path"], paths["v2"],
                                     init_adapter=v1 / "adapter", layers=man.get("layers"), examples=examples))
    echo(f"      v2: {tr.steps} steps from v1's adapter on v1's layers {tr.layers} ({tr.stop_reason})")
    models = [str(v1), str(paths["v2"]), *(extra_models or [])]
    export_path = None
    if export_cfg is not None:
        ex = step("export", lambda: export(paths["v2"], paths["export"], export_cfg))
        export_path = paths["export"]
        models += [str(paths["export"] / v.path) for v in ex.variants if v.name in ("int8", "nf4")]
    ecfg = dataclasses.replace(cfg.evaluate, baseline=str(v1))
    ev = step("evaluate", lambda: evaluate(store, models, paths["eval"], ecfg, run=paths["v2"]))
    report_path = None
    if report:
        inputs = ReportInputs(store=Path(store), plan=paths["plan"], run=paths["v2"], eval=paths["eval"],
                              export=export_path, title=f"v1 → v2: {v1.name} → {paths['v2'].name}")
        report_path = step("report", lambda: build_report(inputs, paths["report"])).html
    return LoopResult(out=out, plan=paths["plan"], v2=paths["v2"], eval=paths["eval"], report=report_path,
                      timings=timings, summary=loop_summary(pr.plan, ev.data, str(v1), str(paths["v2"])),
                      eval_data=ev.data)



def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def loop_summary(plan: Any, data: dict[str, Any], v1: str, v2: str) -> list[str]:
    """What a person wants to know after a turn: where v1 failed (the logs' view), what the plan drew, what v2
    fixed per domain and segment, and whoever got significantly worse."""
    weak = sorted(plan.domains, key=lambda d: -d.failure)[:3]
    lines = ["Where v1 failed (from its logs): " + "; ".join(f"{d.domain} {d.failure:.0%} expected failure"
                                                             for d in weak)]
    lines.append("Targeted: " + "; ".join(f"{d.domain} {d.share:.0%} of the draws" for d in plan.domains[:3]))
    ev = EvalView(data)
    lines.append("v1 -> v2 where v1 failed: " + "; ".join(
        f"{d.domain}: {_pct(ev.value(v1, 'domain', domain=d.domain))} -> {_pct(ev.value(v2, 'domain', domain=d.domain))}"
        for d in weak))
    lines.append("v1 -> v2 per segment: " + "; ".join(
        f"{s}: {_pct(ev.value(v1, 'segment', s))} -> {_pct(ev.value(v2, 'segment', s))}"
        for s in sorted(ev.names("segment"))) + f" (overall {_pct(ev.value(v1, 'overall'))} -> {_pct(ev.value(v2, 'overall'))})")
    worse = [f"segment {f['segment']} ({f['delta']:+.1%})" for f in data.get("flags", []) if f["model"] == v2]
    worse += [f"domain {f['domain']} ({f['delta']:+.1%})" for f in data.get("domain_flags", []) if f["model"] == v2]
    lines.append("Significantly worse than v1 (95% paired interval below 0): " + (", ".join(worse) if worse else "none"))
    return lines


__all__ = ["LoopResult", "check_v1", "launch_plan", "loop_summary", "run_loop", "v2_config"]
