"""The ``adaptive-ft`` command: a click group whose commands are thin shells over the stage functions.

Each stage's commands live in a module of this package; this file only assembles them and turns the
project's own errors into one-line messages.
"""

from __future__ import annotations

import click

from adaptive_ft import __version__, spin_openmp_threads
from adaptive_ft.cli import data_cmds, demo_cmds, loop_cmds, model_cmds, plan_cmds, report_cmds, ship_cmds, sim_cmds
from adaptive_ft.errors import AdaptiveFTError

spin_openmp_threads()  # before any command imports torch (libgomp reads it once, when torch loads it)


class _Group(click.Group):
    """Turns :class:`AdaptiveFTError` into ``Error: ...`` and exit code 1, never a traceback."""

    def invoke(self, ctx: click.Context):  # noqa: D401
        try:
            return super().invoke(ctx)
        except AdaptiveFTError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="adaptive-ft")
def cli() -> None:
    """Fine-tune a language model where your users need it.

    \b
    The pipeline, each stage re-runnable on its own:
      adaptive-ft simulate --out logs.jsonl          # or bring your own logs
      adaptive-ft ingest logs.jsonl                  # -> DuckDB store
      adaptive-ft stats
      adaptive-ft prioritize --out plan.json         # CF decides what to train
      adaptive-ft train --plan plan.json --out RUN
      adaptive-ft export RUN --out EXPORT
      adaptive-ft evaluate --models base,RUN,EXPORT/int8 --out eval.json
      adaptive-ft report --plan plan.json --run RUN --eval eval.json --out report.html
    The loop, once a model is deployed and its users' logs are in:
      adaptive-ft simulate --out v1.jsonl --responder RUN_V1   # or v1's real logs
      adaptive-ft loop --store v1.duckdb --v1 RUN_V1 --out LOOP
    Or all of it at once: adaptive-ft demo
    """


for _module in (data_cmds, sim_cmds, plan_cmds, model_cmds, ship_cmds, report_cmds, loop_cmds, demo_cmds):
    for _command in _module.COMMANDS:
        cli.add_command(_command)
