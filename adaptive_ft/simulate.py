"""A realistic interaction-log generator with a known answer: the planted need per segment x domain.

``simulate`` builds a small world and writes what its users did:

* an **example pool**: the built-in synthetic support requests (``adaptive_ft/data/support_pool.yaml``, 6
  domains, 300 prompts) or Banking77 (77 intents grouped into 8 domains by :data:`BANKING77_DOMAINS`); each
  example has a prompt and a label-style reference (the intent name);
* **users in segments**: each segment prefers some domains (a Dirichlet draw per segment), each user's mix is
  a Dirichlet around their segment's, and activity is log-normal (a few heavy users);
* **popularity skew**: within a domain, examples are asked with Zipf weights over a random ranking;
* **a model whose quality differs by domain and segment**: a failure rate per segment x domain cell, a few
  cells planted clearly bad, and a per-example difficulty around the cell's rate. When a ``responder`` is
  given, it answers the prompts instead, and an answer is wrong when it differs from the reference;
* **events**: an ``impression`` per query (with the model's answer as ``response``), then, for a share of the
  queries, feedback that follows whether the answer was right: ``thumbs_up``/``thumbs_down``, ``rating``
  (1-5 in ``value``), ``click`` (dwell seconds in ``value``), ``regenerate``, ``edit``, ``escalate``,
  ``resolve``, ``abandon``; with probability ``noise`` the user reacts as if the answer had been the opposite.

Beside the log, ``<stem>.truth.json`` records the planted truth (docs/contracts.md): per segment x domain the
traffic share, the failure rate and their product, the *need*; the need per domain; the domains by need.

Formats: ``jsonl`` / ``csv`` / ``parquet`` hold one row per event in the flat format of DESIGN.md (every row
carries the example's prompt and reference and the model's response, so any slice of a file is
self-contained; in CSV/JSONL ``ts`` is ISO-8601 UTC, ``2025-01-03T14:02:11Z``; in Parquet a timestamp).

``chat`` is OpenAI-style chat JSONL, one record per event, the form ``adaptive-ft ingest --format chat``
reads (``adaptive_ft/store/sources.py``): the flat fields, with prompt and response as the conversation::

    {"messages": [{"role": "user", "content": "<prompt>"}, {"role": "assistant", "content": "<response>"}],
     "event_id": "...", "ts": "2025-01-03T14:02:11Z", "user_id": "...", "segment": "...", "domain": "...",
     "example_id": "...", "reference": "<the ideal answer>", "event": "thumbs_down", "value": null,
     "model_version": "..."}

With ``users_file``, ``<stem>.users.csv`` (user_id, segment, region, signup_date) is written too, the file
``adaptive-ft ingest --users`` reads; with ``segment_in_log: false`` only that file knows each user's segment.

Ids are stable, so re-ingesting a log adds nothing: ``event_id`` = a tag hashed from the seed, the pool, the
config and the model version, plus the event's index; ``example_id`` = :func:`example_id_for` of the prompt;
``user_id`` = ``u<seed>-<index>``. Everything is vectorized with numpy and Polars (millions of events in
seconds), and the same seed gives a byte-identical log.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import numpy as np
import polars as pl
import yaml
from tqdm.auto import tqdm

from adaptive_ft.config import SimulateConfig, config_to_dict
from adaptive_ft.errors import ConfigError, InputError
from adaptive_ft.text import example_id_for, normalize_prompt

FORMATS: tuple[str, ...] = ("jsonl", "csv", "parquet", "chat")
Responder = Callable[[list[str]], list[str]]

# ---------------------------------------------------------------------------------------------- pools

# Banking77's 77 intents grouped into 8 domains a bank's support team would recognise. Every intent is
# listed exactly once (a test checks this against the data's categories.json).
BANKING77_DOMAINS: dict[str, tuple[str, ...]] = {
    "cards": (
        "activate_my_card", "apple_pay_or_google_pay", "card_about_to_expire", "card_acceptance",
        "card_arrival", "card_delivery_estimate", "card_linking", "card_not_working",
        "contactless_not_working", "disposable_card_limits", "get_disposable_virtual_card",
        "get_physical_card", "getting_spare_card", "getting_virtual_card", "order_physical_card",
        "supported_cards_and_currencies", "virtual_card_not_working", "visa_or_mastercard",
    ),
    "card_payments": (
        "card_payment_not_recognised", "declined_card_payment", "direct_debit_payment_not_recognised",
        "pending_card_payment", "Refund_not_showing_up", "request_refund", "reverted_card_payment?",
        "transaction_charged_twice",
    ),
    "fees": (
        "card_payment_fee_charged", "cash_withdrawal_charge", "extra_charge_on_statement",
        "top_up_by_bank_transfer_charge", "top_up_by_card_charge", "transfer_fee_charged",
    ),
    "transfers": (
        "balance_not_updated_after_bank_transfer", "beneficiary_not_allowed", "cancel_transfer",
        "declined_transfer", "failed_transfer", "pending_transfer", "receiving_money",
        "transfer_into_account", "transfer_not_received_by_recipient", "transfer_timing",
    ),
    "top_up": (
        "automatic_top_up", "balance_not_updated_after_cheque_or_cash_deposit", "pending_top_up",
        "top_up_by_cash_or_cheque", "top_up_failed", "top_up_limits", "top_up_reverted",
        "topping_up_by_card", "verify_top_up",
    ),
    "cash_atm": (
        "atm_support", "card_swallowed", "cash_withdrawal_not_recognised", "declined_cash_withdrawal",
        "pending_cash_withdrawal", "wrong_amount_of_cash_received",
    ),
    "exchange_fx": (
        "card_payment_wrong_exchange_rate", "exchange_charge", "exchange_rate", "exchange_via_app",
        "fiat_currency_support", "wrong_exchange_rate_for_cash_withdrawal",
    ),
    "account_security": (
        "age_limit", "change_pin", "compromised_card", "country_support", "edit_personal_details",
        "lost_or_stolen_card", "lost_or_stolen_phone", "passcode_forgotten", "pin_blocked",
        "terminate_account", "unable_to_verify_identity", "verify_my_identity", "verify_source_of_funds",
        "why_verify_identity",
    ),
}
BANKING77_INTENT_DOMAIN: dict[str, str] = {i: d for d, intents in BANKING77_DOMAINS.items() for i in intents}

@dataclass
class Pool:
    """Examples to simulate traffic over: ``frame`` has example_id, domain, prompt, reference."""

    name: str
    frame: pl.DataFrame

    @property
    def fingerprint(self) -> str:
        """SHA-256 over the example ids, domains and references: which pool a log came from."""
        h = hashlib.sha256()
        for row in self.frame.select("example_id", "domain", "reference").iter_rows():
            h.update("\x1f".join(row).encode() + b"\n")
        return h.hexdigest()


def _variants(template: str, spec: dict, rng: random.Random) -> list[str]:
    """Every filling of ``template``'s slots, each wrapped in every opening and closing, shuffled."""
    names = re.findall(r"{(\w+)}", template)
    bodies = [template.format(**dict(zip(names, c))) for c in itertools.product(*(spec["slots"][n] for n in names))]
    out = [_wrap(o, b, c) for b in bodies for o in spec["openings"] for c in spec["closings"]]
    rng.shuffle(out)
    return out


