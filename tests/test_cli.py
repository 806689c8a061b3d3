"""Every command documents itself: --help works and shows an example (sqlite-utils' test_docs idea)."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from adaptive_ft.cli import cli

EXPECTED = {"ingest", "stats", "simulate", "prioritize", "train", "export", "evaluate", "report", "demo"}


def _commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    out = []
    for name, cmd in group.commands.items():
        out.append((prefix + name, cmd))
        if isinstance(cmd, click.Group):
            out += _commands(cmd, prefix + name + " ")
    return out


def test_pipeline_commands_exist():
    assert EXPECTED <= set(cli.commands)


@pytest.mark.parametrize("name,cmd", _commands(cli), ids=lambda x: x if isinstance(x, str) else "")
def test_every_command_has_help_with_an_example(name: str, cmd: click.Command):
    result = CliRunner().invoke(cli, [*name.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert cmd.help and len(cmd.help.strip()) > 20, f"{name}: no help text"
    if not isinstance(cmd, click.Group):
        assert "adaptive-ft " + name in result.output, f"{name}: --help shows no example invocation"


def test_project_errors_become_one_line_messages(tmp_path):
    result = CliRunner().invoke(cli, ["train", "--plan", str(tmp_path / "missing.json"), "--out", str(tmp_path / "r"),
                                      "--store", str(tmp_path / "s.duckdb")])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
