"""Render a :class:`~adaptive_ft.report.Report` as one self-contained HTML page, as Markdown, and as JSON.

The HTML carries its stylesheet (``adaptive_ft/data/report.css``) and its plots (PNG data URIs) inline and
references nothing outside itself, so it opens the same from a laptop, a CI artifact or an e-mail.
"""

from __future__ import annotations

import base64
import html
import math
import re
from importlib import resources
from typing import Any

import numpy as np

from adaptive_ft.report.page import Bullet, Cell, Figure, Report, Section, Table

_NUMERIC = re.compile(r"^[+\-−×]?[\d.,]+\s*(%|pts|[kMG]?B|s)?$|^—$")
_TONE_ICON = {"good": "✓", "bad": "⚠", "warn": "!", "info": "i"}
FOLD_ROWS = 15  # longer tables fold behind a <details> so the page stays scannable


# ----------------------------------------------------------------------------------------------- HTML


def _css() -> str:
    return resources.files("adaptive_ft").joinpath("data/report.css").read_text(encoding="utf-8")


def _inline(text: str) -> str:
    """Escape, then the two bits of Markdown the report's prose uses: **bold** and `code`."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def to_html(report: Report) -> str:
    """The whole page as a string."""
    toc = "".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in report.sections) \
        if len(report.sections) > 2 else ""  # a table of contents for one or two sections is noise
    body = "\n".join(_section_html(s, i + 1) for i, s in enumerate(report.sections))
    inputs = " · ".join(f"{k}: <code>{html.escape(v)}</code>" for k, v in report.inputs.items())
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light">
<title>{html.escape(report.title)}</title>
<style>
{_css()}
</style>
</head>
<body>
<header class="hero"><div class="wrap">
<p class="eyebrow">adaptive-ft · fine-tuning report</p>
<h1>{html.escape(report.title)}</h1>
<p class="meta">Generated {html.escape(report.generated)}<br>{inputs}</p>
</div></header>
<main class="wrap">
{_summary_html(report)}
{f'<nav class="toc" aria-label="Sections">{toc}</nav>' if toc else ""}
{body}
</main>
<footer class="wrap">Written by <code>adaptive-ft report</code>. The same content is in report.md; every number
is in report.json.</footer>
</body>
</html>
"""


def _summary_html(report: Report) -> str:
    tiles = "".join(
        f'<div class="tile {t.tone}"><div class="tile-label">{html.escape(t.label)}</div>'
        f'<div class="tile-value">{html.escape(t.value)}</div>'
        f'<div class="tile-detail">{html.escape(t.detail)}</div></div>' for t in report.summary.tiles)
    bullets = "".join(_bullet_html(b) for b in report.summary.bullets
                      if not (isinstance(b, Bullet) and b.text_only and report.summary.chips))
    if not tiles and not bullets:
        return ""
    return (f'<section class="card summary" id="summary"><h2>Summary</h2>'
            f'{f"<div class=tiles>{tiles}</div>" if tiles else ""}{_chips_html(report)}'
            f'{f"<ul class=bullets>{bullets}</ul>" if bullets else ""}</section>')


def _chips_html(report: Report) -> str:
    """Per-segment change of the primary metric as a row of labelled chips (sign and word, not colour alone)."""
    chips = report.summary.chips
    if not chips:
        return ""
    metric = report.summary.data.get("primary_metric", "")
    items = "".join(f'<span class="chip {c.tone}"><span class="chip-seg">{html.escape(c.label)}</span>'
                    f'<strong>{html.escape(c.value)}</strong>'
                    f'{f"<em>⚠ {html.escape(c.detail)}</em>" if c.detail else ""}</span>' for c in chips)
    return (f'<div class="chips"><span class="chips-label">{html.escape(metric)} change per segment, '
            f'base → fine-tuned</span>{items}</div>')


def _bullet_html(b: str | Bullet) -> str:
    if isinstance(b, Bullet):
        kids = "".join(f"<li>{_inline(c)}</li>" for c in b.children)
        return f"<li>{_inline(b.text)}<ul class=sub>{kids}</ul></li>"
    return f"<li>{_inline(b)}</li>"


def _section_html(sec: Section, number: int) -> str:
    parts = [f'<section class="card" id="{html.escape(sec.id)}">',
             f'<h2><span class="num">{number}</span>{html.escape(sec.title)}</h2>']
    if sec.intro:
        parts.append(f'<p class="intro">{_inline(sec.intro)}</p>')
    for tone, text in sec.callouts:
        parts.append(f'<div class="callout {tone}"><span class="icon" aria-hidden="true">{_TONE_ICON.get(tone, "i")}'
                     f'</span><div>{_inline(text)}</div></div>')
    parts += [_figure_html(f) for f in sec.figures]
    parts += [_table_html(t) for t in sec.tables]
    parts.append("</section>")
    return "\n".join(parts)


def _figure_html(fig: Figure) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    cap = f"<figcaption>{_inline(fig.caption)}</figcaption>" if fig.caption else ""
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(fig.alt)}" loading="eager">'
            f"{cap}</figure>")


