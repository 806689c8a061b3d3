"""Training data: the split, chat formatting, answer-only labels, weighted sampling and length-grouped batches.

Everything here is a pure function of its inputs and a seed, so every process of a DDP run, and a resumed
run, computes the same split and the same batch order without talking to the others.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import polars as pl

from adaptive_ft.artifacts.plan import Plan
from adaptive_ft.errors import PlanError, TrainingError
from adaptive_ft.lm.tokens import format_prompt  # noqa: F401  (docs/contracts.md names it here too)
from adaptive_ft.store import Store

SPLIT_COLUMNS = ["example_id", "domain", "split", "prompt", "reference"]


# --------------------------------------------------------------------------------------------- examples


def load_examples(store_path: str | Path) -> pl.DataFrame:
    """example_id, domain, prompt, reference of every example in the store (read-only)."""
    with Store.open(store_path, read_only=True) as store:
        return store.examples()


def select_examples(examples: pl.DataFrame, plan: Plan) -> pl.DataFrame:
    """The examples of the plan's trainable domains that have a reference; a clear error for domains with none.

    A domain the plan marks ``trainable: false`` (prioritize found no reference answer for it and gave it no
    share) is left out, as the plan says.
    """
    labelled = examples.filter(pl.col("reference").is_not_null() & (pl.col("reference") != ""))
    domains = [d.domain for d in plan.domains if d.trainable]
    counts = dict(labelled.group_by("domain").len().iter_rows())
    empty = [d for d in domains if not counts.get(d)]
    if empty and len(empty) == len(domains):
        raise TrainingError(f"no examples with a reference for any of the plan's domains {domains}; the store "
                            f"has references for: {sorted(k for k in counts if k)[:20]}. Ingest examples with "
                            f"a 'reference' field, or write a plan for domains the store has")
    if empty:
        raise PlanError(f"plan domains with no examples (with a reference) in the store: {empty}; drop them "
                        f"from the plan or ingest their examples")
    return labelled.filter(pl.col("domain").is_in(domains)).sort("example_id")


def _stable_key(example_id: str, seed: int) -> int:
    """A per-example pseudo-random key that does not depend on row order (so the split is reproducible)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{example_id}".encode()).digest()[:8], "big")


def split_examples(examples: pl.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pl.DataFrame:
    """Assign each example to train / val / test, stratified by domain; an example is in exactly one split.

    Within a domain of n examples, round(n * test_fraction) go to test and round(n * val_fraction) to val,
    but a domain always keeps at least one training example.
    """
    df = examples.unique("example_id", keep="first").with_columns(
        pl.col("example_id").map_elements(lambda e: _stable_key(e, seed), return_dtype=pl.UInt64).alias("_k"))
    df = df.sort(["domain", "_k"]).with_columns(
        pl.int_range(pl.len()).over("domain").alias("_i"), pl.len().over("domain").alias("_n"))
    n = pl.col("_n").cast(pl.Float64)
    n_test = (n * test_fraction).round().clip(upper_bound=pl.col("_n") - 1)
    n_val = (n * val_fraction).round().clip(upper_bound=pl.col("_n") - 1 - n_test)
    split = (pl.when(pl.col("_i") < n_test).then(pl.lit("test"))
             .when(pl.col("_i") < n_test + n_val).then(pl.lit("val")).otherwise(pl.lit("train")))
    return df.with_columns(split.alias("split")).select(SPLIT_COLUMNS).sort("example_id")




# --------------------------------------------------------------------------------------------- formatting










# --------------------------------------------------------------------------------------------- sampling


def train_probabilities(train: pl.DataFrame, plan: Plan) -> np.ndarray:
    """Per-row sampling probability of the training split, from the plan (sums to 1).

    The plan's example weights when it has them (examples it does not list are not drawn); otherwise each
    domain gets its ``share``, spread evenly over its examples; with no shares either, every example
    weighs the same.
    """
    ex = plan.example_weights()
    if ex.height:
        w = train.join(ex.select("example_id", pl.col("weight").cast(pl.Float64)), on="example_id", how="left")
        weights = w["weight"].fill_null(0.0).to_numpy()
    else:
        shares = {d.domain: d.share for d in plan.domains}
        if sum(shares.values()) <= 0:
            return np.full(train.height, 1.0 / max(1, train.height))
        per_domain = train.group_by("domain").len()
        size = dict(per_domain.iter_rows())
        weights = np.array([shares.get(d, 0.0) / size[d] for d in train["domain"]], dtype=np.float64)
    total = float(weights.sum())
    if not np.isfinite(total) or total <= 0:
        raise TrainingError("the plan gives every training example weight 0: nothing to draw. Check that the "
                            "plan's example_ids are the store's")
    return weights / total


def draw_epoch(weights: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """``n`` row indices drawn with the given probabilities for one epoch (deterministic in seed and epoch).

    Residual sampling: each row is drawn floor(n * w) times, and the remaining draws go by systematic
    sampling over the fractional parts, so a row is drawn floor(n * w) or ceil(n * w) times with exactly
    n * w in expectation: far less variance than plain multinomial sampling, and uniform weights give
    exactly one pass over the data.
    """
    rng = np.random.default_rng([seed, epoch, 7])
    expected = weights * n
    counts = np.floor(expected).astype(np.int64)
    rest = n - int(counts.sum())
    if rest > 0:
        cum = np.cumsum(expected - counts)
        picks = np.searchsorted(cum, rng.random() + np.arange(rest), side="right")
        np.add.at(counts, np.minimum(picks, len(counts) - 1), 1)
    order = np.repeat(np.arange(len(weights)), counts)
    rng.shuffle(order)
    return order


def length_grouped_batches(order: np.ndarray, lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                           group: int = 64) -> list[np.ndarray]:
    """Cut ``order`` into batches of similar lengths (little padding), in a shuffled but seeded batch order.

    Windows of ``group`` batches are sorted by length and cut, so lengths are grouped locally while
    the sample order still mixes domains across the epoch.
    """
    rng = np.random.default_rng([seed, epoch, 11])
    window = batch_size * group
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


def epoch_batches(weights: np.ndarray, lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                  rank: int = 0, world: int = 1) -> list[np.ndarray]:
    """This process's batches for ``epoch``: the global sample cut into batches, every ``world``-th one.

    Each process draws its own shard of the same weighted sample; the last incomplete round is dropped
    so that every process runs the same number of steps.
    """
    order = draw_epoch(weights, len(weights), seed, epoch)
    batches = length_grouped_batches(order, lengths, batch_size, seed, epoch)
    usable = (len(batches) // world) * world
    return batches[rank:usable:world]


# --------------------------------------------------------------------------------------------- collation

