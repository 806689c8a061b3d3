"""The report: one page that answers "what did we train on, why, and did it help everyone?".

``build_report`` reads whichever artifacts it is given — the store, ``plan.json``, a train ``RUN/``,
``eval.json``, an ``EXPORT/`` folder (shapes in ``docs/contracts.md``) — and writes three files side by side:

- ``report.html``: one self-contained page (styles and PNG plots inline, nothing fetched from anywhere);
- ``report.md``: the same summary and tables as Markdown;
- ``report.json``: the numbers behind every section.

Each input adds its sections; a plot or table whose data is missing is left out rather than drawn empty.
This module holds the entry point; the inputs are read in :mod:`adaptive_ft.report.inputs`, the sections are built in
:mod:`adaptive_ft.report.sections`, rendered by :mod:`adaptive_ft.report.render`, plotted by
:mod:`adaptive_ft.report.plots`.
"""

from __future__ import annotations

import contextlib
import json
from datetime import datetime, timezone
from pathlib import Path

from adaptive_ft.errors import InputError
from adaptive_ft.report import plots, render
from adaptive_ft.report import sections as rs
from adaptive_ft.report.inputs import Artifacts, ReportInputs, load_artifacts
from adaptive_ft.report.page import Report, ReportResult

# ----------------------------------------------------------------------------------------------- entry


def build_report(inputs: ReportInputs, out: str | Path, draw: bool = True) -> ReportResult:
    """Read the given artifacts and write ``report.html``, ``report.md`` and ``report.json``.

    ``out`` is the HTML path (the other two take its stem) or a folder to write ``report.*`` into.
    ``draw=False`` leaves the plots out (tables and numbers only, several times faster).
    """
    if not inputs.given():
        raise InputError("report: nothing to report on. Give at least one of --store, --plan, --run, --eval, "
                         "--export.")
    html_path, md_path, json_path = report_paths(out)
    with contextlib.nullcontext() if draw else plots.disabled():
        report = assemble(load_artifacts(inputs), inputs)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(render.to_html(report), encoding="utf-8")
    md_path.write_text(render.to_markdown(report), encoding="utf-8")
    json_path.write_text(json.dumps(render.to_json(report), indent=2, allow_nan=False, default=str) + "\n")
    return ReportResult(html=html_path, markdown=md_path, json=json_path,
                        sections=[s.id for s in report.sections],
                        figures=sum(len(s.figures) for s in report.sections), summary=report.summary.data,
                        bullets=[str(b).replace("**", "") for b in report.summary.bullets])


def report_paths(out: str | Path) -> tuple[Path, Path, Path]:
    """The three files a report to ``out`` writes: the HTML page and the ``.md`` and ``.json`` beside it."""
    out = Path(out)
    if out.suffix == "" or out.is_dir():
        html = out / "report.html"
    elif out.suffix.lower() not in (".html", ".htm"):
        raise InputError(f"report: --out {out} should end in .html (report.md and report.json are written "
                         "beside it) or be a folder.")
    else:
        html = out
    return html, html.with_suffix(".md"), html.with_suffix(".json")


def assemble(arts: Artifacts, inputs: ReportInputs) -> Report:
    """Every section the artifacts support, in reading order, and the summary on top."""
    sections = [s for b in rs.BUILDERS if (s := b(arts)) is not None]
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return Report(title=inputs.title or _default_title(arts), generated=generated, inputs=inputs.given(),
                  summary=rs.summary(arts), sections=sections)


def _default_title(arts: Artifacts) -> str:
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


