"""The one reader of JSON artifacts: a missing file and broken JSON each give a message that says where."""

from __future__ import annotations

import pytest

from adaptive_ft.artifacts.plan import Plan
from adaptive_ft.errors import InputError, PlanError, read_json


def test_missing_file_raises_the_given_error_with_the_given_message(tmp_path):
    with pytest.raises(PlanError, match="^no plan here$"):
        read_json(tmp_path / "nope.json", "no plan here", PlanError)


def test_broken_json_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "domains": [\n')
    with pytest.raises(InputError, match=r"bad\.json: not valid JSON \(line 3: .*\); retry$"):
        read_json(bad, "missing", hint="; retry")
    with pytest.raises(PlanError, match=r"not valid JSON \(line 3"):
        Plan.load(bad)
