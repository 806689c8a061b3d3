"""The report's building blocks (cells, tables, figures, sections, the summary) and how values are written.

Sections (:mod:`adaptive_ft.report.sections`) fill these; the renderers (:mod:`adaptive_ft.report.render`)
turn them into HTML, Markdown and JSON. Nothing here reads a file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptive_ft.artifacts.eval import as_number, is_rate, short_labels  # noqa: F401  (re-used by sections)

TOP_WHY = 3  # plan domains named in the summary


# ----------------------------------------------------------------------------------------------- model
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


# ----------------------------------------------------------------------------------------------- formatting






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




def tone_of(delta: float | None, metric: str) -> str:
    """'good' when the change is an improvement for ``metric``, 'bad' when it is a regression, else ''."""
    if delta is None or abs(delta) < 1e-12:
        return ""
    return "good" if (delta > 0) == is_rate(metric) else "bad"