def _cell_html(cell: Cell | str, header: str, numeric: bool) -> str:
    """A <td>; ``numeric`` (the whole column is numbers) right-aligns it so digits line up."""
    c = cell if isinstance(cell, Cell) else Cell(str(cell))
    classes = [c.tone] if c.tone else []
    if numeric:
        classes.append("num")
    elif len(c.text) > 32:  # prose (a plan's "why"): keep a readable measure when the table is narrow
        classes.append("prose")
    note = f'<span class="note">{html.escape(c.note)}</span>' if c.note else ""
    cls = f' class="{" ".join(classes)}"' if classes else ""
    return f'<td{cls} data-label="{html.escape(header)}">{html.escape(c.text)}{note}</td>'


def _plain(c: Cell | str) -> str:
    return c.plain() if isinstance(c, Cell) else str(c)


def _numeric_column(t: Table, j: int) -> bool:
    texts = [(c.text if isinstance(c, Cell) else str(c)) for r in t.rows if j < len(r) for c in [r[j]]]
    return bool(texts) and all(_NUMERIC.match(x) or x in ("too few", "n/a") for x in texts)


def _table_html(t: Table) -> str:
    numeric = [_numeric_column(t, j) for j in range(len(t.columns))]
    head = "".join(f'<th{" class=num" if numeric[j] else ""}>{html.escape(c)}</th>' for j, c in enumerate(t.columns))
    rows = "".join("<tr>" + "".join(_cell_html(c, h, n) for c, h, n in zip(r, t.columns, numeric)) + "</tr>"
                   for r in t.rows)
    cap = f"<caption>{html.escape(t.caption)}</caption>" if t.caption else ""
    compact = " compact" if len(t.columns) <= 3 else ""
    if t.kind == "facts":  # key/value: labels muted, values left-aligned, no header row
        rows = "".join(f'<tr><th scope="row">{html.escape(_plain(r[0]))}</th><td>{html.escape(_plain(r[1]))}</td></tr>'
                       for r in t.rows)
        return f'<div class="table-wrap compact facts"><table>{cap}<tbody>{rows}</tbody></table></div>'
    table = (f'<div class="table-wrap{compact}"><table>{cap}<thead><tr>{head}</tr></thead>'
             f"<tbody>{rows}</tbody></table></div>")
    if len(t.rows) > FOLD_ROWS:
        what = html.escape(t.caption.lower()) if t.caption else "the table"
        return f"<details><summary>Show {what} ({len(t.rows)} rows)</summary>{table}</details>"
    return table


# ----------------------------------------------------------------------------------------------- Markdown


def _md(text: Any) -> str:
    """Text from the artifacts made inert for Markdown renderers, which pass raw HTML through: ``&``, ``<`` and
    ``>`` become entities outside `code spans` (so a prompt or domain carrying ``<script>`` shows as text)."""
    parts = re.split(r"(`[^`]*`)", str(text))
    return "".join(p if p.startswith("`") and p.endswith("`") and len(p) > 1 else
                   p.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") for p in parts)


def _md_cell(cell: Cell | str) -> str:
    text = _md(cell.plain() if isinstance(cell, Cell) else str(cell))
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> list[str]:
    cols = [_md_cell(c) if c else " " for c in t.columns]
    lines = [f"*{_md(t.caption)}*", ""] if t.caption else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    return lines + [""]


def to_markdown(report: Report) -> str:
    """Summary, callouts and every table; the plots are in report.html."""
    lines = [f"# {_md(report.title)}", "", f"Generated {report.generated}. Inputs: "
             + ", ".join(f"{k} `{v}`" for k, v in report.inputs.items()) + ".", ""]
    if report.summary.tiles or report.summary.bullets:
        lines += ["## Summary", ""]
        lines += [_md(f"- **{t.label}: {t.value}** {('— ' + t.detail) if t.detail else ''}".rstrip())
                  for t in report.summary.tiles]
        for b in report.summary.bullets:
            lines.append(f"- {_md(b.text if isinstance(b, Bullet) else b)}")
            lines += [f"  - {_md(c)}" for c in (b.children if isinstance(b, Bullet) else [])]
        lines.append("")
    for i, sec in enumerate(report.sections, 1):
        lines += [f"## {i}. {_md(sec.title)}", ""]
        if sec.intro:
            lines += [_md(sec.intro), ""]
        lines += [f"> **{tone}:** {_md(text)}" for tone, text in sec.callouts]
        if sec.callouts:
            lines.append("")
        if sec.figures:
            lines += [f"*Plot in report.html: {_md(', '.join(f.alt for f in sec.figures))}.*", ""]
        for t in sec.tables:
            lines += _md_table(t)
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------- JSON


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def to_json(report: Report) -> dict[str, Any]:
    """The numbers behind every section, plus the summary and each table as plain text."""
    return _clean({
        "title": report.title,
        "generated": report.generated,
        "inputs": report.inputs,
        "summary": {"tiles": [vars(t) for t in report.summary.tiles],
                    "bullets": [vars(b) if isinstance(b, Bullet) else b for b in report.summary.bullets],
                    **report.summary.data},
        "sections": [{"id": s.id, "title": s.title, "intro": s.intro,
                      "callouts": [{"tone": a, "text": b} for a, b in s.callouts],
                      "figures": [f.alt for f in s.figures],
                      "tables": [{"caption": t.caption, "columns": t.columns,
                                  "rows": [[c.plain() if isinstance(c, Cell) else c for c in r] for r in t.rows]}
                                 for t in s.tables],
                      "data": s.data} for s in report.sections],
    })