def _wrap(opening: str, body: str, closing: str) -> str:
    """``"Hi, " + "How do I..."`` reads ``"Hi, how do I..."``: lower-case the body after a comma (not "I")."""
    if opening.endswith(", ") and not re.match(r"I\b", body):
        body = body[0].lower() + body[1:]
    return opening + body + closing


def builtin_pool() -> Pool:
    """The built-in synthetic support pool: ``per_intent`` distinct prompts per intent, always the same ones."""
    spec = yaml.safe_load(resources.files("adaptive_ft.data").joinpath("support_pool.yaml").read_text())
    rng = random.Random(20250101)  # the pool is part of the package, so its randomness is fixed, not the run seed
    rows: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for domain, intents in spec["domains"].items():
        for intent, templates in intents.items():
            # Take the templates in turn so every phrasing of the intent is represented.
            variants = itertools.zip_longest(*(_variants(t, spec, rng) for t in templates))
            kept = 0
            for prompt in (p for group in variants for p in group if p is not None):
                if normalize_prompt(prompt) in seen:
                    continue
                seen.add(normalize_prompt(prompt))
                rows.append((domain, prompt, intent))
                kept += 1
                if kept == spec["per_intent"]:
                    break
    frame = pl.DataFrame(rows, schema=["domain", "prompt", "reference"], orient="row")
    return Pool("builtin", _with_ids(frame))


def _with_ids(frame: pl.DataFrame) -> pl.DataFrame:
    """Add example_id (hash of the normalized prompt) and drop repeated prompts, keeping the first."""
    ids = pl.Series("example_id", [example_id_for(p) for p in frame["prompt"]])
    out = frame.with_columns(ids).unique("example_id", keep="first", maintain_order=True)
    return out.select("example_id", "domain", "prompt", "reference")


