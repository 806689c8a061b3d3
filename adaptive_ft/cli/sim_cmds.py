"""Placeholder: filled in by the stage that owns these commands."""

COMMANDS: list = []
