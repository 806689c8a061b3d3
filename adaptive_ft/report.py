"""The report: one page that answers "what did we train on, why, and did it help everyone?".

``build_report`` reads whichever artifacts it is given — the store, ``plan.json``, a train ``RUN/``,
``eval.json``, an ``EXPORT/`` folder (shapes in ``docs/contracts.md``) — and writes three files side by side:

- ``report.html``: one self-contained page (styles and PNG plots inline, nothing fetched from anywhere);
- ``report.md``: the same summary and tables as Markdown;
- ``report.json``: the numbers behind every section.

Each input adds its sections; a plot or table whose data is missing is left out rather than drawn empty.
This module holds the entry point, the inputs and the report's building blocks; the sections are built in
:mod:`adaptive_ft.report_sections`, rendered by :mod:`adaptive_ft.report_render`, plotted by
:mod:`adaptive_ft.report_plots`.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


from adaptive_ft import report_plots as plots
from adaptive_ft.errors import InputError, read_json
from adaptive_ft.prioritize.plan import Plan

LOWER_IS_BETTER = ("loss", "perplexity", "ppl")
TOP_WHY = 3  # plan domains named in the summary


# ----------------------------------------------------------------------------------------------- model


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


@dataclass
class Cell:
    """A table cell: the main text, an optional smaller note (a CI, a count) and a tone (good/bad/muted)."""

    text: str
    note: str = ""
    tone: str = ""

    def plain(self) -> str:
        return f"{self.text} ({self.note})" if self.note else self.text


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Cell | str]]
    caption: str = ""
    kind: str = ""  # "facts": a two-column key/value list


@dataclass
class Figure:
    png: bytes
    alt: str
    caption: str = ""


@dataclass
class Section:
    """One titled part of the report. ``data`` holds its numbers for report.json."""

    id: str
    title: str
    intro: str = ""
    callouts: list[tuple[str, str]] = field(default_factory=list)  # (tone: good|bad|warn|info, text)
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Tile:
    """A headline figure in the summary card."""

    label: str
    value: str
    detail: str = ""
    tone: str = ""


@dataclass
class Bullet:
    """A summary sentence with sub-points (e.g. each top domain and why)."""

    text: str
    children: list[str] = field(default_factory=list)
    text_only: bool = False  # said by the HTML summary another way (the per-segment chips): Markdown/CLI only

    def __str__(self) -> str:
        return "\n".join([self.text, *(f"  - {c}" for c in self.children)])


@dataclass
class Summary:
    tiles: list[Tile] = field(default_factory=list)
    bullets: list[str | Bullet] = field(default_factory=list)
    chips: list[Tile] = field(default_factory=list)  # per-segment change of the primary metric
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    title: str
    generated: str
    inputs: dict[str, str]
    summary: Summary
    sections: list[Section]


@dataclass
class ReportResult:
    """What ``build_report`` wrote."""

    html: Path
    markdown: Path
    json: Path
    sections: list[str]
    figures: int
    summary: dict[str, Any]
    bullets: list[str] = field(default_factory=list)  # the summary's sentences, as plain text


# ----------------------------------------------------------------------------------------------- entry


def build_report(inputs: ReportInputs, out: str | Path, draw: bool = True) -> ReportResult:
    """Read the given artifacts and write ``report.html``, ``report.md`` and ``report.json``.

    ``out`` is the HTML path (the other two take its stem) or a folder to write ``report.*`` into.
    ``draw=False`` leaves the plots out (tables and numbers only, several times faster).
    """
    from adaptive_ft import report_render as render

    if not inputs.given():
        raise InputError("report: nothing to report on. Give at least one of --store, --plan, --run, --eval, "
                         "--export.")
    html_path = _html_path(Path(out))
    with contextlib.nullcontext() if draw else plots.disabled():
        report = assemble(load_artifacts(inputs), inputs)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    md_path, json_path = html_path.with_suffix(".md"), html_path.with_suffix(".json")
    html_path.write_text(render.to_html(report), encoding="utf-8")
    md_path.write_text(render.to_markdown(report), encoding="utf-8")
    json_path.write_text(json.dumps(render.to_json(report), indent=2, allow_nan=False, default=str) + "\n")
    return ReportResult(html=html_path, markdown=md_path, json=json_path,
                        sections=[s.id for s in report.sections],
                        figures=sum(len(s.figures) for s in report.sections), summary=report.summary.data,
                        bullets=[str(b).replace("**", "") for b in report.summary.bullets])


def _html_path(out: Path) -> Path:
    if out.suffix == "" or out.is_dir():
        return out / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise InputError(f"report: --out {out} should end in .html (report.md and report.json are written "
                         "beside it) or be a folder.")
    return out


def assemble(arts: "Artifacts", inputs: ReportInputs) -> Report:
    """Every section the artifacts support, in reading order, and the summary on top."""
    from adaptive_ft import report_sections as rs

    sections = [s for b in rs.BUILDERS if (s := b(arts)) is not None]
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return Report(title=inputs.title or _default_title(arts), generated=generated, inputs=inputs.given(),
                  summary=rs.summary(arts), sections=sections)


def _default_title(arts: "Artifacts") -> str:
    base = (arts.run_manifest or {}).get("base_model")
    if base and arts.run_path is not None:
        return f"{Path(str(base)).name} fine-tune {arts.run_path.name}"
    if arts.eval is not None:
        return f"Evaluation of {len(arts.eval.models)} models"
    if arts.plan is not None:
        return "Fine-tuning plan"
    if arts.export is not None:
        return "Export variants"
    return "Interaction data" if arts.store is not None else "adaptive-ft report"


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
    """Aggregates of the interaction store through its read API (never its tables' internals)."""
    from adaptive_ft.store import Store

    if not path.is_file():
        raise InputError(f"store not found: {path}. Create it with `adaptive-ft ingest LOGS --store {path}`.")
    with Store.open(path, read_only=True) as s:
        counts = s.segment_domain_counts()
        facts = {"path": str(path), "fingerprint": s.fingerprint(), "counts": counts.to_dicts()}
        for name, sql in (("users", "SELECT count(*) AS n FROM users"),
                          ("examples", "SELECT count(*) AS n FROM examples"),
                          ("batches", "SELECT count(*) AS n FROM batches"),
                          ("rejected", "SELECT count(*) AS n FROM rejected")):
            facts[name] = int(s.sql(sql)["n"][0])
    return facts


# ----------------------------------------------------------------------------------------------- formatting


def is_rate(metric: str) -> bool:
    """Accuracy-like metrics live in [0, 1] and read best as percentages; losses do not."""
    return not any(w in metric.lower() for w in LOWER_IS_BETTER)


def higher_is_better(metric: str) -> bool:
    """False for losses and perplexities, where a drop is the improvement."""
    return not any(w in metric.lower() for w in LOWER_IS_BETTER)


def fmt_value(v: float | None, pct: bool) -> str:
    """'71.3%' for a rate, '2.314' otherwise, '—' for no value."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v * 100:.1f}%" if pct else f"{v:.3f}"


def fmt_delta(d: float | None, pct: bool) -> str:
    """'+11.3 pts' for a rate (percentage points), '-0.120' otherwise."""
    if d is None or (isinstance(d, float) and math.isnan(d)):
        return "—"
    return f"{d * 100:+.1f} pts" if pct else f"{d:+.3f}"


def fmt_bytes(n: float | None) -> str:
    """Decimal units, as file managers show sizes: '120 MB', '2.5 GB'."""
    if not n:
        return "—"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n / scale < 100 else f"{n / scale:.0f} {unit}"
    return f"{int(n)} B"


def as_number(x: Any) -> float | None:
    """A finite float, or None for anything else (None, NaN, strings, booleans)."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def tone_of(delta: float | None, metric: str) -> str:
    """'good' when the change is an improvement for ``metric``, 'bad' when it is a regression, else ''."""
    if delta is None or abs(delta) < 1e-12:
        return ""
    return "good" if (delta > 0) == higher_is_better(metric) else "bad"


# ----------------------------------------------------------------------------------------------- eval view


class EvalView:
    """Lookups over eval.json: which model is the base and which the fine-tune, and each metric cell."""

    def __init__(self, doc: dict[str, Any], run_hint: Path | None = None):
        if not isinstance(doc.get("metrics"), list) or not isinstance(doc.get("models"), list):
            raise InputError("eval.json: needs 'models' and 'metrics' lists (see docs/contracts.md); "
                             "write it with `adaptive-ft evaluate`.")
        self.doc = doc
        self.models: list[str] = [str(m) for m in doc["models"]]
        self.metric: str = doc.get("primary_metric") or (doc["metrics"][0]["metric"] if doc["metrics"] else "")
        self.pct = is_rate(self.metric)
        self.cells: dict[tuple, dict[str, Any]] = {}
        for row in doc["metrics"]:
            key = (row.get("model"), row.get("scope"), row.get("segment"), row.get("domain"), row.get("metric"))
            self.cells[key] = row
        self.base, self.tuned = self._pick(run_hint)
        self.labels = short_labels(self.models)

    def label(self, model: str | None) -> str:
        """The model's name as tables and plots show it (paths shortened to their last two parts)."""
        return self.labels.get(model, str(model)) if model is not None else "—"

    def _pick(self, run_hint: Path | None) -> tuple[str | None, str | None]:
        models = self.models
        baseline = self.doc.get("baseline")  # evaluate's paired baseline (the loop's v1), when it names one
        base = baseline if baseline in models else ("base" if "base" in models else (models[0] if models else None))
        rest = [m for m in models if m != base]
        if self.doc.get("finetuned_model") in rest:  # evaluate says which model is the fine-tune
            return base, self.doc["finetuned_model"]
        if run_hint is not None:
            for m in rest:
                if Path(m).name == run_hint.name or Path(m) == run_hint:
                    return base, m
        plain = [m for m in rest if not self.is_variant(m)]
        return base, (plain or rest or [None])[0]

    def is_variant(self, model: str) -> bool:
        """An export variant (export/int8, …/model-q8_0.gguf) rather than a train run."""
        name = Path(model).name.lower()
        return model in (self.doc.get("variants") or {}) or name in ("merged", "int8", "nf4") \
            or name.startswith("gguf") or name.endswith(".gguf")

    def cell(self, model: str | None, scope: str, segment: str | None = None, domain: str | None = None,
             metric: str | None = None) -> dict[str, Any] | None:
        return self.cells.get((model, scope, segment, domain, metric or self.metric))

    def value(self, model: str | None, scope: str, segment: str | None = None,
              domain: str | None = None) -> float | None:
        row = self.cell(model, scope, segment, domain)
        return as_number(row.get("value")) if row and row.get("enough", True) else None

    def names(self, scope: str) -> list[str]:
        """Segment or domain names in first-seen order."""
        key = "segment" if scope == "segment" else "domain"
        seen: dict[str, None] = {}
        for row in self.doc["metrics"]:
            if row.get("scope") == scope and row.get(key) is not None:
                seen.setdefault(str(row[key]), None)
        return list(seen)

    def delta(self, scope: str, segment: str | None = None, domain: str | None = None) -> float | None:
        b, t = self.value(self.base, scope, segment, domain), self.value(self.tuned, scope, segment, domain)
        return None if b is None or t is None or self.tuned is None else t - b

    def paired_delta(self, segment: str) -> dict[str, Any] | None:
        """evaluate's paired-bootstrap delta (fine-tuned − base) for a segment, with its CI, when it wrote one."""
        return next((d for d in self.doc.get("deltas") or [] if isinstance(d, dict) and d.get("model") == self.tuned
                     and d.get("segment") == segment and d.get("metric", self.metric) == self.metric), None)

    def flags(self) -> list[dict[str, Any]]:
        return [f for f in self.doc.get("flags") or [] if isinstance(f, dict)]


def short_labels(models: list[str]) -> dict[str, str]:
    """'/tmp/exp/ftexp/int8' -> 'ftexp/int8'; names stay whole when shortening would make two alike."""
    short = {m: "/".join(Path(m).parts[-2:]) if len(Path(m).parts) > 2 else m for m in models}
    return short if len(set(short.values())) == len(models) else {m: m for m in models}
