"""Ingest: every kind of bad record, unreadable files, stable ids and idempotence, and each format."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path

import polars as pl
import pytest

from adaptive_ft.config import IngestConfig
from adaptive_ft.store import Store, ingest
from store_helpers import rec, write_jsonl

MAX = IngestConfig().max_field_chars
UTC = dt.timezone.utc


def _rejected(db: Path) -> list[tuple[int, str]]:
    with Store.open(db, read_only=True) as s:
        return s.sql("SELECT line, reason FROM rejected ORDER BY batch_id, line").rows()


def _stored_ids(db: Path) -> list[str]:
    with Store.open(db, read_only=True) as s:
        return sorted(s.sql("SELECT event_id FROM events")["event_id"])


def _md5(*parts: str) -> str:
    return hashlib.md5("\x1f".join(parts).encode()).hexdigest()


# ------------------------------------------------------------------------------------------- bad records

BAD_JSONL: list[tuple[object, str | None]] = [  # (record or literal line, expected reason or None = valid)
    (rec(1), None),
    ("{bad json", "malformed JSON"),
    (rec(3, user_id=None), "missing required field: user_id"),
    (rec(4, ts="last tuesday"), "unparseable timestamp: last tuesday (expected ISO-8601 or epoch seconds)"),
    (rec(5, event="purchase"), "unknown event type: purchase"),
    (rec(6, value="lots"), "wrong type: value is not a number: lots"),
    (rec(7, prompt="p" * (MAX + 1)), f"field too long: prompt ({MAX + 1} chars > {MAX})"),
    ("", None),  # a blank line is not a record: neither stored nor rejected
    (rec(9, user_id={"id": 1}), "wrong type: user_id is a JSON object, expected a string"),
    ("[1, 2]", "wrong type: record is a JSON array, expected an object"),
    (rec(11, ts=1709287211), None),  # epoch seconds
    (rec(12, event="rating", value=4), None),
    (rec(13, ts=None), "missing required field: ts"),
    (rec(14, event=None), "missing required field: event"),
    (rec(15, example_id=None, prompt=None), "missing required field: example_id or prompt"),
    (rec(16, example_id="x_new", domain=None), "missing required field: domain (example x_new has none in this file or the store)"),
    (rec(17, example_id="x_bare", prompt=None), "missing required field: prompt (example x_bare has none in this file or the store)"),
    (rec(18, response="r" * 10_000_000), f"field too long: response (10000000 chars > {MAX})"),  # a 10 MB line
    (rec(19, ts=1709287211000), "unparseable timestamp: 1709287211000 (expected ISO-8601 or epoch seconds)"),
    (rec(20, example_id=None, prompt="  Question   FIVE "), None),
    (rec(21, event=" Thumbs_Up "), None),
    (rec(22, event_id=None, value=2.5, event="rating"), None),
    (rec(23, value=True), "wrong type: value is not a number: true"),
    ("   ", None),
    (rec(25, ts="2024-03-01T12:00:00+02:00"), None),
]


def test_every_kind_of_bad_record_is_rejected_with_its_line_and_reason(tmp_path: Path):
    log = write_jsonl(tmp_path / "bad.jsonl", [r for r, _ in BAD_JSONL])
    db = tmp_path / "s.duckdb"
    f = ingest([log], db).files[0]
    expected = [(i + 1, reason) for i, (_, reason) in enumerate(BAD_JSONL) if reason]
    valid = [r for r, reason in BAD_JSONL if reason is None and isinstance(r, dict)]
    assert (f.error, f.rows_ok, f.rows_duplicate, f.rows_rejected) == (None, len(valid), 0, len(expected))
    assert _rejected(db) == expected
    with Store.open(db, read_only=True) as s:
        ev = s.sql("SELECT event_id, ts, event, value, example_id FROM events ORDER BY ts").to_dicts()
        raw = dict(s.sql("SELECT line, raw FROM rejected").rows())
        prompt20 = s.sql("SELECT prompt FROM examples WHERE example_id = ?", [_prompt_id("question five")]).item()
    # every valid record is stored, ids as given or hashed from the normalized record
    hashed = _md5("u1", "2024-03-01T10:00:22.000000", "rating", "x2", "2.5", "")
    assert sorted(e["event_id"] for e in ev) == sorted(["e1", "e11", "e12", "e20", "e21", hashed, "e25"])
    by_id = {e["event_id"]: e for e in ev}
    assert by_id["e11"]["ts"] == dt.datetime(2024, 3, 1, 10, 0, 11)  # 1709287211 s after the epoch, in UTC
    assert by_id["e25"]["ts"] == dt.datetime(2024, 3, 1, 10, 0, 0)  # +02:00 converted to UTC
    assert by_id["e21"]["event"] == "thumbs_up" and by_id["e12"]["value"] == 4.0
    assert by_id["e20"]["example_id"] == _prompt_id("question five") and prompt20 == "  Question   FIVE "
    # raw text kept for each rejected line, cut with a note when huge
    assert raw[2] == "{bad json" and raw[10] == "[1, 2]"
    assert raw[18].endswith(f"... ({len(json.dumps(rec(18, response='r' * 10_000_000)))} chars)")
    assert len(raw[18]) < IngestConfig().max_raw_chars + 40


def _prompt_id(normalized: str) -> str:
    """The example id of a prompt with none: first 16 hex digits of the SHA-256 of its normal form."""
    return hashlib.sha256(normalized.encode()).hexdigest()[:16]


def test_crlf_lines_keep_their_numbers(tmp_path: Path):
    log = tmp_path / "crlf.jsonl"
    log.write_bytes(("\r\n".join([json.dumps(rec(1)), "{oops", "", json.dumps(rec(4, user_id=None)), json.dumps(rec(5))])
                     + "\r\n").encode())
    db = tmp_path / "s.duckdb"
    f = ingest([log], db).files[0]
    assert (f.rows_ok, f.rows_rejected) == (2, 2)
    assert _rejected(db) == [(2, "malformed JSON"), (4, "missing required field: user_id")]


@pytest.mark.parametrize("name,content,message", [
    ("missing.jsonl", None, r"missing\.jsonl: no such file"),
    ("empty.jsonl", b"", r"empty\.jsonl: empty file \(0 bytes\), nothing to ingest"),
    ("blank.jsonl", b"\n  \n\n", r"blank\.jsonl: only whitespace, nothing to ingest"),
    ("garbage.jsonl", bytes(range(256)) * 64, r"garbage\.jsonl: binary data \(a NUL byte at offset 0\)"),
    ("latin1.csv", "user_id,ts\nJos\xe9,1\n".encode("latin-1"), r"latin1\.csv: not UTF-8 text \(invalid byte at offset 14\)"),
    ("fake.parquet", b"not parquet at all", r"fake\.parquet: not a Parquet file"),
])
def test_unreadable_files_get_a_clear_message_and_the_others_still_go_in(tmp_path: Path, name: str,
                                                                         content: bytes | None, message: str):
    bad = tmp_path / name
    if content is not None:
        bad.write_bytes(content)
    good = write_jsonl(tmp_path / "good.jsonl", [rec(i) for i in range(3)])
    report = ingest([bad, good], tmp_path / "s.duckdb")
    assert report.files[0].error is not None
    assert pytest.approx(0) == report.files[0].rows_ok
    import re
    assert re.search(message, report.files[0].error), report.files[0].error
    assert (report.files[1].error, report.files[1].rows_ok) == (None, 3)
    assert report.anything_read


def test_a_directory_is_refused(tmp_path: Path):
    report = ingest([tmp_path], tmp_path / "s.duckdb")
    assert "is a directory" in report.files[0].error and not report.anything_read


# ------------------------------------------------------------------------------------------- idempotence


def test_reingest_adds_nothing_and_overlap_adds_only_new_events(tmp_path: Path):
    db = tmp_path / "s.duckdb"
    a = write_jsonl(tmp_path / "a.jsonl", [rec(i) for i in range(100)])
    assert ingest([a], db).files[0].rows_ok == 100
    again = ingest([a], db).files[0]
    assert (again.rows_ok, again.rows_duplicate) == (0, 100) and "already ingested as batch 1" in again.note
    forced = ingest([a], db, force=True).files[0]  # really re-read: stable ids make it add nothing
    assert (forced.rows_ok, forced.rows_duplicate, forced.rows_rejected) == (0, 100, 0)
    b = write_jsonl(tmp_path / "b.jsonl", [rec(i) for i in range(50, 150)])
    over = ingest([b], db).files[0]
    assert (over.rows_ok, over.rows_duplicate) == (50, 50)
    assert _stored_ids(db) == sorted(f"e{i}" for i in range(150))


def test_records_without_ids_get_the_same_id_from_any_format_and_timestamp_form(tmp_path: Path):
    db = tmp_path / "s.duckdb"
    rows = [rec(i, event_id=None) for i in range(20)]
    ingest([write_jsonl(tmp_path / "a.jsonl", rows)], db)
    # the same events as CSV, with epoch-second timestamps instead of ISO-8601
    csv = pl.DataFrame(rows).with_columns(
        pl.col("ts").str.to_datetime("%Y-%m-%dT%H:%M:%SZ", time_zone="UTC").dt.epoch("s").cast(pl.Utf8))
    csv.write_csv(tmp_path / "b.csv")
    f = ingest([tmp_path / "b.csv"], db).files[0]
    assert (f.format, f.rows_ok, f.rows_duplicate) == ("csv", 0, 20)
    assert len(_stored_ids(db)) == 20


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_the_same_event_twice_in_one_file_is_stored_once(tmp_path: Path, fmt: str):
    """Records without an id that are the same event get the same id: the second is a duplicate, in a file
    whose other ids are each given once as well (the direct pass must still look for repeats)."""
    db = tmp_path / "s.duckdb"
    records = [rec(i) for i in range(3, 40)] + [rec(1), rec(2), rec(1), rec(1, event_id=None), rec(1, event_id=None)]
    log = write_jsonl(tmp_path / "a.jsonl", records)
    if fmt == "parquet":
        log = tmp_path / "a.parquet"
        pl.DataFrame(records).write_parquet(log)
    f = ingest([log], db).files[0]
    assert (f.rows_ok, f.rows_duplicate) == (37 + 3, 2)
    assert len(_stored_ids(db)) == 40


# ------------------------------------------------------------------------------------------- other formats


def test_csv_rows_that_break_csv_rules_are_rejected_with_their_lines(tmp_path: Path):
    log = tmp_path / "log.csv"
    log.write_text(
        "event_id,ts,user_id,segment,example_id,domain,prompt,event,value\n"
        'a,2024-03-01T10:00:00Z,u1,pro,x1,billing,"Hi, there",click,\n'
        "b,2024-03-01T10:00:01Z,u2,pro,x1,billing,q,click,1,EXTRA\n"
        "c,2024-03-01T10:00:02Z,u3,pro\n"
        "d,2024-03-01T10:00:03Z,,pro,x1,billing,q,click,\n"
        "e,2024-03-01T10:00:04Z,u5,free,x2,cards,q2,thumbs_down,\n"
    )
    db = tmp_path / "s.duckdb"
    f = ingest([log], db).files[0]
    assert (f.format, f.rows_ok, f.rows_rejected) == ("csv", 2, 3)
    rejected = _rejected(db)
    assert [line for line, _ in rejected] == [3, 4, 5]
    assert rejected[0][1].startswith("malformed CSV: too many columns")
    assert rejected[1][1].startswith("malformed CSV: missing columns")
    assert rejected[2][1] == "missing required field: user_id"
    assert _stored_ids(db) == ["a", "e"]


def test_parquet_with_typed_columns(tmp_path: Path):
    df = pl.DataFrame({
        "event_id": ["p1", "p2", "p3"], "user_id": ["u1", None, "u3"], "segment": ["pro", "pro", "free"],
        "ts": [dt.datetime(2024, 3, 1, 9), dt.datetime(2024, 3, 1, 10), dt.datetime(2024, 3, 1, 11)],
        "example_id": ["x1", "x1", "x2"], "domain": ["billing", "billing", "cards"], "prompt": ["a", "a", "b"],
        "event": ["rating", "click", "rating"], "value": [5.0, None, 1.0],
    })
    df.write_parquet(tmp_path / "log.parquet")
    db = tmp_path / "s.duckdb"
    f = ingest([tmp_path / "log.parquet"], db).files[0]
    assert (f.format, f.rows_ok, f.rows_rejected) == ("parquet", 2, 1)
    assert _rejected(db) == [(2, "missing required field: user_id")]
    with Store.open(db, read_only=True) as s:
        assert s.sql("SELECT event_id, ts, value FROM events ORDER BY event_id").rows() == [
            ("p1", dt.datetime(2024, 3, 1, 9), 5.0), ("p3", dt.datetime(2024, 3, 1, 11), 1.0)]


def _chat(i: int, **kw: object) -> dict[str, object]:
    r: dict[str, object] = {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Question {i}"},
                     {"role": "assistant", "content": f"Answer {i}"}],
        "user_id": f"u{i}", "segment": "pro", "domain": "cards", "ts": f"2024-03-01T10:00:{i:02d}Z",
        "event_id": f"c{i}", "reference": f"Ref {i}",
    }
    r.update(kw)
    return {k: v for k, v in r.items() if v is not None}


def test_chat_records_map_onto_the_flat_log(tmp_path: Path):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]},
             {"role": "assistant", "content": "Hi"}]
    records = [
        _chat(1, feedback="up"), _chat(2, feedback=False), _chat(3, feedback=4), _chat(4),
        _chat(5, feedback="up", event="escalate"), _chat(6, messages=parts, feedback="thumbs_down"),
        _chat(7, messages=None), _chat(8, messages="hi"), _chat(9, messages=[{"role": "assistant", "content": "x"}]),
        _chat(10, feedback="meh"),
    ]
    db = tmp_path / "s.duckdb"
    f = ingest([write_jsonl(tmp_path / "chats.jsonl", records)], db).files[0]
    assert (f.format, f.rows_ok, f.rows_rejected) == ("chat", 6, 4)  # auto-detected from "messages"
    assert _rejected(db) == [
        (7, "missing required field: messages"),
        (8, "wrong type: messages is a JSON string, expected a list of {role, content}"),
        (9, "missing required field: messages has no user turn"),
        (10, "unknown event type: meh"),
    ]
    with Store.open(db, read_only=True) as s:
        ev = {r["event_id"]: r for r in s.sql(
            "SELECT e.event_id, e.event, e.value, e.response, x.prompt, x.reference FROM events e JOIN examples x "
            "USING (example_id)").to_dicts()}
    assert {k: v["event"] for k, v in ev.items()} == {
        "c1": "thumbs_up", "c2": "thumbs_down", "c3": "rating", "c4": "impression", "c5": "escalate", "c6": "thumbs_down"}
    assert ev["c3"]["value"] == 4.0 and ev["c1"]["value"] is None
    assert (ev["c1"]["prompt"], ev["c1"]["response"], ev["c1"]["reference"]) == ("Question 1", "Answer 1", "Ref 1")
    assert ev["c6"]["prompt"] == "Hello\nthere"


def test_review_csv_becomes_review_events(tmp_path: Path):
    review = tmp_path / "review.csv"
    review.write_text(
        "review_id,example_id,segment,domain,model,prompt,reference,response,rating,reviewer,comment\n"
        "r1,x1,pro,cards,runs/r1,Block my card,Use the app,Call us,4,alice,ok\n"
        "r2,x2,free,billing,runs/r1,Refund?,Refunds take 5 days,Soon,,,\n"
        "r3,x3,free,billing,runs/r1,Fees?,No fees,Some,great,bob,\n"
        "r4,x4,free,billing,runs/r1,Limit?,1000,500,9,bob,\n"
        "r5,x5,pro,cards,base,PIN?,In settings,Dunno,2,,bad\n"
    )
    when = dt.datetime(2024, 5, 1, 12, 0, tzinfo=UTC).timestamp()
    os.utime(review, (when, when))
    db = tmp_path / "s.duckdb"
    f = ingest([review], db).files[0]
    assert (f.format, f.rows_ok, f.rows_rejected, f.rows_skipped) == ("review", 2, 2, 1)
    assert _rejected(db) == [(4, "wrong type: value is not a number: great"), (5, "rating out of range: 9 (expected 1-5)")]
    with Store.open(db, read_only=True) as s:
        rows = s.sql("SELECT user_id, ts, event, value, example_id, segment, domain, model_version, response "
                     "FROM events ORDER BY example_id").rows()
        assert s.sql("SELECT rows_skipped FROM batches").item() == 1
        assert s.sql("SELECT prompt, reference FROM examples WHERE example_id = 'x1'").row(0) == ("Block my card", "Use the app")
    stamp = dt.datetime(2024, 5, 1, 12, 0)
    assert rows == [("alice", stamp, "review", 4.0, "x1", "pro", "cards", "runs/r1", "Call us"),
                    ("reviewer", stamp, "review", 2.0, "x5", "pro", "cards", "base", "Dunno")]
    # the review's id does not depend on when the file was touched: re-reading it adds nothing
    os.utime(review, (when + 3600, when + 3600))
    again = ingest([review], db, fmt="review", force=True).files[0]
    assert (again.rows_ok, again.rows_duplicate) == (0, 2)


def test_review_reviewed_at_column_sets_the_time(tmp_path: Path):
    review = tmp_path / "review.csv"
    review.write_text("review_id,example_id,domain,prompt,rating,reviewer,reviewed_at\n"
                      "r1,x1,cards,Q,5,alice,2024-06-02T08:30:00Z\n")
    db = tmp_path / "s.duckdb"
    assert ingest([review], db, fmt="review").files[0].rows_ok == 1
    with Store.open(db, read_only=True) as s:
        assert s.sql("SELECT ts FROM events").item() == dt.datetime(2024, 6, 2, 8, 30)


def test_json_schema_and_ingest_agree_on_single_records(tmp_path: Path):
    """A record the schema accepts is stored; one ingest rejects on its own, the schema refuses too."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(__file__).resolve().parents[1] / "interactions" / "schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    cross_record = ("missing required field: domain (", "missing required field: prompt (")
    checked = 0
    for record, reason in BAD_JSONL:
        if not isinstance(record, dict) or (reason or "").startswith(cross_record):
            continue
        valid = validator.is_valid(record)
        assert not (valid and reason), f"schema accepts what ingest rejects ({reason}): {str(record)[:80]}"
        assert valid or reason or record["event"] != record["event"].strip().lower(), str(record)[:80]
        checked += 1
    assert checked == 19


