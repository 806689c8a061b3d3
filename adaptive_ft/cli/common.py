"""Options shared by several commands."""

from __future__ import annotations

import json
from typing import Any

import click

DEFAULT_STORE = "adaptive_ft.duckdb"

store_option = click.option(
    "--store",
    envvar="ADAPTIVE_FT_STORE",
    default=DEFAULT_STORE,
    show_default=True,
    type=click.Path(dir_okay=False),
    help="DuckDB store file (env ADAPTIVE_FT_STORE).",
)
config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), default=None,
    help="YAML run config (see configs/); defaults apply to anything it leaves out.",
)
overrides_argument = click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")


def flag_overrides(flags: dict[str, Any], overrides: tuple[str, ...] | list[str] = ()) -> list[str]:
    """A command's flags as ``key=value`` overrides ahead of the positional ones, so the config is validated once,
    with everything applied (the one way every command sets config; a positional override given too wins).

    ``{"train.lr": 1e-3, "seed": None}`` -> ``["train.lr=0.001"]``; values are written as JSON, which YAML reads back.
    """
    return [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None] + list(overrides)
