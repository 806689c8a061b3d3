"""``eval.json`` as its readers need it: which model is the baseline and which the fine-tune, and each metric cell.

``adaptive-ft evaluate`` writes the file (shape in docs/contracts.md, "eval.json"); the report, ``ship`` and the demo's
summary read it through :class:`EvalView`, so the three never disagree on which model is which.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from adaptive_ft.errors import InputError

LOWER_IS_BETTER = ("loss", "perplexity", "ppl")


def is_rate(metric: str) -> bool:
    """Accuracy-like metrics: rates in [0, 1] where higher is better, read best as percentages.

    Losses and perplexities are neither: a drop is their improvement."""
    return not any(w in metric.lower() for w in LOWER_IS_BETTER)


def as_number(x: Any) -> float | None:
    """A finite float, or None for anything else (None, NaN, strings, booleans)."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def short_labels(models: list[str]) -> dict[str, str]:
    """'/tmp/exp/ftexp/int8' -> 'ftexp/int8'; names stay whole when shortening would make two alike."""
    short = {m: "/".join(Path(m).parts[-2:]) if len(Path(m).parts) > 2 else m for m in models}
    return short if len(set(short.values())) == len(models) else {m: m for m in models}


def check_eval(doc: Any, source: str | Path, need: tuple[str, ...] = ("models", "metrics")) -> None:
    """Raise InputError naming ``source`` unless ``doc`` has eval.json's lists ``need`` ('models', 'metrics')."""
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in need):
        raise InputError(f"{source}: needs {' and '.join(repr(k) for k in need)} list(s) (see docs/contracts.md); "
                         "write it with `adaptive-ft evaluate`.")


class EvalView:
    """Lookups over eval.json: which model is the base and which the fine-tune, and each metric cell."""

    def __init__(self, doc: dict[str, Any], run_hint: Path | None = None, source: str | Path = "eval.json"):
        check_eval(doc, source)
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
