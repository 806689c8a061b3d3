"""One prompt, one example id: the Python rule (simulate) and the SQL rule (ingest) agree on any text."""

from __future__ import annotations

import duckdb
import numpy as np

from adaptive_ft.text import NORMALIZE_PROMPT_SQL, example_id_for, normalize_prompt

# ASCII letters and whitespace, and the characters where Python's and DuckDB's notions of whitespace and
# lower case differ (no-break space, em space, vertical tab, zero-width space, dotted capital I, sharp s, sigma)
POOL = list("aZ ?.\t\n\r\f\v") + ["\u00a0", "\u2003", "\u200b", "\u0130", "\u1e9e", "\u03a3", "\u00c0", "\ufb00"]


def test_python_and_sql_normal_forms_agree_on_random_text() -> None:
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(POOL, size=rng.integers(0, 12))) for _ in range(3000)]
    con = duckdb.connect()
    con.execute("CREATE TABLE t (i INTEGER, prompt VARCHAR)")
    con.executemany("INSERT INTO t VALUES (?, ?)", list(enumerate(texts)))
    rows = con.execute(f"SELECT i, {NORMALIZE_PROMPT_SQL}, left(sha256({NORMALIZE_PROMPT_SQL}), 16) FROM t").fetchall()
    sql = {i: (norm, eid) for i, norm, eid in rows}
    bad = [(t, normalize_prompt(t), sql[i][0]) for i, t in enumerate(texts)
           if (normalize_prompt(t), example_id_for(t)) != sql[i]]
    assert bad == []


def test_the_normal_form() -> None:
    assert normalize_prompt("  Where is \t my\norder?  ") == "where is my order?"
    assert normalize_prompt("x\u00a0y") == "x\u00a0y"  # a no-break space is a character, not a separator
    assert normalize_prompt("\u0130stanbul") == "istanbul"
