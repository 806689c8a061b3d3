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
    # CliRunner never prints a traceback, so check what the conversion does: a project error (PlanError) reaches
    # click as ClickException -- exit code 1 and one "Error: ..." line naming the file and the fix -- and not as
    # the PlanError itself (which CliRunner would store in result.exception, also with exit code 1).
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, repr(result.exception)
    missing = tmp_path / "missing.json"
    assert result.output == (f"Error: plan not found: {missing}. Write one with `adaptive-ft prioritize --out "
                             f"{missing}`.\n")
    # a usage error stays click's own: exit code 2
    assert CliRunner().invoke(cli, ["train", "--no-such-option"]).exit_code == 2
