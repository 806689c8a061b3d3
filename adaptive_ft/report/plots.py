"""The report's plots: matplotlib figures rendered to PNG bytes, so the HTML can inline them as data URIs.

Every function takes plain numbers (no artifact shapes: :mod:`adaptive_ft.report` reads those) and returns
the PNG's bytes, or ``None`` when there is nothing to draw, so a section without data simply has no plot.
Colours are the Okabe-Ito palette (distinguishable with the common colour-vision deficiencies), and every
colour distinction is doubled by a marker shape, a hatch or a label, so nothing depends on colour alone.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

# Okabe & Ito (2008), "Color Universal Design": blue, orange, bluish green, reddish purple, sky blue, vermillion.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
MARKERS = ["o", "s", "D", "^", "v", "P", "X", "*"]
INK = "#1f2933"
MUTED = "#7b8794"
WIDTH_IN = 8.0  # figure width in inches; at DPI it is ~1150 px, sharp at the page's ~880 px column on 1.3x screens
DPI = 144
MAX_ROWS = 30  # categories per plot; tables in the report carry the rest

_STYLE = {
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],
    "font.size": 9.5,
    "axes.titlesize": 10.5,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.labelcolor": INK,
    "axes.edgecolor": "#cbd2d9",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e4e7eb",
    "grid.linewidth": 0.8,
    "xtick.color": INK,
    "ytick.color": INK,
    "legend.frameon": False,
    "figure.facecolor": "white",
}


_ENABLED: ContextVar[bool] = ContextVar("report_plots_enabled", default=True)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within this block every plot function returns None at once (``report --no-plots``: tables only)."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def _plot(fn: Callable[..., bytes | None]) -> Callable[..., bytes | None]:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if _ENABLED.get() else None
    return wrapper


def _png(fig: plt.Figure) -> bytes:
    """The figure as PNG bytes (no metadata, so the same data gives the same bytes), and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _percent_axis(ax: plt.Axes, axis: str = "x") -> None:
    fmt = matplotlib.ticker.PercentFormatter(xmax=1.0, decimals=None)  # auto: no "62%" for a 62.5% tick
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_formatter(fmt)


@_plot
def metric_dots(categories: Sequence[str], models: Sequence[str], values: dict[tuple[str, str], tuple],
                metric: str, as_percent: bool) -> bytes | None:
    """One row per category (segment or domain), one dot per model with its 95% CI as a whisker.

    ``values[(category, model)] = (value, ci_low, ci_high, enough)``; a cell with too little data is drawn
    hollow and grey so it is visibly not a result.
    """
    if not categories or not models or not values:
        return None
    cats = list(categories)[:MAX_ROWS]
    height = max(1.8, 0.32 * len(cats) * max(1.0, len(models) / 2.5) + 1.0)
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(WIDTH_IN, height))
        step = 0.7 / max(1, len(models))
        for i in range(0, len(cats), 2):  # banding keeps each category's dots together
            ax.axhspan(i - 0.5, i + 0.5, color="#f3f5f8", zorder=0, linewidth=0)
        for j, model in enumerate(models):
            offset = (j - (len(models) - 1) / 2) * step
            _model_dots(ax, cats, model, values, offset, j)
        ax.set_yticks(range(len(cats)), cats)
        ax.set_ylim(len(cats) - 0.5, -0.5)
        ax.grid(axis="y", visible=False)
        ax.set_xlabel(f"{metric} (dot) with 95% bootstrap interval (line)")
        if as_percent:
            _rate_limits(ax, values)
            _percent_axis(ax)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, 1.0 + 0.5 / height), ncol=min(4, len(models)),
                  handletextpad=0.3, columnspacing=1.4)
        return _png(fig)


def _rate_limits(ax: plt.Axes, values: dict[tuple[str, str], tuple]) -> None:
    """Keep a rate's axis inside [0, 1] (matplotlib pads symmetric data, e.g. all zeros, below 0%)."""
    xs = [x for v in values.values() for x in v[:3] if x is not None]
    lo, hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    pad = max(0.02, 0.06 * (hi - lo))
    lo, hi = max(0.0, lo - pad), min(1.0, hi + pad)
    if hi - lo < 0.1:  # a flat result still gets a readable scale
        lo, hi = max(0.0, min(lo, hi - 0.1)), min(1.0, max(hi, lo + 0.1))
    ax.set_xlim(lo - 0.005, hi + 0.005)


