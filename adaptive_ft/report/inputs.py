"""The report's inputs: which artifacts it was given, and each read and checked (missing or malformed: an error naming it)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptive_ft.artifacts.eval import EvalView
from adaptive_ft.artifacts.plan import Plan
from adaptive_ft.errors import InputError, read_json
from adaptive_ft.store import Store
from adaptive_ft.store.stats import store_stats


@dataclass
class ReportInputs:
    """Paths of the artifacts to report on; any subset (at least one)."""

    store: Path | None = None
    plan: Path | None = None
    run: Path | None = None
    eval: Path | None = None
    export: Path | None = None
    title: str = ""  # empty: one is made from the inputs ("smollm2 fine-tune r1")

    def given(self) -> dict[str, str]:
        return {k: str(v) for k, v in (("store", self.store), ("plan", self.plan), ("run", self.run),
                                       ("eval", self.eval), ("export", self.export)) if v is not None}


# ----------------------------------------------------------------------------------------------- inputs


@dataclass
class Artifacts:
    """The loaded inputs; ``None`` for those not given."""

    plan: Plan | None = None
    plan_path: Path | None = None
    run_path: Path | None = None
    run_manifest: dict[str, Any] | None = None
    run_metrics: list[dict[str, Any]] = field(default_factory=list)
    eval: "EvalView | None" = None
    export: dict[str, Any] | None = None
    store: dict[str, Any] | None = None


def load_artifacts(inputs: ReportInputs) -> Artifacts:
    """Read and check each given input; a missing or malformed one raises InputError/PlanError naming it."""
    arts = Artifacts()
    if inputs.plan is not None:
        arts.plan, arts.plan_path = Plan.load(inputs.plan), Path(inputs.plan)
    if inputs.run is not None:
        arts.run_path = Path(inputs.run)
        arts.run_manifest, arts.run_metrics = _load_run(arts.run_path)
    if inputs.eval is not None:
        arts.eval = EvalView(_read_json(Path(inputs.eval), "eval.json", "adaptive-ft evaluate"),
                             run_hint=arts.run_path)
    if inputs.export is not None:
        arts.export = _load_export(Path(inputs.export))
    if inputs.store is not None:
        arts.store = load_store_facts(Path(inputs.store))
    return arts


def _read_json(path: Path, what: str, writer: str) -> dict[str, Any]:
    doc = read_json(path, f"{what} not found: {path}. Write it with `{writer}`.")
    if not isinstance(doc, dict):
        raise InputError(f"{path}: expected a JSON object at the top level")
    return doc


def _load_run(run: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """RUN/manifest.json (may be absent while training) and RUN/metrics.jsonl (last line may be partial)."""
    if not run.is_dir():
        raise InputError(f"run folder not found: {run}. Train one with `adaptive-ft train --out {run}`.")
    manifest = _read_json(run / "manifest.json", "run manifest", "adaptive-ft train") \
        if (run / "manifest.json").is_file() else None
    metrics_path = run / "metrics.jsonl"
    if manifest is None and not metrics_path.is_file():
        raise InputError(f"{run}: neither manifest.json nor metrics.jsonl found; is this a train run folder?")
    return manifest, read_metrics(metrics_path) if metrics_path.is_file() else []


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl. A torn last line (a run still writing) is skipped; a bad line elsewhere raises."""
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                break
            raise InputError(f"{path}:{i}: not a JSON object ({e.msg}); fix or remove the line") from None
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _load_export(export: Path) -> dict[str, Any]:
    doc = _read_json(export / "manifest.json", "export manifest", "adaptive-ft export")
    if not isinstance(doc.get("variants"), list):
        raise InputError(f"{export / 'manifest.json'}: 'variants' must be a list of variant records")
    return doc


def load_store_facts(path: Path) -> dict[str, Any]:
    """The store's summary as ``adaptive-ft stats --json`` prints it (the store's read API, never its tables)."""
    if not path.is_file():
        raise InputError(f"store not found: {path}. Create it with `adaptive-ft ingest LOGS --store {path}`.")
    with Store.open(path, read_only=True) as s:
        return store_stats(s)


