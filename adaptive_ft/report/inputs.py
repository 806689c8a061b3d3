"""The report's inputs: which artifacts it was given, and each read and checked (missing or malformed: an error naming it)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptive_ft.artifacts.eval import EvalView
from adaptive_ft.artifacts.plan import Plan
from adaptive_ft.errors import InputError, read_json
from adaptive_ft.files import file_sha256
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
                             run_hint=arts.run_path, source=inputs.eval)
    if inputs.export is not None:
        arts.export = _load_export(Path(inputs.export))
    if inputs.store is not None:
        arts.store = load_store_facts(Path(inputs.store))
    problems = mismatches(arts, inputs)
    if problems:
        raise InputError("report: the artifacts given are not from one run:\n" + "\n".join(f"  - {p}" for p in problems)
                         + "\nGive the plan, run, eval and export of one run (or leave out the one that differs).")
    return arts


def _same_path(recorded: Any, given: Path) -> bool | None:
    """Whether a path an artifact recorded is ``given``; None when it cannot tell (no path, or none there now)."""
    if not recorded or not Path(str(recorded)).exists():
        return None
    return Path(str(recorded)).resolve() == given.resolve()


def mismatches(arts: Artifacts, inputs: ReportInputs) -> list[str]:
    """Which given artifacts do not belong with the run, by the hashes and paths they recorded.

    plan <-> run: the run's ``plan_sha256`` against the plan file. eval <-> run: the split each scored
    (``split_sha256``; an older eval.json without it, by the run path it recorded). export <-> run: the run
    path the export manifest recorded. Only what was recorded is compared: a hand-made artifact without those
    fields passes.
    """
    run, man, out = arts.run_path, arts.run_manifest or {}, []
    if run is None:
        return out
    if arts.plan_path is not None and man.get("plan_sha256") and man["plan_sha256"] != file_sha256(arts.plan_path):
        out.append(f"plan {inputs.plan} is not the plan run {run} was trained on (the run records plan_sha256 "
                   f"{man['plan_sha256'][:12]}, from {man.get('plan', '?')})")
    if arts.eval is not None:
        doc = arts.eval.doc
        if doc.get("split_sha256") and man.get("split_sha256"):
            same = doc["split_sha256"] == man["split_sha256"]
        else:
            same = _same_path(doc.get("run"), run)
        if same is False:
            out.append(f"eval {inputs.eval} scored the test split of run {doc.get('run')}, not of run {run}")
    if arts.export is not None and _same_path(arts.export.get("run"), run) is False:
        out.append(f"export {inputs.export} was exported from run {arts.export.get('run')}, not from run {run}")
    return out


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