def _model_dots(ax: plt.Axes, cats: list[str], model: str, values: dict, offset: float, j: int) -> None:
    ys, xs, lo, hi, faint = [], [], [], [], []
    for i, cat in enumerate(cats):
        cell = values.get((cat, model))
        if cell is None or cell[0] is None:
            continue
        value, ci_low, ci_high, enough = cell
        (ys if enough else faint).append((i + offset, value, ci_low, ci_high))
    for y, v, a, b in ys:
        xs.append(v)
        lo.append(v - a if a is not None else 0.0)
        hi.append(b - v if b is not None else 0.0)
    if ys:
        ax.errorbar(xs, [y for y, *_ in ys], xerr=[lo, hi], fmt=MARKERS[j % len(MARKERS)], color=_color(j),
                    ecolor=_color(j), elinewidth=1.6, capsize=2.5, markersize=6, label=model)
    if faint:
        ax.plot([v for _, v, *_ in faint], [y for y, *_ in faint], MARKERS[j % len(MARKERS)], color=MUTED,
                markerfacecolor="none", markersize=6, label=None if ys else model)


@_plot
def priority_bars(domains: Sequence[str], priority: Sequence[float], demand: Sequence[float],
                  failure: Sequence[float]) -> bytes | None:
    """Three panels sharing the domain axis: priority, and the demand and failure it is the product of."""
    if not domains:
        return None
    n = min(len(domains), MAX_ROWS)
    panels = [("priority (expected unmet need)", priority, _color(0)), ("demand", demand, _color(4)),
              ("failure", failure, _color(5))]
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(WIDTH_IN, max(1.8, 0.28 * n + 0.9)), sharey=True,
                                 gridspec_kw={"width_ratios": [1.4, 1, 1]})
        y = np.arange(n)
        for ax, (title, vals, color) in zip(axes, panels):
            v = np.array([float(x) for x in vals[:n]])
            ax.barh(y, v, color=color, height=0.68)
            ax.set_title(title, fontsize=9.5)
            ax.grid(axis="y", visible=False)
            ax.set_xlim(min(0.0, float(np.nanmin(v)) * 1.12), max(1e-9, float(np.nanmax(v))) * 1.12)
            for yi, vi in zip(y, v):
                ax.text(vi, yi, f" {vi:.2f}", va="center", fontsize=7.5, color=INK)
        axes[0].set_yticks(y, list(domains[:n]))
        axes[0].invert_yaxis()
        for ax in axes:
            ax.tick_params(axis="x", labelsize=8)
        fig.tight_layout(w_pad=1.0)
        return _png(fig)


@_plot
def layer_heatmap(rows: Sequence[str], layers: Sequence[int], score: np.ndarray, measured: np.ndarray,
                  selected: Sequence[int]) -> bytes | None:
    """Domain x layer scores; measured cells carry a dot, completed (matrix-factorised) cells a hatch.

    ``score`` and ``measured`` are (len(rows), len(layers)); NaN scores are cells with no value at all.
    Selected layers are marked with a triangle above the column and a bold tick label.
    """
    if not rows or not layers or not np.isfinite(score).any():
        return None
    n_rows, n_cols = score.shape
    with plt.rc_context({**_STYLE, "axes.grid": False}):
        fig, ax = plt.subplots(figsize=(WIDTH_IN, max(1.6, (0.34 if n_rows <= 15 else 0.24) * n_rows + 1.3)))
        img = ax.imshow(np.ma.masked_invalid(score), aspect="auto", cmap="cividis", interpolation="nearest")
        _mark_cells(ax, score, measured)
        ax.set_xticks(range(n_cols), [str(layer) for layer in layers], fontsize=7.5 if n_cols > 20 else 8.5)
        ax.set_yticks(range(n_rows), list(rows))
        for tick, layer in zip(ax.get_xticklabels(), layers):
            if layer in set(selected):
                tick.set_fontweight("bold")
        sel_x = [i for i, layer in enumerate(layers) if layer in set(selected)]
        ax.plot(sel_x, [-0.85] * len(sel_x), "v", color=_color(5), markersize=7, clip_on=False)
        ax.set_ylim(n_rows - 0.5, -1.1)
        ax.set_xlabel("layer (bold, ▼ = selected for LoRA)")
        ax.spines[:].set_visible(False)
        cbar = fig.colorbar(img, ax=ax, fraction=0.035, pad=0.02)
        cbar.set_label("score")
        handles = [Line2D([], [], marker="o", linestyle="", color=INK, markersize=4, label="measured by a probe"),
                   Patch(facecolor="white", edgecolor=MUTED, hatch="///", label="completed by factorization")]
        ax.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, fontsize=8.5,
                  borderaxespad=0.2)
        return _png(fig)