def csv_pool(path: str | Path) -> Pool:
    """A pool from a CSV: ``text,category`` (Banking77; domains from :data:`BANKING77_DOMAINS`) or
    ``prompt,reference[,domain]``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"example pool not found: {path}; pass a CSV with columns text,category (Banking77) "
                         "or prompt,reference,domain")
    try:
        raw = pl.read_csv(path, infer_schema_length=0)
    except (pl.exceptions.PolarsError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot be read as CSV ({e}); expected columns text,category") from None
    raw = raw.rename({"text": "prompt", "category": "reference"}, strict=False)
    missing = {"prompt", "reference"} - set(raw.columns)
    if missing:
        raise InputError(f"{path}: missing column(s) {sorted(missing)}; found {raw.columns}; expected "
                         "text,category (Banking77) or prompt,reference[,domain]")
    raw = raw.filter(pl.col("prompt").is_not_null() & pl.col("reference").is_not_null())
    if "domain" not in raw.columns:
        unmapped = sorted(set(raw["reference"].unique()) - set(BANKING77_INTENT_DOMAIN))
        if unmapped:
            raise InputError(f"{path}: {len(unmapped)} categories have no domain ({unmapped[:5]}...); add a "
                             "'domain' column, or use Banking77's categories")
        raw = raw.with_columns(pl.col("reference").replace_strict(BANKING77_INTENT_DOMAIN).alias("domain"))
    if raw.height == 0:
        raise InputError(f"{path}: no examples (every row lacks a prompt or a reference)")
    name = "banking77" if set(raw["reference"].unique()) <= set(BANKING77_INTENT_DOMAIN) else path.stem
    return Pool(name, _with_ids(raw.select("domain", "prompt", "reference")))


def find_banking77(bases: list[Path] | None = None) -> Path:
    """``shared/data/banking77/train.csv`` in a folder above the working directory or above this package
    (so ``../shared/data/banking77`` of the repository is found from anywhere inside it)."""
    bases = bases if bases is not None else [Path.cwd().resolve(), Path(__file__).resolve().parents[1]]
    for base in bases:
        for parent in (base, *base.parents):
            candidate = parent / "shared" / "data" / "banking77" / "train.csv"
            if candidate.is_file():
                return candidate
    raise InputError("Banking77 not found in ../shared/data/banking77/ above the working directory or the "
                     "package; pass --examples PATH/train.csv")


def load_pool(pool: str | Path) -> Pool:
    """``"builtin"``, ``"banking77"`` (found by :func:`find_banking77`), or a CSV path."""
    if str(pool) == "builtin":
        return builtin_pool()
    if str(pool) == "banking77":
        return csv_pool(find_banking77())
    return csv_pool(pool)


def subset_pool(pool: Pool, size: int) -> Pool:
    """At most about ``size`` examples, each domain keeping its share (at least one example).

    The kept examples are those with the smallest example ids: a hash, so an unbiased pick that is the
    same for every seed and every run.
    """
    if size <= 0 or size >= pool.frame.height:
        return pool
    quota = (pool.frame.group_by("domain").len()
             .with_columns((pl.col("len") * size / pool.frame.height).round().clip(lower_bound=1).alias("quota")))
    kept = (pool.frame.join(quota.select("domain", "quota"), on="domain")
            .with_columns(pl.col("example_id").rank("ordinal").over("domain").alias("_rank"))
            .filter(pl.col("_rank") <= pl.col("quota"))
            .select(pool.frame.columns))
    # keep the pool's own order so the subset is a plain filter of it
    return Pool(pool.name, pool.frame.filter(pl.col("example_id").is_in(kept["example_id"].implode())))


# ---------------------------------------------------------------------------------------------- the world

REGIONS: tuple[str, ...] = ("emea", "amer", "apac")


@dataclass
class World:
    """The hidden structure a log is drawn from; shapes: S segments, D domains, U users, E examples."""

    segments: list[str]
    domains: list[str]
    segment_share: np.ndarray      # (S,) share of users
    segment_pref: np.ndarray       # (S, D) each segment's domain mix
    user_segment: np.ndarray       # (U,) segment index
    user_pref: np.ndarray          # (U, D) each user's domain mix
    user_activity: np.ndarray      # (U,) probability that a query comes from this user
    cell_failure: np.ndarray       # (S, D) planted failure rate
    bad_cells: list[tuple[int, int]]
    example_domain: np.ndarray     # (E,) domain index
    example_logit: np.ndarray      # (E,) difficulty offset on the logit scale
    example_popularity: np.ndarray  # (E,) popularity within its domain (sums to 1 per domain)
    user_region: np.ndarray        # (U,) index into REGIONS: an attribute for the users file
    user_signup_days: np.ndarray   # (U,) days before the window's start the user signed up


def validate(cfg: SimulateConfig) -> None:
    """Raise :class:`ConfigError` listing every value problem of ``cfg`` at once (``SimulateConfig.problems``)."""
    problems = cfg.problems()
    if problems:
        raise ConfigError(problems, "simulate config")


def _start_epoch(start: str) -> int:
    return int(datetime.strptime(start, "%Y-%m-%d").replace(tzinfo=timezone.utc).timestamp())


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _segment_share(cfg: SimulateConfig) -> np.ndarray:
    raw = np.asarray(cfg.segment_shares or [1.0 / (i + 1) for i in range(len(cfg.segments))], dtype=float)
    return raw / raw.sum()


def _plant_failures(cfg: SimulateConfig, segment_pref: np.ndarray, rng: np.random.Generator
                    ) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Failure rate per (segment, domain): domain and segment effects around ``base_failure``, plus bad cells.

    Bad cells are drawn among the cells a segment uses at least as much as the uniform share would, so
    a planted problem carries traffic (a problem nobody meets has no need to find).
    """
    n_seg, n_dom = segment_pref.shape
    logit = _logit(np.array(cfg.base_failure)) + rng.normal(0, 0.35, n_dom)[None, :] \
        + rng.normal(0, 0.2, n_seg)[:, None]
    failure = np.minimum(_sigmoid(logit), max(cfg.base_failure * 2.5, 0.05))
    eligible = np.flatnonzero(segment_pref.ravel() >= 1.0 / n_dom)
    if eligible.size < cfg.bad_cells:
        eligible = np.argsort(-segment_pref.ravel(), kind="stable")[: max(cfg.bad_cells, 1)]
    picked = rng.choice(eligible, size=min(cfg.bad_cells, eligible.size), replace=False)
    bad = sorted((int(i) // n_dom, int(i) % n_dom) for i in picked)
    for s, d in bad:
        failure[s, d] = cfg.bad_failure
    return failure, bad


def _zipf_popularity(example_domain: np.ndarray, n_dom: int, skew: float, rng: np.random.Generator) -> np.ndarray:
    """Within each domain, weight 1/rank^skew over a random ranking of its examples."""
    pop = np.zeros(example_domain.size)
    for d in range(n_dom):
        idx = np.flatnonzero(example_domain == d)
        ranks = rng.permutation(idx.size) + 1
        w = ranks.astype(float) ** -skew
        pop[idx] = w / w.sum()
    return pop


def plant_world(cfg: SimulateConfig, pool: Pool, rng: np.random.Generator) -> World:
    """Draw segments, users, preferences, popularity and planted failure rates.

    Segments, examples and users draw from separate streams, so the same seed plants the same segment
    preferences, bad cells and example difficulties whatever the number of users.
    """
    seg_rng, ex_rng, user_rng = rng.spawn(3)
    domains = sorted(pool.frame["domain"].unique().to_list())
    n_seg, n_dom = len(cfg.segments), len(domains)
    share = _segment_share(cfg)
    segment_pref = seg_rng.dirichlet(np.full(n_dom, cfg.preference_concentration), size=n_seg)
    failure, bad = _plant_failures(cfg, segment_pref, seg_rng)
    dom_index = {d: i for i, d in enumerate(domains)}
    example_domain = np.array([dom_index[d] for d in pool.frame["domain"]], dtype=np.int64)
    example_logit = ex_rng.normal(0.0, cfg.difficulty_spread, example_domain.size)
    popularity = _zipf_popularity(example_domain, n_dom, cfg.popularity_skew, ex_rng)
    user_segment = user_rng.choice(n_seg, size=cfg.users, p=share)
    # A user's mix: a Dirichlet centred on the segment's mix (floored so no domain is impossible).
    user_pref = user_rng.gamma(cfg.user_concentration * (segment_pref[user_segment] + 1e-3))
    user_pref /= user_pref.sum(axis=1, keepdims=True)
    activity = user_rng.lognormal(0.0, cfg.activity_skew, cfg.users)
    region = user_rng.choice(len(REGIONS), size=cfg.users, p=[0.45, 0.35, 0.2])
    signup = user_rng.integers(0, 730, cfg.users)
    return World(
        segments=list(cfg.segments), domains=domains, segment_share=share, segment_pref=segment_pref,
        user_segment=user_segment, user_pref=user_pref, user_activity=activity / activity.sum(),
        cell_failure=failure, bad_cells=bad, example_domain=example_domain, example_logit=example_logit,
        example_popularity=popularity, user_region=region, user_signup_days=signup,
    )


# ---------------------------------------------------------------------------------------------- queries


@dataclass
class Queries:
    """One row per query, sorted by time: user, example, epoch seconds."""

    user: np.ndarray     # (Q,) user index
    example: np.ndarray  # (Q,) example index into the pool
    ts: np.ndarray       # (Q,) int64 epoch seconds

    def segment(self, world: World) -> np.ndarray:
        return world.user_segment[self.user]

    def domain(self, world: World) -> np.ndarray:
        return world.example_domain[self.example]


# Relative traffic per hour of the day (UTC): quiet nights, a late-morning and an afternoon peak.
_HOURLY = np.array([2, 1, 1, 1, 1, 2, 4, 7, 10, 12, 13, 12, 11, 12, 13, 13, 12, 10, 9, 8, 7, 6, 4, 3], float)


def _categorical_rows(probs: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each i, a draw from the categorical ``probs[rows[i]]``; vectorized through cumulative sums."""
    cum = np.cumsum(probs, axis=1)
    u = rng.random(rows.size) * cum[rows, -1]
    out = np.empty(rows.size, dtype=np.int64)
    for start in range(0, rows.size, 1_000_000):  # chunks keep the (chunk, D) comparison small
        sl = slice(start, start + 1_000_000)
        out[sl] = (cum[rows[sl]] < u[sl, None]).sum(axis=1)
    return np.minimum(out, probs.shape[1] - 1)


def sample_queries(world: World, n: int, cfg: SimulateConfig, rng: np.random.Generator) -> Queries:
    """``n`` queries: who asks (activity), which domain (their mix), which example (Zipf), and when."""
    user = rng.choice(world.user_activity.size, size=n, p=world.user_activity)
    domain = _categorical_rows(world.user_pref, user, rng)
    example = np.empty(n, dtype=np.int64)
    for d in range(len(world.domains)):
        rows = np.flatnonzero(domain == d)
        members = np.flatnonzero(world.example_domain == d)
        if rows.size:
            example[rows] = rng.choice(members, size=rows.size, p=world.example_popularity[members])
    day = rng.integers(0, cfg.days, n)
    hour = rng.choice(24, size=n, p=_HOURLY / _HOURLY.sum())
    ts = _start_epoch(cfg.start) + day * 86_400 + hour * 3_600 + rng.integers(0, 3_600, n)
    order = np.argsort(ts, kind="stable")
    return Queries(user=user[order], example=example[order], ts=ts[order].astype(np.int64))


# ---------------------------------------------------------------------------------------------- answers


@dataclass
class Answers:
    """Whether each query was answered right, what was answered, and the failure probability behind it."""

    correct: np.ndarray        # (Q,) bool
    response: pl.Series        # (Q,) the answer text
    fail_prob: np.ndarray | None  # (Q,) planted failure probability; None when a responder answered


def _wrong_labels(world: World, pool: Pool, example: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each example index, a label that is not its reference: usually a sibling intent of the same domain
    (a realistic confusion), otherwise any other label."""
    labels = pool.frame["reference"].unique(maintain_order=True).to_list()
    label_index = {lab: i for i, lab in enumerate(labels)}
    ref = np.array([label_index[r] for r in pool.frame["reference"]], dtype=np.int64)[example]
    out = rng.integers(0, len(labels) - 1, example.size)
    out = np.where(out >= ref, out + 1, out) if len(labels) > 1 else ref
    dom = world.example_domain[example]
    sibling_pick = rng.random(example.size) < 0.7
    for d in range(len(world.domains)):
        sib = np.array(sorted({label_index[r] for r in
                               pool.frame.filter(pl.col("domain") == world.domains[d])["reference"]}))
        rows = np.flatnonzero((dom == d) & sibling_pick)
        if sib.size < 2 or rows.size == 0:
            continue
        pos = np.searchsorted(sib, ref[rows])  # the reference's own position among its siblings
        draw = rng.integers(0, sib.size - 1, rows.size)
        out[rows] = sib[np.where(draw >= pos, draw + 1, draw)]
    return out


def planted_answers(world: World, pool: Pool, q: Queries, rng: np.random.Generator) -> Answers:
    """Right or wrong by the planted failure rate of the (segment, domain) cell and the example's difficulty."""
    cell = world.cell_failure[q.segment(world), q.domain(world)]
    fail_prob = _sigmoid(_logit(cell) + world.example_logit[q.example])
    correct = rng.random(q.example.size) >= fail_prob
    labels = pool.frame["reference"].unique(maintain_order=True)
    wrong = labels.gather(_wrong_labels(world, pool, q.example, rng))
    right = pool.frame["reference"].gather(q.example)
    response = pl.select(pl.when(pl.Series(correct)).then(right).otherwise(wrong)).to_series().alias("response")
    return Answers(correct=correct, response=response, fail_prob=fail_prob)


def responder_answers(pool: Pool, q: Queries, responder: Responder, batch_size: int = 64) -> Answers:
    """Ask ``responder`` each distinct example once (in batches); an answer is right when it equals the reference
    (after trimming and case-folding)."""
    asked = np.unique(q.example)
    prompts = pool.frame["prompt"].gather(asked).to_list()
    refs = pool.frame["reference"].gather(asked).to_list()
    # A model responder (``responder.ModelResponder``) also takes the references: its teacher-forced check
    # needs them to decide cheaply which answers are right. A plain callable sees only the prompts.
    answer = getattr(responder, "answer", None)
    if hasattr(responder, "prepare"):  # e.g. a model responder learns the label set (a label task) here
        responder.prepare(pool.frame["reference"].to_list())
    answers: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="responder", unit="batch", leave=False,
                      disable=None):
        batch = prompts[start:start + batch_size]
        got = list(answer(batch, refs[start:start + batch_size]) if answer else responder(batch))
        if len(got) != len(batch):
            raise InputError(f"responder returned {len(got)} answers for {len(batch)} prompts; it must return "
                             "one answer per prompt, in order")
        answers += [str(a) for a in got]
    ok = np.array([a.strip().casefold() == r.strip().casefold() for a, r in zip(answers, refs)])
    where = np.searchsorted(asked, q.example)
    return Answers(correct=ok[where], response=pl.Series("response", answers).gather(where), fail_prob=None)


# ---------------------------------------------------------------------------------------------- feedback

# Event kinds after the impression, with the chance of each given that the user found the answer helpful
# (column 0) or not (column 1), and the mean delay in seconds after the impression. A query with feedback
# always gets at least its thumbs; the rest are independent.
_FEEDBACK = (
    # kind         p(helpful) p(unhelpful) mean delay s
    ("click", 0.35, 0.10, 8),
    ("thumbs_up", 0.45, 0.00, 25),
    ("thumbs_down", 0.00, 0.45, 20),
    ("rating", 0.20, 0.20, 45),
    ("regenerate", 0.03, 0.30, 12),
    ("edit", 0.00, 0.15, 90),
    ("escalate", 0.02, 0.25, 150),
    ("resolve", 0.35, 0.02, 120),
    ("abandon", 0.03, 0.25, 40),
)
KINDS: tuple[str, ...] = ("impression",) + tuple(k for k, *_ in _FEEDBACK)


@dataclass
class EventIndex:
    """One row per event, sorted by time: its query, its kind (index into :data:`KINDS`), time and value."""

    query: np.ndarray  # (N,)
    kind: np.ndarray   # (N,)
    ts: np.ndarray     # (N,) epoch seconds
    value: np.ndarray  # (N,) float, NaN where the event has no value


def sample_feedback(q: Queries, correct: np.ndarray, cfg: SimulateConfig, rng: np.random.Generator) -> EventIndex:
    """Impressions plus feedback drawn from whether each answer helped, with ``noise`` flipping the reaction."""
    n = correct.size
    helpful = correct ^ (rng.random(n) < cfg.noise)
    gets = rng.random(n) < cfg.feedback_rate
    p = np.array([[ph, pu] for _, ph, pu, _ in _FEEDBACK])           # (K-1, 2)
    chance = np.where(helpful[:, None], p[:, 0], p[:, 1])             # (Q, K-1)
    fired = (rng.random(chance.shape, dtype=np.float32) < chance) & gets[:, None]
    thumbs = np.where(helpful, KINDS.index("thumbs_up"), KINDS.index("thumbs_down")) - 1
    silent = gets & ~fired.any(axis=1)
    fired[np.flatnonzero(silent), thumbs[silent]] = True
    mask = np.concatenate([np.ones((n, 1), bool), fired], axis=1)    # (Q, K): impression always
    query, kind = np.nonzero(mask)                                    # row-major: by query, then kind
    delay = np.array([0] + [d for *_, d in _FEEDBACK], float)[kind]
    ts = q.ts[query] + np.where(kind > 0, 1 + np.floor(rng.exponential(1.0, kind.size) * delay), 0).astype(np.int64)
    value = _event_values(kind, helpful[query], rng)
    order = np.argsort(ts, kind="stable")
    return EventIndex(query=query[order], kind=kind[order], ts=ts[order], value=value[order])


def _event_values(kind: np.ndarray, helpful: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Ratings 4-5 when helpful, 1-3 when not; click dwell seconds (log-normal, longer when helpful)."""
    value = np.full(kind.size, np.nan)
    rating = kind == KINDS.index("rating")
    good = rng.choice([4.0, 5.0], size=kind.size, p=[0.4, 0.6])
    bad = rng.choice([1.0, 2.0, 3.0], size=kind.size, p=[0.5, 0.35, 0.15])
    value[rating] = np.where(helpful, good, bad)[rating]
    click = kind == KINDS.index("click")
    dwell = np.round(rng.lognormal(np.where(helpful, 3.0, 1.8), 0.6), 1)
    value[click] = dwell[click]
    return value


# ---------------------------------------------------------------------------------------------- output


@dataclass
class SimulateResult:
    """What :func:`simulate` wrote."""

    log_path: Path
    truth_path: Path
    n_events: int
    n_users: int
    n_examples: int
    seconds: float
    n_queries: int = 0
    format: str = "jsonl"
    users_path: Path | None = None


def truth_path_for(out: Path) -> Path:
    """``logs.jsonl`` -> ``logs.truth.json``, ``logs.chat.jsonl`` -> ``logs.chat.truth.json`` (beside the log)."""
    return out.with_name(out.stem + ".truth.json")


def _run_tag(cfg: SimulateConfig, pool: Pool, seed: int, responder: bool) -> str:
    """The prefix of every event_id: different runs get different ids, the same run the same ones."""
    blob = json.dumps({"cfg": config_to_dict(cfg), "pool": pool.fingerprint, "seed": seed,
                       "responder": responder}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def build_frame(world: World, pool: Pool, q: Queries, ans: Answers, ev: EventIndex, cfg: SimulateConfig,
                seed: int, tag: str) -> pl.DataFrame:
    """The flat event table (DESIGN.md columns, in that order; ``ts`` a UTC datetime), one row per event."""
    n = ev.query.size
    example = q.example[ev.query]
    users = pl.Series(user_ids(world, seed))
    return pl.DataFrame({
        "event_id": pl.Series(np.arange(n, dtype=np.int64)),
        "ts": pl.Series(ev.ts * 1000).cast(pl.Datetime("ms")),
        "user_id": users.gather(q.user[ev.query]),
        "segment": (pl.Series(world.segments).gather(world.user_segment[q.user[ev.query]]) if cfg.segment_in_log
                    else pl.repeat(None, n, dtype=pl.String, eager=True)),
        "example_id": pool.frame["example_id"].gather(example),
        "domain": pool.frame["domain"].gather(example),
        "prompt": pool.frame["prompt"].gather(example),
        "response": ans.response.gather(ev.query),
        "reference": pool.frame["reference"].gather(example),
        "event": pl.Series(list(KINDS)).gather(ev.kind),
        "value": pl.Series(ev.value).fill_nan(None),
        "model_version": pl.repeat(cfg.model_version, n, eager=True),
    }).with_columns(
        pl.concat_str(pl.lit(tag + "-"), pl.col("event_id").cast(pl.String).str.zfill(10)).alias("event_id"),
    )


def user_ids(world: World, seed: int) -> list[str]:
    """``u<seed>-<index>``: runs with different seeds never share a user."""
    return [f"u{seed}-{i:06d}" for i in range(world.user_segment.size)]


def write_users(world: World, seed: int, start: str, path: Path) -> Path:
    """The users file ``adaptive-ft ingest --users`` reads: user_id, segment, and two attributes."""
    signup = (pl.Series(_start_epoch(start) - world.user_signup_days.astype(np.int64) * 86_400) * 1000)
    pl.DataFrame({
        "user_id": user_ids(world, seed),
        "segment": pl.Series(world.segments).gather(world.user_segment),
        "region": pl.Series(REGIONS).gather(world.user_region),
        "signup_date": signup.cast(pl.Datetime("ms")).dt.date(),
    }).write_csv(path)
    return path


def _iso(col: str) -> pl.Expr:
    return pl.col(col).dt.to_string("%Y-%m-%dT%H:%M:%SZ")


def write_log(frame: pl.DataFrame, out: Path, fmt: str) -> None:
    """Write ``frame`` to ``out`` in ``fmt`` (see the module docstring for each format)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        frame.write_parquet(out, compression="zstd", statistics=True)
    elif fmt == "jsonl":
        frame.with_columns(_iso("ts")).write_ndjson(out)
    elif fmt == "csv":
        frame.with_columns(_iso("ts")).write_csv(out)
    elif fmt == "chat":
        # Each line is already JSON: written as is (no quoting), one per event.
        chat_lines(frame).write_csv(out, include_header=False, quote_style="never")
    else:
        raise InputError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def _json_text(frame: pl.DataFrame, col: str) -> pl.Expr:
    """``col`` as JSON string literals. Polars' JSON encoder is slow per row, so only the column's distinct
    values are encoded (prompts, labels, segments: thousands at most) and mapped back onto the rows."""
    encode = pl.struct(pl.col(col).alias("c")).struct.json_encode().str.slice(5).str.head(-1)  # {"c":X} -> X
    vocab = frame.select(pl.col(col).unique()).select(col, encode.alias("_json"))
    return pl.col(col).replace_strict(vocab[col], vocab["_json"], return_dtype=pl.String)


def chat_lines(frame: pl.DataFrame) -> pl.DataFrame:
    """The chat format (module docstring) as one column of JSON lines, one per event.

    Ids, user ids and timestamps are generated here from safe characters, so they are only quoted.
    """
    def quoted(e: pl.Expr) -> pl.Expr:
        return pl.concat_str(pl.lit('"'), e, pl.lit('"'))

    parts = [
        pl.lit('{"messages":[{"role":"user","content":'), _json_text(frame, "prompt"),
        pl.lit('},{"role":"assistant","content":'), _json_text(frame, "response"),
        pl.lit('}],"event_id":'), quoted(pl.col("event_id")), pl.lit(',"ts":'), quoted(_iso("ts")),
        pl.lit(',"user_id":'), quoted(pl.col("user_id")),
        pl.lit(',"segment":'), _json_text(frame, "segment"), pl.lit(',"domain":'), _json_text(frame, "domain"),
        pl.lit(',"example_id":'), quoted(pl.col("example_id")),
        pl.lit(',"reference":'), _json_text(frame, "reference"), pl.lit(',"event":'), _json_text(frame, "event"),
        pl.lit(',"value":'), pl.col("value").cast(pl.String).fill_null("null"),
        pl.lit(',"model_version":'), _json_text(frame, "model_version"), pl.lit("}"),
    ]
    return frame.select(pl.concat_str(parts).alias("line"))


def build_truth(world: World, pool: Pool, q: Queries, ans: Answers, cfg: SimulateConfig, seed: int,
                n_events: int, fmt: str) -> dict:
    """The planted truth (docs/contracts.md), measured over the queries actually generated."""
    seg, dom = q.segment(world), q.domain(world)
    n_seg, n_dom = len(world.segments), len(world.domains)
    cell = seg * n_dom + dom
    count = np.bincount(cell, minlength=n_seg * n_dom).reshape(n_seg, n_dom)
    wrong = np.bincount(cell, weights=~ans.correct, minlength=n_seg * n_dom).reshape(n_seg, n_dom)
    observed = np.divide(wrong, count, out=np.zeros_like(wrong), where=count > 0)
    if ans.fail_prob is not None:  # planted: the expected failure of the cell's actual traffic
        expected = np.bincount(cell, weights=ans.fail_prob, minlength=n_seg * n_dom).reshape(n_seg, n_dom)
        failure = np.divide(expected, count, out=world.cell_failure.copy(), where=count > 0)
    else:  # a responder answered: its measured failure is the truth
        failure = observed
    share = count / max(q.example.size, 1)
    need = share * failure
    rows = [{"segment": world.segments[s], "domain": world.domains[d], "need": round(float(need[s, d]), 6),
             "failure_rate": round(float(failure[s, d]), 6), "traffic_share": round(float(share[s, d]), 6),
             "queries": int(count[s, d]), "observed_failure": round(float(observed[s, d]), 6),
             "planted_failure_rate": None if ans.fail_prob is None else round(float(world.cell_failure[s, d]), 6),
             "bad_cell": (s, d) in world.bad_cells}
            for s in range(n_seg) for d in range(n_dom)]
    domain_need = {world.domains[d]: round(float(need[:, d].sum()), 6) for d in range(n_dom)}
    return {
        "seed": seed, "pool": pool.name, "segments": world.segments, "domains": world.domains,
        "need": rows, "domain_need": domain_need,
        "top_domains": sorted(domain_need, key=lambda d: (-domain_need[d], d)),
        "failure_source": "planted" if ans.fail_prob is not None else "responder",
        "bad_cells": [{"segment": world.segments[s], "domain": world.domains[d]} for s, d in world.bad_cells],
        "segment_shares": {s: round(float(v), 6) for s, v in zip(world.segments, world.segment_share)},
        "segment_preferences": {world.segments[s]: {world.domains[d]: round(float(world.segment_pref[s, d]), 6)
                                                    for d in range(n_dom)} for s in range(n_seg)},
        "n_events": n_events, "n_queries": int(q.example.size), "n_users": int(np.unique(q.user).size),
        "n_examples": int(np.unique(q.example).size), "pool_size": pool.frame.height,
        "pool_fingerprint": pool.fingerprint, "format": fmt, "model_version": cfg.model_version,
        "config": config_to_dict(cfg),
    }


# ---------------------------------------------------------------------------------------------- entry


def _events_per_query(cfg: SimulateConfig, world: World) -> float:
    """Expected events per query under the planted rates, to turn the event target into a query count."""
    seg_traffic = np.bincount(world.user_segment, weights=world.user_activity, minlength=len(world.segments))
    cell_traffic = np.zeros_like(world.cell_failure)
    np.add.at(cell_traffic, world.user_segment, world.user_activity[:, None] * world.user_pref)
    fail = float((cell_traffic * world.cell_failure).sum() / max(seg_traffic.sum(), 1e-12))
    unhelpful = fail * (1 - cfg.noise) + (1 - fail) * cfg.noise
    p = np.array([[ph, pu] for _, ph, pu, _ in _FEEDBACK])
    # Feedback events given feedback: the independent ones, plus the thumbs when none fired.
    per_outcome = p.sum(axis=0) + np.prod(1 - p, axis=0)
    return 1.0 + cfg.feedback_rate * ((1 - unhelpful) * per_outcome[0] + unhelpful * per_outcome[1])


def simulate(cfg: SimulateConfig, out: str | Path, fmt: str = "jsonl", pool: str | Path | Pool = "builtin",
             seed: int = 0, responder: Responder | None = None) -> SimulateResult:
    """Generate a log of about ``cfg.events`` events at ``out`` (in ``fmt``) and its truth file beside it.

    ``pool``: "builtin", "banking77", a CSV path or a :class:`Pool`. ``responder``: answers a batch of
    prompts; when given, its answers (right when equal to the reference) replace the planted failures.
    """
    t0 = time.perf_counter()
    validate(cfg)
    if responder is not None and getattr(responder, "name", "") and cfg.model_version == SimulateConfig.model_version:
        cfg = dataclasses.replace(cfg, model_version=responder.name)  # the events name the model that answered
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    out = Path(out)
    the_pool = subset_pool(pool if isinstance(pool, Pool) else load_pool(pool), cfg.pool_size)
    # Independent streams per stage: a responder run sees exactly the users and queries of a planted run.
    world_rng, query_rng, answer_rng, event_rng = (np.random.default_rng(s)
                                                   for s in np.random.SeedSequence(seed).spawn(4))
    # A bar only where it helps: large runs on a terminal (tqdm hides it elsewhere when disable=None).
    with tqdm(total=5, desc="simulate", unit="step", leave=False,
              disable=None if cfg.events >= 500_000 else True) as bar:
        world = plant_world(cfg, the_pool, world_rng)
        q = sample_queries(world, max(1, math.ceil(cfg.events / _events_per_query(cfg, world))), cfg, query_rng)
        bar.update()
        ans = (responder_answers(the_pool, q, responder) if responder is not None
               else planted_answers(world, the_pool, q, answer_rng))
        bar.update()
        ev = sample_feedback(q, ans.correct, cfg, event_rng)
        bar.update()
        tag = _run_tag(cfg, the_pool, seed, responder is not None)
        frame = build_frame(world, the_pool, q, ans, ev, cfg, seed, tag)
        bar.update()
        write_log(frame, out, fmt)
        bar.update()
    truth = build_truth(world, the_pool, q, ans, cfg, seed, frame.height, fmt)
    truth_path = truth_path_for(out)
    truth_path.write_text(json.dumps(truth, indent=2) + "\n")
    users_path = write_users(world, seed, cfg.start, out.with_name(out.stem + ".users.csv")) if cfg.users_file else None
    return SimulateResult(log_path=out, truth_path=truth_path, users_path=users_path, n_events=frame.height,
                          n_users=truth["n_users"], n_examples=truth["n_examples"],
                          seconds=time.perf_counter() - t0, n_queries=q.example.size, format=fmt)


__all__ = [
    "BANKING77_DOMAINS", "FORMATS", "KINDS", "Pool", "SimulateResult", "builtin_pool", "csv_pool",
    "example_id_for", "find_banking77", "load_pool", "simulate", "subset_pool", "truth_path_for", "validate",
]