def test_the_sample_log_ingests_completely(tmp_path: Path):
    sample = Path(__file__).resolve().parents[1] / "interactions" / "sample.jsonl"
    n = sum(1 for line in sample.read_text().splitlines() if line.strip())
    f = ingest([sample], tmp_path / "s.duckdb").files[0]
    assert (f.error, f.rows_ok, f.rows_rejected) == (None, n, 0)


def test_gzipped_jsonl_and_tsv_are_read(tmp_path: Path):
    import gzip

    records = [rec(i) for i in range(5)] + ["{broken"]
    gz = tmp_path / "log.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    tsv = tmp_path / "log.tsv"
    pl.DataFrame([rec(i) for i in range(5, 8)]).write_csv(tsv, separator="\t")
    db = tmp_path / "s.duckdb"
    a, b = ingest([gz, tsv], db).files
    assert (a.format, a.rows_ok, a.rows_rejected, b.format, b.rows_ok) == ("jsonl", 5, 1, "csv", 3)
    assert _rejected(db) == [(6, "malformed JSON")]


@pytest.mark.parametrize("variant", ["clean", "blank line", "bracket text"])
def test_well_formed_json_with_bad_values_keeps_exact_lines_and_raw_text(tmp_path: Path, variant: str,
                                                                         monkeypatch: pytest.MonkeyPatch):
    """JSON goes through DuckDB's JSON reader, and only the lines it rejected or may have misread (a text value
    starting with '[', which it cannot tell from an array) are read again line by line from their raw text; a
    blank line (which that reader skips, so its numbering is off) sends the whole file line by line. Same
    results either way."""
    import adaptive_ft.store.load as load_mod

    lines = [json.dumps(rec(1)), json.dumps(rec(2, user_id=None)), json.dumps(rec(3, event="buy")),
             json.dumps(rec(4, prompt="[URGENT] card blocked" if variant == "bracket text" else "card blocked"))]
    if variant == "blank line":
        lines.insert(1, "")
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(lines))  # no newline at the end of the last line
    reads: list[list[int] | str] = []
    real_reader = load_mod.jsonl_reader

    def reader(src, lines=None, rejects=None):
        reads.append("whole file" if lines is None else "lines")
        return real_reader(src, lines, rejects)

    monkeypatch.setattr(load_mod, "jsonl_reader", reader)
    staged = _watch_stage(monkeypatch)
    db = tmp_path / "s.duckdb"
    f = ingest([log], db).files[0]
    assert (f.rows_ok, f.rows_rejected) == (2, 2)
    assert reads == {"clean": ["lines"], "blank line": ["whole file"], "bracket text": ["lines"]}[variant]
    assert staged == {"clean": [[2, 3]], "blank line": [[1, 3, 4, 5]], "bracket text": [[2, 3, 4]]}[variant]
    off = int(variant == "blank line")
    with Store.open(db, read_only=True) as s:
        assert s.sql("SELECT line, raw, reason FROM rejected ORDER BY line").rows() == [
            (2 + off, lines[1 + off], "missing required field: user_id"),
            (3 + off, lines[2 + off], "unknown event type: buy")]
        assert s.sql("SELECT prompt FROM examples WHERE example_id = 'x4'").item() == json.loads(lines[-1])["prompt"]