def _mark_cells(ax: plt.Axes, score: np.ndarray, measured: np.ndarray) -> None:
    finite = score[np.isfinite(score)]
    mid = float(np.median(finite)) if finite.size else 0.0
    for (r, c), value in np.ndenumerate(score):
        if not np.isfinite(value):
            continue
        # cividis is dark at the low end: mark low cells in white, high cells in near-black
        ink = "white" if value < mid else "#111111"
        if measured[r, c]:
            ax.plot(c, r, "o", color=ink, markersize=3.2)
        else:
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, hatch="///", edgecolor=ink,
                                   linewidth=0, alpha=0.3))


@_plot
def loss_curves(train: Sequence[tuple[float, float]], val: Sequence[tuple[float, float]],
                best_step: float | None, stop_note: str | None) -> bytes | None:
    """Train and validation loss against step; the best (kept) step is a vertical line."""
    if not train and not val:
        return None
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(WIDTH_IN, 3.0))
        if len(train) > 20:  # per-step loss is noisy: a faint raw line under its moving average
            ax.plot(*zip(*train), color=_color(4), linewidth=0.8, alpha=0.6, label="train loss")
            ax.plot([x for x, _ in train], _ema([y for _, y in train]), color=_color(0), linewidth=1.8,
                    label="train loss (EMA)")
        elif train:
            ax.plot(*zip(*train), color=_color(0), linewidth=1.4, label="train loss", alpha=0.9)
        if val:
            ax.plot(*zip(*val), color=_color(1), linewidth=2.0, marker="s", markersize=4,
                    label="validation loss")
        if best_step is not None:
            label = f"best step {best_step:g}" + (f" ({stop_note})" if stop_note else "")
            ax.axvline(best_step, color=_color(5), linestyle="--", linewidth=1.3, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=4, handlelength=1.8, fontsize=8.5)
        return _png(fig)


def _ema(ys: Sequence[float]) -> list[float]:
    """Exponential moving average, bias-corrected (as TensorBoard's smoothing), span ~ 1/20 of the run."""
    beta = 1.0 - 1.0 / max(2.0, len(ys) / 20)
    out, acc = [], 0.0
    for i, y in enumerate(ys, 1):
        acc = beta * acc + (1 - beta) * y
        out.append(acc / (1 - beta**i))
    return out


@_plot
def size_quality(names: Sequence[str], sizes_mb: Sequence[float], panels: Sequence[dict]) -> bytes | None:
    """Size on disk (x) against quality (y) per export variant, one panel per quality measure.

    Each panel: ``{"label", "values" (one per name, None = not measured), "percent", "reference": (label, y) | None}``;
    a panel with no measured variant is dropped, so GGUF files without an evaluation still show their agreement.
    """
    panels = [p for p in panels if any(v is not None and s for v, s in zip(p["values"], sizes_mb))]
    if not panels:
        return None
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, len(panels), figsize=(WIDTH_IN, 3.3), squeeze=False)
        for ax, panel in zip(axes.flat, panels):
            _size_panel(ax, names, sizes_mb, panel)
        handles = {h.get_label(): h for ax in axes.flat for h in ax.get_legend_handles_labels()[0]}
        fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=min(6, len(handles)),
                   bbox_to_anchor=(0.5, 1.0), handletextpad=0.3, columnspacing=1.3)
        fig.tight_layout(rect=(0, 0, 1, 0.9), w_pad=2.5)
        return _png(fig)


