"""A train run's folder as other stages read it (docs/contracts.md, "Train run"): the manifest, the split, the task.

``adaptive-ft train --out RUN`` writes it; export, evaluate, the loop and the report read it through here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import polars as pl

from adaptive_ft.errors import read_json

SPLIT_COLUMNS = ["example_id", "domain", "split", "prompt", "reference"]


def read_manifest(run: Path) -> dict[str, Any]:
    """``RUN/manifest.json`` as written (:func:`adaptive_ft.lm.models.read_run` also resolves its base model)."""
    path = Path(run) / "manifest.json"
    return read_json(path, f"{run}: no manifest.json; pass the folder `adaptive-ft train --out` wrote",
                     hint="; was the train run interrupted while writing it?")


def is_run(path: Path) -> bool:
    """A train run folder: a manifest and an adapter."""
    return (path / "manifest.json").is_file() and (path / "adapter").is_dir()


def split_sha256(split: pl.DataFrame) -> str:
    """A hash of which example is in which split (what the manifest records)."""
    h = hashlib.sha256()
    for eid, s in split.sort("example_id").select("example_id", "split").iter_rows():
        h.update(f"{eid}\t{s}\n".encode())
    return h.hexdigest()


def guess_task(split: pl.DataFrame) -> str:
    """"label" when answers are a small set of short names (intents, classes), else "text"."""
    refs = split["reference"]
    short = refs.str.split(" ").list.len().max() <= 4
    return "label" if short and refs.n_unique() <= max(2, split.height // 2) else "text"