def _watch_stage(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The lines staged (settled the careful way) by each batch, as ingest settles them."""
    import adaptive_ft.store.load as load_mod

    seen: list[list[int]] = []
    settle = load_mod._settle

    def watch(con, *a, **k):
        seen.append([n for (n,) in con.execute("SELECT line FROM _stage ORDER BY line").fetchall()])
        return settle(con, *a, **k)

    monkeypatch.setattr(load_mod, "_settle", watch)
    return seen


def test_missing_example_id_is_the_same_stable_id_simulate_gives(tmp_path):
    """Regression: the store hashed prompts with md5 while simulate used sha256, so one prompt got two ids."""
    import json

    from adaptive_ft.simulate import example_id_for
    from adaptive_ft.store import Store, ingest

    prompt = "  Where is my\tCARD?\n"
    log = tmp_path / "one.jsonl"
    log.write_text(json.dumps({"ts": "2025-01-01T00:00:00Z", "user_id": "u1", "domain": "cards",
                               "prompt": prompt, "event": "impression"}) + "\n")
    ingest([log], store=tmp_path / "s.duckdb")
    with Store.open(tmp_path / "s.duckdb", read_only=True) as s:
        assert s.examples()["example_id"].to_list() == [example_id_for(prompt)]


# ------------------------------------------------------------------------------------------- fast and careful paths


def _contents(db: Path, order: str = "event_id", rejected: str | None = None) -> tuple[list, ...]:
    """events (by ``order``), examples and users without their batch ids; and, given a WHERE condition as
    ``rejected``, the (line, reason) of those rejections."""
    with Store.open(db, read_only=True) as s:
        tables = [
            s.sql(f"SELECT * EXCLUDE (batch_id) FROM events ORDER BY {order}").rows(),
            s.sql("SELECT * EXCLUDE (first_batch) FROM examples ORDER BY example_id").rows(),
            s.sql("SELECT * FROM users ORDER BY user_id").rows(),
        ]
        if rejected is not None:
            tables.append(s.sql(f"SELECT line, reason FROM rejected WHERE {rejected} ORDER BY line").rows())
        return tuple(tables)


def test_a_clean_file_takes_the_fast_path_and_stores_what_the_careful_path_stores(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    staged = _watch_stage(monkeypatch)
    good = [
        rec(0), rec(1, event_id=None), rec(2, ts=1709287211), rec(3, ts="2024-03-01T12:00:00+02:00"),
        rec(4, event=" Thumbs_Up ", reference="ref 4"), rec(5, event="rating", value=4),
        rec(6, event_id=None, event="rating", value=2.5), rec(7, example_id=None, prompt="  Question   FIVE "),
        rec(8, ts="2024-03-01 10:00:08"), rec(9, segment=None), rec(10, response="an answer", model_version="m2"),
    ]
    fast = write_jsonl(tmp_path / "fast.jsonl", good)
    slow = write_jsonl(tmp_path / "slow.jsonl", good + ["{broken"])
    blank = write_jsonl(tmp_path / "blank.jsonl", good[:5] + [""] + good[5:] + ["{broken"])  # staged whole
    pq = tmp_path / "fast.parquet"  # the same records, every field as text (the JSON reader reads them so)
    pl.DataFrame([{k: str(v) for k, v in r.items()} for r in good]).write_parquet(pq)
    stores = {}
    for log in (fast, slow, blank, pq):
        f = ingest([log], tmp_path / f"{log.name}.duckdb").files[0]
        assert (f.rows_ok, f.rows_duplicate, f.rows_rejected) == (len(good), 0, log in (slow, blank))
        stores[log.name] = _contents(tmp_path / f"{log.name}.duckdb")
    # the clean files are never staged; one bad line stages that line only; a blank line stages every line
    assert staged == [[len(good) + 1], [i for i in range(1, len(good) + 3) if i != 6]]
    lines = [e[-1] for e in stores["slow.jsonl"][0]]
    assert sorted(lines) == list(range(1, len(good) + 1))  # every event knows its line
    blank_events = [e[:-1] + (e[-1] - (e[-1] > 6),) for e in stores["blank.jsonl"][0]]  # lines after the blank one
    assert stores["fast.jsonl"] == stores["slow.jsonl"] == stores["fast.parquet"] == (blank_events, *stores["blank.jsonl"][1:])
    assert len(stores["fast.jsonl"][0]) == len(good)


@pytest.mark.parametrize("extra", ["", "\n", "dup", "stored"])
def test_what_the_fast_path_cannot_take_goes_the_careful_way(tmp_path: Path, extra: str):
    db = tmp_path / "s.duckdb"
    ingest([write_jsonl(tmp_path / "old.jsonl", [rec(100)])], db)
    records = [rec(i) for i in range(10)] + {"dup": [rec(3)], "stored": [rec(100)]}.get(extra, [])
    log = write_jsonl(tmp_path / "a.jsonl", records)
    if extra == "\n":  # a blank line in the middle: not a record, and the lines after it keep their numbers
        log.write_text(log.read_text().replace("\n", "\n\n", 1))
    f = ingest([log], db).files[0]
    assert (f.rows_ok, f.rows_duplicate, f.rows_rejected) == (10, len(records) - 10, 0)
    assert _stored_ids(db) == sorted([f"e{i}" for i in range(10)] + ["e100"])


# ------------------------------------------------------------------------------------------- what the careful pass sees


def _mixed_records(n: int = 200) -> tuple[list, set[int]]:
    """n lines: two bad records, an identical and a conflicting repeat, and the lines the careful pass must see
    (the bad ones, both copies of each repeated id), given a store that holds e150..e154 (e152 different)."""
    lines: list = [rec(i) for i in range(n)]
    lines[16] = rec(16, event="purchase")        # line 17: rejected
    lines[89] = rec(89, user_id=None)             # line 90: rejected
    lines[49] = rec(10)                           # line 50: e10 again, identical: a duplicate
    lines[119] = rec(30, value=3, event="rating")  # line 120: e30 again, different: rejected
    return lines, {17, 90, 11, 50, 31, 120, 151, 152, 153, 154, 155}


def _store_with_overlap(db: Path, tmp_path: Path) -> None:
    old = [rec(i) for i in range(150, 155)]
    old[2] = rec(152, segment="enterprise")  # the file's e152 differs from the stored one
    ingest([write_jsonl(tmp_path / "old.jsonl", old)], db)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_the_careful_pass_stages_only_the_lines_the_direct_pass_could_not_take(
        tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch):
    """Bad records, repeated ids and ids already stored are staged; nothing else is, and the result is exactly
    what staging the whole file gives (the same file with a blank line, which the direct path cannot number)."""
    lines, expected_staged = _mixed_records()
    log = write_jsonl(tmp_path / "log.jsonl", lines)
    if fmt == "parquet":
        pl.DataFrame([{k: (str(v) if v is not None else None) for k, v in r.items()} for r in lines],
                     schema={f: pl.Utf8 for f in ("event_id", "ts", "user_id", "segment", "example_id", "domain",
                                                   "prompt", "event", "value")}).write_parquet(tmp_path / "log.parquet")
        log = tmp_path / "log.parquet"
    whole = write_jsonl(tmp_path / "whole.jsonl", [*lines, ""])  # trailing blank line: staged whole
    staged = _watch_stage(monkeypatch)
    results = {}
    for name, path in (("direct", log), ("whole", whole)):
        db = tmp_path / f"{name}.duckdb"
        _store_with_overlap(db, tmp_path)
        f = ingest([path], db).files[0]
        assert (f.rows_ok, f.rows_duplicate, f.rows_rejected) == (200 - 5 - 2 - 4 + 4 - 2, 5 - 1 + 1, 2 + 1 + 1)
        results[name] = _contents(db, rejected="batch_id = 2")
    assert set(staged[0]) == expected_staged and len(staged[0]) == len(expected_staged)  # (old.jsonl: clean)
    assert len(staged[1]) == 201 - 1  # the whole file (less the blank line)
    assert results["direct"] == results["whole"]
    assert results["direct"][3] == [
        (17, "unknown event type: purchase"), (90, "missing required field: user_id"),
        (120, "conflicting duplicate: event_id e30 appears on line 31 of this file with a different event"),
        (153, "conflicting duplicate: event_id e152 is already stored (batch 1) with a different segment"),
    ]
    # --force: every record is already stored, each settled once (a duplicate), none rolled back and read again
    again = ingest([log], tmp_path / "direct.duckdb", force=True).files[0]
    assert (again.rows_ok, again.rows_duplicate, again.rows_rejected, again.rejected_known) == (0, 196, 4, 4)
    assert len(staged) == 3 and len(staged[2]) == 200


def test_conflicting_duplicate_is_rejected_and_leaves_no_user_or_example(tmp_path: Path):
    db = tmp_path / "s.duckdb"
    ingest([write_jsonl(tmp_path / "a.jsonl", [rec(1), rec(2)])], db)
    again = [rec(1), rec(2, user_id="u_new", example_id="x_new", prompt="new question"), rec(3),
             rec(3, user_id="u_other", example_id="x_other", prompt="other question")]
    f = ingest([write_jsonl(tmp_path / "b.jsonl", again)], db).files[0]
    assert (f.rows_ok, f.rows_duplicate, f.rows_rejected) == (1, 1, 2)
    assert _rejected(db)[-2:] == [
        (2, "conflicting duplicate: event_id e2 is already stored (batch 1) with a different user_id"),
        (4, "conflicting duplicate: event_id e3 appears on line 3 of this file with a different user_id"),
    ]
    with Store.open(db, read_only=True) as s:
        users = set(s.sql("SELECT user_id FROM users")["user_id"])
        examples = set(s.sql("SELECT example_id FROM examples")["example_id"])
        stored = s.sql("SELECT user_id, example_id FROM events WHERE event_id = 'e2'").rows()
    assert "u_new" not in users and "u_other" not in users and not {"x_new", "x_other"} & examples
    assert stored == [("u2", "x2")]  # the first one stays


def test_one_bad_utf8_byte_deep_in_a_file_rejects_that_line_only(tmp_path: Path):
    n = 3000  # the bad byte lies past the 64 KiB the format check looks at
    body = [json.dumps(rec(i)).encode() for i in range(n)]
    body[2500] = json.dumps(rec(2500, prompt="caf_")).encode().replace(b"caf_", b"caf\xff")
    log = tmp_path / "log.jsonl"
    log.write_bytes(b"\n".join(body) + b"\n")
    db = tmp_path / "s.duckdb"
    f = ingest([log], db).files[0]
    assert (f.error, f.rows_ok, f.rows_rejected) == (None, n - 1, 1)
    with Store.open(db, read_only=True) as s:
        line, raw, reason = s.sql("SELECT line, raw, reason FROM rejected").row(0)
    column = body[2500].index(bytes([0xFF])) + 1
    assert (line, reason) == (2501, f"invalid UTF-8 (byte 0xff at column {column})")
    assert "caf\\xff" in raw


def test_nan_and_infinite_values_are_rejected(tmp_path: Path):
    lines = [json.dumps(rec(0, event="rating", value=4)),
             json.dumps(rec(1, event="rating")).replace('"rating"}', '"rating", "value": NaN}'),
             json.dumps(rec(2, event="rating")).replace('"rating"}', '"rating", "value": 1e400}'),
             json.dumps(rec(3, event="rating")).replace('"rating"}', '"rating", "value": -Infinity}'),
             json.dumps(rec(4, event="rating", value="inf"))]
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(lines) + "\n")
    pq = tmp_path / "log.parquet"
    pl.DataFrame([rec(i, event="rating") for i in range(5, 8)]).with_columns(
        value=pl.Series([2.0, float("nan"), float("inf")])).write_parquet(pq)
    db = tmp_path / "s.duckdb"
    a, b = ingest([log, pq], db).files
    assert (a.rows_ok, a.rows_rejected, b.rows_ok, b.rows_rejected) == (1, 4, 1, 2)
    reasons = _rejected(db)
    assert [line for line, _ in reasons] == [2, 3, 4, 5, 2, 3]
    assert all(r.startswith("wrong type: value is not a finite number: ") for _, r in reasons), reasons
    with Store.open(db, read_only=True) as s:
        assert sorted(s.sql("SELECT value FROM events")["value"]) == [2.0, 4.0]


def test_parquet_nested_columns_are_the_wrong_type_as_in_jsonl(tmp_path: Path):
    rows = [rec(i) for i in range(3)]
    pq = tmp_path / "nested.parquet"
    pl.DataFrame(rows).with_columns(user_id=pl.Series([{"id": 0}, {"id": 1}, None]),
                                    domain=pl.Series([["a"], ["b"], ["c"]])).write_parquet(pq)
    js = write_jsonl(tmp_path / "nested.jsonl", [rec(0, user_id={"id": 0}), rec(1, domain=["b"])])
    db = tmp_path / "s.duckdb"
    p, j = ingest([pq, js], db).files
    assert (p.rows_ok, p.rows_rejected, j.rows_ok, j.rows_rejected) == (0, 3, 0, 2)
    assert _rejected(db) == [
        (1, "wrong type: user_id is a Parquet struct (STRUCT(id BIGINT)), expected a string"),
        (2, "wrong type: user_id is a Parquet struct (STRUCT(id BIGINT)), expected a string"),
        (3, "wrong type: domain is a Parquet list (VARCHAR[]), expected a string"),
        (1, "wrong type: user_id is a JSON object, expected a string"),
        (2, "wrong type: domain is a JSON array, expected a string"),
    ]
    with Store.open(db, read_only=True) as s:
        assert s.sql("SELECT count(*) FROM events").item() == 0


def test_reingesting_a_fixed_file_adds_only_new_rejections(tmp_path: Path):
    db = tmp_path / "s.duckdb"
    log = tmp_path / "log.jsonl"
    bad = [rec(i, event="purchase") for i in range(5)]
    write_jsonl(log, bad)
    first = ingest([log], db).files[0]
    assert (first.rows_ok, first.rows_rejected) == (0, 5)
    write_jsonl(log, [rec(0)] + bad[1:] + [rec(9, user_id=None)])  # one fixed, one new bad record
    second = ingest([log], db).files[0]
    assert (second.rows_ok, second.rows_rejected, second.rejected_known) == (1, 5, 4)
    assert len(_rejected(db)) == 6


def test_a_failed_ingest_leaves_no_store_behind(tmp_path: Path):
    db = tmp_path / "new.duckdb"
    report = ingest([tmp_path / "nope.jsonl"], db)
    assert report.files[0].error and not db.exists() and not Path(f"{db}.wal").exists()
    ingest([write_jsonl(tmp_path / "a.jsonl", [rec(1)])], db)
    ingest([tmp_path / "nope.jsonl"], db)  # a store that was there stays
    assert db.exists()


@pytest.mark.parametrize("kind", ["blank line", "gzip", "csv"])
def test_a_bad_utf8_byte_rejects_that_line_in_files_staged_whole_too(tmp_path: Path, kind: str):
    """Files the direct path does not take (a blank line, gzip, CSV) are read line by line by DuckDB; a line that
    is not UTF-8 is still one rejected record, and the lines after it keep their numbers."""
    import gzip

    n = 3000
    if kind == "csv":
        body = [b"event_id,ts,user_id,segment,example_id,domain,prompt,event"]
        body += [",".join(str(rec(i)[k]) for k in ("event_id", "ts", "user_id", "segment", "example_id", "domain",
                                                     "prompt", "event")).encode() for i in range(n)]
    else:
        body = [json.dumps(rec(i)).encode() for i in range(n)]
    bad = 2500 + (kind == "csv")  # the record rec(2500) in both
    body[bad] = body[bad].replace(b"question", b"quest\xffion")
    if kind == "blank line":
        body.insert(10, b"")
    data = b"\n".join(body) + b"\n"
    log = tmp_path / {"blank line": "log.jsonl", "gzip": "log.jsonl.gz", "csv": "log.csv"}[kind]
    log.write_bytes(gzip.compress(data) if kind == "gzip" else data)
    db = tmp_path / "s.duckdb"
    f = ingest([log], db).files[0]
    assert (f.error, f.rows_ok, f.rows_rejected) == (None, n - 1, 1)
    (line, reason), = _rejected(db)
    assert line == bad + 1 + (kind == "blank line") and reason.startswith("invalid UTF-8"), (line, reason)
    with Store.open(db, read_only=True) as s:  # the record after the bad one is stored with its own line
        assert s.sql("SELECT line FROM events WHERE event_id = 'e2501'").item() == line + 1


def _watch_wide_pass(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """How each direct pass numbers its records: the ``line`` expression of the reader it is built from."""
    import adaptive_ft.store.load as load_mod

    seen: list[str] = []
    rows_sql = load_mod._rows_sql

    def watch(r, cfg):
        seen.append(r.line)
        return rows_sql(r, cfg)

    monkeypatch.setattr(load_mod, "_rows_sql", watch)
    return seen


def test_jsonl_lines_come_from_ids_the_file_gives_once_and_the_wide_pass_is_not_numbered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The JSONL wide pass runs unnumbered (every thread) and takes each record's line from the numbered
    id pre-pass. Lines without an id of their own (none, given twice, or an id equal to the one a record
    without an id is given) are staged; the store equals what staging the whole file gives, lines included."""
    scratch = tmp_path / "scratch.duckdb"
    ingest([write_jsonl(tmp_path / "one.jsonl", [rec(30, event_id=None, user_id="u-late")])], scratch)
    with Store.open(scratch, read_only=True) as s:
        derived = s.sql("SELECT event_id FROM events").item()  # the id line 31 below is given (md5 of its content)
    lines: list = [rec(i) for i in range(60)]
    lines[5] = rec(5, user_id="u-early", event_id=derived)  # line 6 gives the id line 31 is derived to: a conflict
    lines[30] = rec(30, event_id=None, user_id="u-late")
    lines[40] = rec(40, event_id=None, example_id="x_only", prompt="asked once", domain="cards")  # kept, staged
    lines[44] = rec(44, event="purchase", example_id="x_bad", prompt="never kept")  # rejected: no example from it
    lines[50] = rec(7)  # e7 again, identical: a duplicate
    log = write_jsonl(tmp_path / "log.jsonl", lines)
    whole = write_jsonl(tmp_path / "whole.jsonl", [*lines, ""])  # trailing blank line: staged whole
    wide = _watch_wide_pass(monkeypatch)
    results = {}
    for name, path in (("direct", log), ("whole", whole)):
        db = tmp_path / f"{name}.duckdb"
        f = ingest([path], db).files[0]
        assert (f.rows_ok, f.rows_duplicate, f.rows_rejected) == (57, 1, 2)
        results[name] = _contents(db, order="line", rejected="true")
    assert wide[0] == "NULL::BIGINT"  # the direct pass over log.jsonl: not numbered
    assert results["direct"] == results["whole"]
    events, examples, _, rejected = results["direct"]
    assert [e[-1] for e in events] == [n for n in range(1, 61) if n not in (31, 45, 51)]
    assert all(e[0] == f"e{e[-1] - 1}" for e in events if e[-1] not in (6, 41))
    assert "x_only" in [x[0] for x in examples] and "x_bad" not in [x[0] for x in examples]
    assert rejected == [(31, f"conflicting duplicate: event_id {derived} appears on line 6 of this file with a different ts"),
                        (45, "unknown event type: purchase")]
    # a file whose records give no ids is numbered in the wide pass itself
    wide.clear()
    ingest([write_jsonl(tmp_path / "noids.jsonl", [rec(i, event_id=None) for i in range(20)])], tmp_path / "n.duckdb")
    assert wide[0] == "row_number() OVER ()"


def _plans_of_by_id_pass(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The plan DuckDB makes for each by-id direct pass (``EXPLAIN (FORMAT JSON)`` of the very statement,
    with its parameters, run just before it)."""
    import adaptive_ft.store.db as db_mod

    plans: list[dict] = []

    class Watch:
        def __init__(self, con):
            self._con = con

        def execute(self, sql, *args):
            if sql.lstrip().startswith("INSERT INTO events") and "JOIN _uni" in sql:
                plans.append(json.loads(self._con.execute("EXPLAIN (FORMAT JSON) " + sql, *args).fetchall()[0][1])[0])
            return self._con.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self._con, name)

    init = db_mod.Store.__init__

    def watched(self, con, path, read_only):
        init(self, con, path, read_only)
        self.con = Watch(con)

    monkeypatch.setattr(db_mod.Store, "__init__", watched)
    return plans


def _scans(node: dict) -> list[str]:
    """The table and table-function scans under a plan node."""
    info = node.get("extra_info", {})
    own = [str(info.get("Table") or info.get("Function"))] if "SCAN" in node.get("name", "") or "READ" in node.get(
        "name", "") else []
    return own + [s for c in node.get("children", []) for s in _scans(c)]


def _hash_joins(node: dict) -> list[dict]:
    own = [node] if node.get("name", "").strip() == "HASH_JOIN" else []
    return own + [j for c in node.get("children", []) for j in _hash_joins(c)]


def test_the_by_id_join_builds_its_hash_table_from_the_ids_not_from_the_files_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """DuckDB estimates a JSON scan at a few dozen rows; left to itself it builds the by-id join's hash
    table from the file's wide records (a 5M-line file: past the memory limit, spilled) instead of the
    narrow id table. The pass keeps the id table as the build side, and the store is what it was."""
    plans = _plans_of_by_id_pass(monkeypatch)
    db = tmp_path / "s.duckdb"
    first = write_jsonl(tmp_path / "first.jsonl", [rec(i) for i in range(400)])
    overlap = write_jsonl(tmp_path / "overlap.jsonl", [rec(i) for i in range(300, 700)])  # into a non-empty store
    assert [ingest([p], db).files[0].rows_ok for p in (first, overlap)] == [400, 300]
    assert len(plans) == 2
    for plan in plans:
        by_id = [j for j in _hash_joins(plan) if j.get("extra_info", {}).get("Join Type") == "INNER"]
        (join,) = by_id
        probe, build = join["children"]
        assert _scans(build) == ['"temp".main._uni'] and "READ_JSON" in _scans(probe)
    events, *_ = _contents(db, order="batch_id, line")
    assert [e[0] for e in events] == [f"e{i}" for i in range(700)]
    assert [e[-1] for e in events] == list(range(1, 401)) + list(range(101, 401))
    with Store.open(db, read_only=True) as s:  # the optimizer is as it was after the pass
        assert s.sql("SELECT current_setting('disabled_optimizers')").item() == ""


def test_read_lines_returns_each_numbered_line_without_its_break(tmp_path: Path):
    """The lines the direct path re-reads are fetched by offset: first, middle and last lines, CRLF, blank
    lines and a last line without a newline come back as the file has them."""
    from adaptive_ft.store.sources import line_index, read_lines

    for data in (b"a\nbb\r\nccc", b"first\n\n\r\nfourth\r\n", b"x", b"\n\nz\n"):
        path = tmp_path / "f.jsonl"
        path.write_bytes(data)
        _, n, newlines = line_index(path)
        want = [line.removesuffix(b"\r") for line in data.split(b"\n")][:n]
        assert read_lines(path, newlines, list(range(1, n + 1))) == want
        assert read_lines(path, newlines, [n, 1]) == [want[-1], want[0]]
    assert read_lines(path, newlines, []) == []