def _size_panel(ax: plt.Axes, names: Sequence[str], sizes_mb: Sequence[float], panel: dict) -> None:
    points = [(j, n, s, q) for j, (n, s, q) in enumerate(zip(names, sizes_mb, panel["values"])) if s and q is not None]
    qs = [q for *_, q in points]
    ref = panel.get("reference")
    if ref is not None and ref[1] is not None:
        ax.axhline(ref[1], color=MUTED, linestyle=":", linewidth=1.2)
        ax.annotate(ref[0], (1.0, ref[1]), xycoords=("axes fraction", "data"), ha="right", va="top",
                    fontsize=8, color=MUTED, textcoords="offset points", xytext=(0, -3))
        qs.append(ref[1])
    lo, hi = _padded(qs, panel["percent"])
    ax.set_ylim(lo, hi)
    xmax = max(s for _, _, s, _ in points) * 1.25
    ax.set_xlim(0, xmax)
    for j, name, size, q in points:  # named in the shared legend: labels beside points collide when close
        ax.plot(size, q, MARKERS[j % len(MARKERS)], color=_color(j), markersize=9, alpha=0.9, label=name,
                markeredgecolor="white", markeredgewidth=0.6)
    ax.set_xlabel("size on disk (MB)")
    ax.set_title(panel["label"], fontsize=9.5)
    if panel["percent"]:
        _percent_axis(ax, "y")


def _padded(qs: list[float], percent: bool) -> tuple[float, float]:
    """y-limits around the values with room for labels; a rate stays within [0, 1] (plus a sliver)."""
    span = max(qs) - min(qs)
    pad = max(span * 0.25, 0.02 if percent else 0.05 * max(1e-9, abs(max(qs))))
    lo, hi = min(qs) - pad, max(qs) + pad * 1.6
    if percent:
        lo, hi = max(lo, -0.005), min(hi, 1.0 + pad * 0.6)
        hi = max(hi, lo + 0.05)
    return lo, hi


@_plot
def recommender_bars(groups: Sequence[str], metrics: Sequence[str],
                     values: dict[tuple[str, str, str], float], methods: Sequence[str]) -> bytes | None:
    """Small multiples, one panel per ranking metric: groups (overall, segments) x methods (model, popularity).

    ``values[(group, metric, method)] = value``.
    """
    if not groups or not metrics or not values:
        return None
    metrics = list(metrics)[:6]
    cols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / cols)
    hatches = ["", "////", "..", "xx"]
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(nrows, cols, figsize=(WIDTH_IN, 2.5 * nrows + 0.4), squeeze=False)
        width = 0.8 / max(1, len(methods))
        for ax, metric in zip(axes.flat, metrics):
            shown = [g for g in groups if any((g, metric, m) in values for m in methods)]  # no empty slots
            x = np.arange(len(shown))
            for j, method in enumerate(methods):
                v = [values.get((g, metric, method), np.nan) for g in shown]
                ax.bar(x + (j - (len(methods) - 1) / 2) * width, v, width, color=_color(j if j == 0 else 1 + j),
                       hatch=hatches[j % len(hatches)], edgecolor="white", label=method)
            ax.set_title(metric, fontsize=9.5)
            ax.set_xlim(-0.6, max(len(shown), 2.2) - 0.4)
            tilt = len(shown) > 3 or max(map(len, shown)) * len(shown) > 28  # long names would collide
            ax.set_xticks(x, shown, rotation=30 if tilt else 0, ha="right" if tilt else "center", fontsize=8,
                          rotation_mode="anchor")
            ax.grid(axis="x", visible=False)
        for ax in list(axes.flat)[len(metrics):]:
            ax.set_visible(False)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", ncol=len(methods), bbox_to_anchor=(0.5, 1.02))
        fig.tight_layout(rect=(0, 0, 1, 0.95))
        return _png(fig)


@_plot
def delta_heatmap(segments: Sequence[str], domains: Sequence[str], delta: np.ndarray, enough: np.ndarray,
                  as_percent: bool, higher_is_better: bool) -> bytes | None:
    """Segment x domain change of the primary metric (fine-tuned minus base); thin cells are left blank.

    Diverging purple/orange map (colour-blind safe), centred on zero; each cell also prints its value.
    """
    if not segments or not domains or not np.isfinite(delta).any():
        return None
    cols = list(domains)[:MAX_ROWS]
    d = delta[:, : len(cols)]
    shown = np.where(enough[:, : len(cols)], d, np.nan)
    signed = shown if higher_is_better else -shown
    lim = float(np.nanmax(np.abs(signed))) if np.isfinite(signed).any() else 1.0
    with plt.rc_context({**_STYLE, "axes.grid": False}):
        fig, ax = plt.subplots(figsize=(WIDTH_IN, max(1.6, 0.36 * len(segments) + 1.7)))
        img = ax.imshow(np.ma.masked_invalid(signed), cmap="PuOr", vmin=-lim or -1, vmax=lim or 1, aspect="auto")
        for (r, c), v in np.ndenumerate(d):
            if not enough[r, c] or not np.isfinite(v):
                ax.text(c, r, "n/a", ha="center", va="center", fontsize=6.5, color=MUTED)
                continue
            text = f"{v * 100:+.0f}" if as_percent else f"{v:+.2f}"
            strong = abs(signed[r, c]) > 0.6 * lim
            ax.text(c, r, text, ha="center", va="center", fontsize=7, color="white" if strong else INK)
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(segments)), list(segments))
        ax.spines[:].set_visible(False)
        cbar = fig.colorbar(img, ax=ax, fraction=0.03, pad=0.02)
        cbar.set_label("worse  ←  0  →  better", fontsize=8.5)
        if as_percent:  # the cells print points; so does the scale
            cbar.ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v * 100:+.0f}" if abs(v) > 1e-9 else "0"))
        if not higher_is_better:  # the map is drawn on -delta so that purple is always "better"
            cbar.ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{-v:+.2g}"))
        ax.set_title(f"fine-tuned − base ({'points' if as_percent else 'metric units'}); purple = better, "
                     "orange = worse", fontsize=9.5, fontweight="normal", color=INK)
        return _png(fig)


