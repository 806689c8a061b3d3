"""``plan.json``: what to fine-tune and why. Written by ``prioritize``, read by ``train``, ``evaluate`` and ``report``.

The plan is the contract between the stages; a hand-written one is valid too. Its shape::

    {
      "version": 1,
      "created": "2026-11-26T14:00:00Z",
      "domains": [                       # sorted by priority, highest first
        {"domain": "cards", "priority": 0.31, "demand": 0.42, "failure": 0.27, "share": 0.25,
         "segments": [{"segment": "free", "contribution": 0.2}], "why": "free users ask it most and 27% fail",
         "trainable": true}               # false: no example has a reference answer; share 0, train skips it
      ],
      "examples": [{"example_id": "e1", "domain": "cards", "weight": 0.004}],   # sampling weights, sum 1
      "examples_file": null,             # or "plan.examples.parquet" beside plan.json when large
      "layers": {"selected": [12, 13], "rank_pattern": {"12": 16},
                 "scores": [{"layer": 12, "score": 0.8, "measured": true}], "spearman_vs_full": null},
      "recommender": {...},              # ranking metrics, overall and per segment, beside popularity
      "segments": [{"segment": "free", "weight": 0.5, "traffic_share": 0.5}],
      "inputs": {"store": "sha256...", "config": "sha256...", "seed": 0}
    }

``prioritize`` adds (extra keys, kept on load in ``Plan.extra``): ``failure_prior`` (global rate, Beta
strength, basis), ``sampling`` (temperature, domain floor, example/cluster cap), ``notes`` (anything a
constraint or a bad input changed), and with ``--model`` ``layer_matrix`` (the domain x layer values,
which cells were measured, and ``method``: the ``prioritize.layer_probe`` that measured them). Each example
row also carries priority, demand, failure, exposures, negatives and its near-duplicate cluster.

Only ``domains`` is required; ``examples`` empty means "uniform over the plan's domains" and ``layers``
null means "all layers". Every number is checked on load (a priority "high", a string weight, layers as a list,
``selected: []`` or ``[true]``, a non-integer rank are a PlanError naming the plan), so each reader can trust it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from adaptive_ft.errors import PlanError, read_json

PLAN_VERSION = 1
EXAMPLES_INLINE_MAX = 5_000  # more example weights than this go to a Parquet file beside plan.json


@dataclass
class DomainScore:
    domain: str
    priority: float
    demand: float = 0.0
    failure: float = 0.0
    share: float = 0.0
    segments: list[dict[str, Any]] = field(default_factory=list)
    why: str = ""
    trainable: bool = True  # False: no example of the domain has a reference answer, so it gets no share


@dataclass
class LayerPlan:
    selected: list[int]
    rank_pattern: dict[str, int] = field(default_factory=dict)
    scores: list[dict[str, Any]] = field(default_factory=list)
    spearman_vs_full: float | None = None


@dataclass
class Plan:
    domains: list[DomainScore]
    examples: pl.DataFrame | None = None  # columns example_id, domain, weight
    layers: LayerPlan | None = None
    recommender: dict[str, Any] = field(default_factory=dict)
    segments: list[dict[str, Any]] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def domain_names(self) -> list[str]:
        return [d.domain for d in self.domains]

    def example_weights(self) -> pl.DataFrame:
        """example_id, domain, weight (sums to 1); empty frame when the plan gives no example weights."""
        if self.examples is None:
            return pl.DataFrame(schema={"example_id": pl.Utf8, "domain": pl.Utf8, "weight": pl.Float64})
        return self.examples

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc: dict[str, Any] = {
            "version": PLAN_VERSION,
            "created": self.created,
            "domains": [asdict(d) for d in self.domains],
            "examples": [],
            "examples_file": None,
            "layers": asdict(self.layers) if self.layers else None,
            "recommender": self.recommender,
            "segments": self.segments,
            "inputs": self.inputs,
            **self.extra,
        }
        ex = self.example_weights()
        if ex.height > EXAMPLES_INLINE_MAX:
            side = path.with_suffix(".examples.parquet")
            ex.write_parquet(side)
            doc["examples_file"] = side.name
        else:
            doc["examples"] = ex.to_dicts()
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        doc = read_json(path, f"plan not found: {path}. Write one with `adaptive-ft prioritize --out {path}`.",
                        PlanError)
        return cls.from_dict(doc, base_dir=path.parent, source=str(path))

    @classmethod
    def from_dict(cls, doc: dict[str, Any], base_dir: Path = Path("."), source: str = "plan") -> "Plan":
        problems: list[str] = []
        if not isinstance(doc, dict):
            raise PlanError(f"{source}: top level must be an object")
        domains = _domains(doc.get("domains"), problems)
        examples = _examples(doc, base_dir, problems)
        layers = _layers(doc.get("layers"), problems)
        if problems:
            raise PlanError(f"{source}: " + "; ".join(problems))
        known_keys = {"version", "created", "domains", "examples", "examples_file", "layers",
                      "recommender", "segments", "inputs"}
        return cls(
            domains=domains, examples=examples, layers=layers,
            recommender=doc.get("recommender") or {}, segments=doc.get("segments") or [],
            inputs=doc.get("inputs") or {}, created=doc.get("created", ""),
            extra={k: v for k, v in doc.items() if k not in known_keys},
        )


# --------------------------------------------------------------------------------------------- text


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render_plan(plan: Plan, top: int = 0) -> str:
    """The plan as plain text: a domain table with a one-line why each, layers, segments, recommender."""
    doms = plan.domains[:top] if top else plan.domains
    lines = [f"{'#':>3}  {'domain':<24} {'priority':>9} {'demand':>7} {'failure':>7} {'share':>6}  why"]
    for i, d in enumerate(doms, 1):
        lines.append(f"{i:>3}  {d.domain[:24]:<24} {d.priority:>9.4f} {_pct(d.demand):>7} {_pct(d.failure):>7} "
                     f"{_pct(d.share):>6}  {d.why}")
    if top and len(plan.domains) > top:
        lines.append(f"     ... {len(plan.domains) - top} more domains")
    if plan.segments:
        lines.append("")
        lines.append("segments: " + ", ".join(
            f"{s['segment']} (weight {_pct(s.get('weight'))}, traffic {_pct(s.get('traffic_share'))}, "
            f"failure {_pct(s.get('failure'))})" for s in plan.segments))
    lines += _render_layers(plan) + _render_recommender(plan.recommender)
    ex = plan.example_weights()
    if ex.height:
        lines.append(f"examples: {ex.height:,} weighted; largest weight {ex['weight'].max():.4f}")
    inputs = plan.inputs
    if inputs:
        lines.append(f"inputs: store {str(inputs.get('store', '-'))[:12]}, config {str(inputs.get('config', '-'))[:12]}, "
                     f"seed {inputs.get('seed', '-')}")
    return "\n".join(lines)


def _render_layers(plan: Plan) -> list[str]:
    lay = plan.layers
    if lay is None:
        return ["", "layers: all (no layer selection in this plan)"]
    out = ["", f"layers selected: {lay.selected}" + (f"  rank_pattern {lay.rank_pattern}" if lay.rank_pattern else "")]
    if lay.scores:
        completed = any(not s.get("measured") for s in lay.scores)
        out.append("  " + "  ".join(
            f"{s['layer']}:{s['score']:.2f}{'' if s.get('measured') else '*'}" for s in lay.scores)
            + ("   (* = partly completed, not all cells measured)" if completed else "   (every cell measured)"))
    return out


def _render_recommender(rec: dict) -> list[str]:
    if not rec or "model" not in rec:
        return ["", f"recommender: {rec.get('note', 'not measured') if rec else 'not measured'}"]
    k = rec.get("k", 10)
    out = ["", f"recommender ({rec.get('algorithm', '?')}, time hold-out, {rec.get('users_evaluated', 0):,} users):"]
    for name in ("model", "popularity"):
        o = rec[name]["overall"]
        out.append(f"  {name:<10} precision@{k} {o.get('precision', 0):.3f}  recall@{k} {o.get('recall', 0):.3f}  "
                   f"NDCG@{k} {o.get('ndcg', 0):.3f}  MAP@{k} {o.get('map', 0):.3f}  coverage {o.get('coverage', 0):.3f}")
    return out


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _domains(raw: Any, problems: list[str]) -> list[DomainScore]:
    """``domains``: names, or records whose numbers are numbers (a priority "high" would crash the readers)."""
    if not isinstance(raw, list) or not raw:
        problems.append("'domains' must be a non-empty list")
        return []
    out = []
    for i, d in enumerate(raw):
        if isinstance(d, str):
            d = {"domain": d, "priority": 1.0}
        if not isinstance(d, dict) or "domain" not in d:
            problems.append(f"domains[{i}]: needs at least a 'domain' name")
            continue
        known = {k: d[k] for k in DomainScore.__dataclass_fields__ if k in d}
        known.setdefault("priority", 1.0)
        bad = [k for k in ("priority", "demand", "failure", "share") if k in known and not _number(known[k])]
        if bad:
            problems.append(f"domains[{i}] ({d['domain']!r}): " + ", ".join(f"{k} must be a number, got {known[k]!r}"
                                                                           for k in bad))
            continue
        if not isinstance(known.get("trainable", True), bool):
            problems.append(f"domains[{i}] ({d['domain']!r}): trainable must be true or false")
            continue
        out.append(DomainScore(**known))
    return out


def _examples(doc: dict[str, Any], base_dir: Path, problems: list[str]) -> pl.DataFrame | None:
    """``examples`` (inline) or ``examples_file`` (Parquet beside the plan): example_id and a numeric weight >= 0."""
    examples = None
    if doc.get("examples_file"):
        side = base_dir / str(doc["examples_file"])
        if not side.is_file():
            problems.append(f"examples_file {side} not found")
            return None
        try:
            examples = pl.read_parquet(side)
        except Exception as e:  # noqa: BLE001 - polars raises several kinds for a file that is not Parquet
            problems.append(f"examples_file {side} cannot be read as Parquet ({type(e).__name__}); write it with "
                            f"Plan.save or give the examples inline")
            return None
    elif doc.get("examples"):
        rows = doc["examples"]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            problems.append("examples must be a list of {example_id, domain, weight} objects")
            return None
        try:
            examples = pl.DataFrame(rows, infer_schema_length=None)
        except Exception as e:  # noqa: BLE001 - mixed types in a column
            problems.append(f"examples: the rows do not form a table ({type(e).__name__}: {str(e)[:120]})")
            return None
    if examples is None:
        return None
    missing = {"example_id", "weight"} - set(examples.columns)
    if missing:
        problems.append(f"examples: missing columns {sorted(missing)}")
    elif not examples["weight"].dtype.is_numeric():
        problems.append(f"examples: weight must be a number, got {examples['weight'].dtype} values like "
                        f"{examples['weight'][0]!r}")
    elif (examples["weight"] < 0).any() or examples["weight"].is_nan().any() or examples["weight"].is_null().any():
        problems.append("examples: weights must be finite and >= 0")
    else:
        return examples
    return None


def _layers(lay: Any, problems: list[str]) -> LayerPlan | None:
    """``layers``: null (all layers) or {"selected": [non-empty list of ints >= 0], "rank_pattern": {layer: int}}."""
    if lay is None:
        return None
    if not isinstance(lay, dict):
        problems.append(f"layers must be an object like {{\"selected\": [12, 13]}} (or null for all layers), got "
                        f"{type(lay).__name__}")
        return None
    sel = lay.get("selected")
    if not isinstance(sel, list) or not sel or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                       for x in sel):
        problems.append(f"layers.selected must be a non-empty list of layer indices (integers >= 0), got {sel!r}; "
                        f"use \"layers\": null to adapt every layer")
        return None
    raw_ranks = lay.get("rank_pattern") or {}
    ranks: dict[str, int] = {}
    if not isinstance(raw_ranks, dict):
        problems.append("layers.rank_pattern must be an object {layer: rank}")
        return None
    for k, v in raw_ranks.items():
        if not str(k).isdigit() or not isinstance(v, int) or isinstance(v, bool) or v < 1:
            problems.append(f"layers.rank_pattern[{k!r}] = {v!r}: needs a layer index and an integer rank >= 1")
            return None
        ranks[str(k)] = v
    return LayerPlan(selected=sorted(set(sel)), rank_pattern=ranks, scores=lay.get("scores") or [],
                     spearman_vs_full=lay.get("spearman_vs_full"))

