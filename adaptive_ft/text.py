"""The normal form of a prompt: two prompts with the same normal form are the same example.

``simulate`` hashes it into ``example_id`` (:func:`example_id_for`) and ingest computes the same id in SQL
(:data:`NORMALIZE_PROMPT_SQL`) for records that carry a prompt but no id, so one prompt gets one id whoever made
it. Both spell out the same rule -- runs of ASCII whitespace become one space, the ends are trimmed, letters are
lower-cased -- instead of ``\\s`` and ``str.strip()``, whose Unicode reach differs between Python and DuckDB's RE2
(a no-break space or a vertical tab was whitespace to one and not the other), and lower-case one character at a
time as DuckDB does (``str.lower()`` turns a word-final Σ into ς). U+0130 (İ) is mapped to ``i`` first: it is
the one letter whose lower case is two code points in Python and one in DuckDB.
"""

from __future__ import annotations

import hashlib
import re

_WS = re.compile(r"[ \t\n\r\f\v]+")

NORMALIZE_PROMPT_SQL = "lower(trim(regexp_replace(replace(prompt, 'İ', 'i'), '[ \\t\\n\\r\\f\\v]+', ' ', 'g'), ' '))"


def normalize_prompt(text: str) -> str:
    """Trimmed, lower case, runs of whitespace as one space (the rule :data:`NORMALIZE_PROMPT_SQL` applies)."""
    # lower-cased one character at a time, as DuckDB does: Python's str.lower() makes a word-final Σ a ς
    return "".join(map(str.lower, _WS.sub(" ", text.replace("\u0130", "i")).strip(" ")))


def example_id_for(prompt: str) -> str:
    """A stable example id: the first 16 hex digits of the SHA-256 of the normalized prompt."""
    return hashlib.sha256(normalize_prompt(prompt).encode()).hexdigest()[:16]