@_plot
def share_bars(names: Sequence[str], train_share: Sequence[float], traffic_share: Sequence[float],
               underserved: Sequence[bool]) -> bytes | None:
    """Each segment's or domain's share of the training sample beside its share of traffic."""
    if not names:
        return None
    n = min(len(names), MAX_ROWS)
    y = np.arange(n)
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(WIDTH_IN, max(1.8, 0.36 * n + 0.9)))
        ax.barh(y - 0.18, traffic_share[:n], 0.36, color=_color(4), label="share of traffic")
        ax.barh(y + 0.18, train_share[:n], 0.36, color=_color(0), hatch="////", edgecolor="white",
                label="share of training sample")
        labels = [f"{name}  ⚠" if flag else name for name, flag in zip(names[:n], underserved[:n])]
        ax.set_yticks(y, labels)
        for tick, flag in zip(ax.get_yticklabels(), underserved[:n]):
            if flag:
                tick.set_color(_color(5))
                tick.set_fontweight("bold")
        ax.invert_yaxis()
        ax.grid(axis="y", visible=False)
        _percent_axis(ax)
        ax.legend(loc="lower right")
        return _png(fig)


@_plot
def traffic_bars(domains: Sequence[str], segments: Sequence[str], events: np.ndarray,
                 negative_rate: Sequence[float | None]) -> bytes | None:
    """Events per domain stacked by segment (``events`` is (len(domains), len(segments))), beside each
    domain's negative-feedback rate: where the traffic is and where it goes wrong."""
    if not domains or not segments or events.sum() <= 0:
        return None
    n = min(len(domains), MAX_ROWS)
    y = np.arange(n)
    hatches = ["", "////", "..", "xx", "\\\\", "++"]
    with plt.rc_context(_STYLE):
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(WIDTH_IN, max(1.8, 0.3 * n + 1.1)), sharey=True,
                                      gridspec_kw={"width_ratios": [2.2, 1]})
        left = np.zeros(n)
        for j, seg in enumerate(segments):
            ax.barh(y, events[:n, j], left=left, height=0.68, color=_color(j), hatch=hatches[j % len(hatches)],
                    edgecolor="white", linewidth=0.5, label=seg)
            left += events[:n, j]
        ax.set_yticks(y, list(domains[:n]))
        ax.set_ylim(n - 0.5, -0.5)
        ax.grid(axis="y", visible=False)
        ax.set_title("events by segment", fontsize=9.5)
        ax.legend(loc="lower right", fontsize=8, ncol=min(3, len(segments)))
        rates = np.array([np.nan if r is None else r for r in negative_rate[:n]], dtype=float)
        ax2.barh(y, rates, height=0.68, color=_color(5))
        for yi, r in zip(y, rates):
            if np.isfinite(r):
                ax2.text(r, yi, f" {r:.0%}", va="center", fontsize=7.5, color=INK)
        ax2.set_xlim(0, max(0.05, float(np.nanmax(rates)) if np.isfinite(rates).any() else 1.0) * 1.25)
        ax2.grid(axis="y", visible=False)
        ax2.set_title("negative feedback", fontsize=9.5)
        _percent_axis(ax2)
        fig.tight_layout(w_pad=1.0)
        return _png(fig)
