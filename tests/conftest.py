"""Fixtures several test files share: a tiny model folder and a tiny train RUN, each built once per distinct
arguments for the whole session (building them is most of a tiny test's cost)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the helper modules beside this file (ship_helpers, store_helpers)

from ship_helpers import tiny_run as _tiny_run  # noqa: E402

from adaptive_ft.lm.models import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_model(texts=..., n_layers=..., hidden=...)``: the folder of a tiny Llama and its tokenizer
    (``lm.models.build_tiny_model``); the same arguments return the same folder."""
    built: dict[str, Path] = {}

    def build(**kwargs: Any) -> Path:
        key = json.dumps(kwargs, sort_keys=True, default=str)
        if key not in built:
            built[key] = build_tiny_model(tmp_path_factory.mktemp("tiny"), **kwargs)
        return built[key]

    return build


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_run(task="label", seed=0)``: a train RUN folder (base, random non-zero adapter, manifest, split;
    ``ship_helpers.tiny_run``); the same arguments return the same folder, so tests must not modify it."""
    built: dict[tuple, Path] = {}

    def build(task: str = "label", seed: int = 0) -> Path:
        if (task, seed) not in built:
            built[(task, seed)] = _tiny_run(tmp_path_factory.mktemp("run"), task=task, seed=seed)
        return built[(task, seed)]

    return build
