"""Small log-writing helpers shared by the store tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def rec(i: int, **kw: Any) -> dict[str, Any]:
    """A valid flat-format record; ``kw`` overrides or (with None) removes fields."""
    r = {
        "event_id": f"e{i}", "ts": f"2024-03-01T10:{i // 60 % 60:02d}:{i % 60:02d}Z", "user_id": f"u{i % 7}",
        "segment": ["free", "pro"][i % 2], "example_id": f"x{i % 5}", "domain": ["billing", "cards"][i % 5 % 2],
        "prompt": f"question {i % 5}", "event": ["impression", "click", "thumbs_down"][i % 3],
    }
    r.update(kw)
    return {k: v for k, v in r.items() if v is not None}


def write_jsonl(path: Path, records: list[dict[str, Any] | str]) -> Path:
    """One JSON object (or a literal line, for broken records) per line."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path
