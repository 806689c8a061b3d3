"""Errors a user can act on. The CLI turns each into a one-line message and a non-zero exit, never a traceback."""

from __future__ import annotations


class AdaptiveFTError(Exception):
    """Base class: the message says what was wrong, where, and what to do."""


class ConfigError(AdaptiveFTError):
    """A config file or override is invalid. Holds every problem found, not just the first."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s){where}:\n{lines}")


class StoreError(AdaptiveFTError):
    """The interaction store cannot be opened or written."""


class StoreLockedError(StoreError):
    """Another process holds the store for writing."""


class InputError(AdaptiveFTError):
    """An input file or argument cannot be used."""


class PlanError(AdaptiveFTError):
    """A plan.json is missing, malformed, or does not fit the model or data."""


class ModelError(AdaptiveFTError):
    """A model cannot be found or loaded as a causal LM."""


class TrainingError(AdaptiveFTError):
    """Training cannot start or had to stop (empty data, NaN loss...)."""


def read_json(path, missing: str, error: type[AdaptiveFTError] = InputError, hint: str = ""):
    """Parse the JSON file ``path``; a missing file raises ``error(missing)``, broken JSON names the line.

    One reader for every artifact a stage hands the next (plan.json, RUN/manifest.json, eval.json...), so each
    bad-input message has the same shape: what, where, what to do.
    """
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise error(missing)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON (line {e.lineno}: {e.msg}){hint}") from None
