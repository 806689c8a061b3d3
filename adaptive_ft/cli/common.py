"""Options shared by several commands."""

from __future__ import annotations

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
