"""``python -m adaptive_ft.cli``: the same as the ``adaptive-ft`` command."""

from adaptive_ft.cli import cli

cli()
