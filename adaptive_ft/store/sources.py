"""Input files: checking them, telling their format, and the SQL that reads each format in bulk.

Every format is read by a DuckDB reader into rows of the flat log (DESIGN.md) as text columns, plus a
line number, the raw record for the ``rejected`` table, and a format-level reason when the record is
unusable as read (malformed JSON, a field of the wrong JSON type...). Validation common to all formats
lives in :mod:`adaptive_ft.store.load`.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import gzip
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adaptive_ft.errors import InputError

FORMATS = ("auto", "jsonl", "csv", "parquet", "chat", "review")
# Fields of the flat log, in DESIGN.md order. All arrive as text; ts and value are parsed in SQL.
FIELDS = ("event_id", "ts", "user_id", "segment", "example_id", "domain", "prompt", "response",
          "reference", "event", "value", "model_version")
_SHORT = ("event_id", "ts", "user_id", "segment", "example_id", "domain", "event", "value", "model_version")
REVIEW_COLUMNS = ("review_id", "example_id", "segment", "domain", "model", "prompt", "reference",
                  "response", "rating", "reviewer", "comment")
_SNIFF_BYTES = 64 * 1024
_LINE_MAX = 2**31 - 1  # DuckDB's largest max_line_size: a 10 MB line must be read, then rejected as too long
_LINE_MAX_GZ = 2**25  # 32 MiB: for compressed input DuckDB allocates a buffer of max_line_size


@dataclass
class Source:
    """A checked input file and how to read it."""

    path: Path
    format: str
    bytes: int
    columns: list[str] = field(default_factory=list)  # csv / review header, parquet schema names
    types: dict[str, str] = field(default_factory=dict)  # parquet column types
    mtime_iso: str = ""


def q(s: str) -> str:
    """A SQL string literal."""
    return "'" + s.replace("'", "''") + "'"


def ident(name: str) -> str:
    """A SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


# ------------------------------------------------------------------------------------- checking files


def _head(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read(_SNIFF_BYTES)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e})") from None


def file_digest(path: Path) -> tuple[str, int]:
    """sha256 of a file's bytes and its number of lines, in one read.

    hashlib releases the GIL, so this runs in a thread beside a DuckDB query.
    """
    h, lines, last = hashlib.sha256(), 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return h.hexdigest(), lines + (last != b"\n")


def line_index(path: Path) -> tuple[str, int, np.ndarray]:
    """sha256, number of lines, and the byte offset of every newline, in one read.

    The offsets let ingest fetch the few lines it must read again (rejected or conflicting records)
    without another pass over the file. numpy and hashlib release the GIL, so this runs in a thread
    beside a DuckDB query.
    """
    h, parts, pos, last = hashlib.sha256(), [], 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            parts.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + pos)
            pos += len(chunk)
            last = chunk[-1:]
    newlines = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return h.hexdigest(), len(newlines) + (last != b"\n"), newlines


def read_lines(path: Path, newlines: np.ndarray, numbers: list[int]) -> list[bytes]:
    """The bytes of the given 1-based lines (without the line break), using :func:`line_index`'s offsets.

    One ``pread`` per line at its offset (the offsets computed for all lines at once): no seek, and no
    read-ahead buffer filled and thrown away for each short line.
    """
    if not numbers:
        return []
    idx = np.asarray(numbers, dtype=np.int64)
    fd = os.open(path, os.O_RDONLY)
    try:
        # line n runs from just after newline n-1 (the first from 0) to newline n (the last may end the file)
        ends = np.concatenate(([-1], newlines, [os.fstat(fd).st_size])).astype(np.int64)
        out = [os.pread(fd, e - s - 1, s + 1) for s, e in zip(ends[idx - 1].tolist(), ends[idx].tolist())]
    finally:
        os.close(fd)
    return [b[:-1] if b.endswith(b"\r") else b for b in out]


def _utf16(head: bytes) -> str | None:
    """'UTF-16LE'/'UTF-16BE' when the head is UTF-16 text (a byte-order mark, or every other byte NUL)."""
    if head[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        return "UTF-16LE" if head[:2] == codecs.BOM_UTF16_LE else "UTF-16BE"
    sample = head[:512]
    if len(sample) >= 8:
        even, odd = sample[0::2], sample[1::2]
        if odd.count(0) > 0.9 * len(odd) and even.count(0) < 0.1 * len(even):
            return "UTF-16LE"
        if even.count(0) > 0.9 * len(even) and odd.count(0) < 0.1 * len(odd):
            return "UTF-16BE"
    return None


def _check_text(path: Path, head: bytes) -> str:
    """Decode the head of a text file, or explain why it is not one."""
    enc = _utf16(head)
    if enc:
        raise InputError(
            f"{path}: {enc} text, not UTF-8; convert it to UTF-8 first "
            f"(e.g. iconv -f {enc} -t UTF-8 {path.name} > {path.stem}.utf8{path.suffix})"
        )
    nul = head.find(b"\x00")
    if nul >= 0:
        raise InputError(
            f"{path}: binary data (a NUL byte at offset {nul}), not a JSONL/CSV log; "
            "pass Parquet as .parquet or check the file"
        )
    try:  # incremental: a character cut at the end of the head is not an error, any other bad byte is
        return codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < _SNIFF_BYTES)
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (invalid byte at offset {e.start}); re-encode it as UTF-8") from None


def _guess(path: Path, head: bytes, text: str) -> str:
    """Format from the extension, else from the content."""
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    ext = suffixes[-1] if suffixes else ""
    if ext in (".parquet", ".pq") or head[:4] == b"PAR1":
        return "parquet"
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    if ext in (".jsonl", ".ndjson", ".json") or first.lstrip().startswith("{"):
        try:
            return "chat" if "messages" in json.loads(first) else "jsonl"
        except (ValueError, TypeError):
            return "jsonl"  # the first line is malformed: rejected line by line later
    header = set(_header(text))
    return "review" if {"review_id", "rating"} <= header else "csv"


def _header(text: str) -> list[str]:
    first = text.splitlines()[0] if text else ""
    delim = "\t" if "\t" in first and "," not in first else ","
    return [c.strip() for c in next(csv.reader(io.StringIO(first), delimiter=delim), [])]


def check_source(path: str | Path, fmt: str = "auto") -> Source:
    """Check that ``path`` is a readable, non-empty log and settle its format; raise :class:`InputError` if not."""
    path = Path(path)
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; pass the log files inside it (e.g. {path}/*.jsonl)")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path}: empty file (0 bytes), nothing to ingest")
    head = _head(path)
    is_parquet = head[:4] == b"PAR1"
    text = "" if is_parquet or fmt == "parquet" else _check_text(path, head)
    if fmt == "auto":
        fmt = _guess(path, head, text)
    if not text.strip() and fmt != "parquet":
        raise InputError(f"{path}: only whitespace, nothing to ingest")
    if fmt == "parquet" and not is_parquet:
        raise InputError(f"{path}: not a Parquet file (no PAR1 magic); pick --format jsonl or csv")
    mtime = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc)
    src = Source(path, fmt, size, mtime_iso=mtime.isoformat())
    if fmt in ("csv", "review"):
        src.columns = _header(text)
        if not any(src.columns):
            raise InputError(f"{path}: the first line should be a CSV header (e.g. ts,user_id,event,...)")
        first = text.splitlines()[0]
        delim = next((d for d in (";", "|") if d in first and "," not in first and "\t" not in first), None)
        if delim:
            raise InputError(
                f"{path}: the header is separated by {delim!r} ({first[:60]}); adaptive-ft reads comma-separated "
                "CSV (tab-separated as .tsv): write it with ',' as the delimiter"
            )
        if size <= _SNIFF_BYTES and sum(1 for ln in text.splitlines() if ln.strip()) <= 1:
            raise InputError(f"{path}: a CSV header ({first[:60]}) and no records; nothing to ingest")
    return src


# ------------------------------------------------------------------------------------- reading SQL
#
# Each reader yields a relation with: _line (1-based line of the record in the file), _raw (the record's
# text, or a struct turned into JSON for rejected rows only), _r (the record as a struct), plus per field
# a text expression over _r, and a format-level reason (NULL when fine).


@dataclass
class Reader:
    """SQL pieces that read one source into the flat log's text fields."""

    base: str  # FROM item giving _r (the record: a struct, or the reader's own table) and helper columns
    fields: dict[str, str]  # field name -> text expression over the base relation
    pre_reason: str = "NULL"  # format-level reason for rejection
    raw: str = "_raw"  # expression over ``carry`` giving the raw record text (evaluated for rejected rows only)
    carry: dict[str, str] = field(default_factory=lambda: {"_raw": "_raw"})  # name -> base expression raw needs
    ts_parsed: str | None = None  # TIMESTAMP expression when the source is typed (parquet)
    value_parsed: str | None = None  # DOUBLE expression when the source is typed
    skip: str = "false"  # rows dropped and counted as skipped (review rows without a rating)
    line: str = "_line"  # the record's line number in the file
    suspect: str = "false"  # fast JSON path: a value that may have been a JSON object/array (re-read slowly)
    csv_rejects: str | None = None  # DuckDB rejects table of a CSV read (rows that break CSV rules)


def _lines_relation(src: Source, rejects: str | None = None) -> str:
    """The file as (line number, text) rows, one per physical line (LF or CRLF), read in parallel by read_csv.

    A 4-byte delimiter no log line contains and no quoting turn the CSV reader into a line splitter. A line
    that is not UTF-8 goes to the ``rejects`` table (DuckDB's store_rejects) instead of failing the read; the
    rows after it are numbered one short, which :func:`adaptive_ft.store.load._csv_rejects` corrects.
    """
    keep = (f", store_rejects=true, rejects_table={q(rejects)}, rejects_scan={q(rejects + '_scan')}"
            if rejects else "")
    rc = (
        f"read_csv({q(str(src.path))}, columns={{'_raw': 'VARCHAR'}}, delim='\x01\x02\x03\x04', quote='', "
        f"escape='', header=false, auto_detect=false, strict_mode=false, max_line_size={_line_max(src)}{keep})"
    )
    return f"SELECT row_number() OVER () AS _line, _raw, NULL::VARCHAR AS _enc FROM {rc}"


def _line_max(src: Source) -> int:
    """Longest line read: any size from a plain file; from a compressed one DuckDB allocates it up front."""
    return _LINE_MAX_GZ if src.path.suffix.lower() == ".gz" else _LINE_MAX


def _json_struct(keys: dict[str, str]) -> str:
    return q(json.dumps(keys))


def _text(expr: str, short: bool) -> str:
    """Empty text is a missing field. (Not trimmed: trim copies every string, a third of the staging time.)"""
    return f"nullif({expr}, '')"


def json_kind(type_expr: str) -> str:
    """SQL naming a DuckDB json_type() result the way JSON does (string, number, object...)."""
    return (
        f"CASE {type_expr} WHEN 'VARCHAR' THEN 'string' WHEN 'OBJECT' THEN 'object' WHEN 'ARRAY' THEN 'array' "
        f"WHEN 'BOOLEAN' THEN 'boolean' WHEN 'NULL' THEN 'null' ELSE 'number' END"
    )


def _json_type_reason(name: str) -> str:
    """A CASE branch: a string field given as a JSON object or array is the wrong type."""
    jtype = f"json_type(_raw, {q('$.' + name)})"
    return (
        f"WHEN left(_r.{ident(name)}, 1) IN ('{{', '[') AND {jtype} IN ('OBJECT', 'ARRAY') "
        f"THEN 'wrong type: {name} is a JSON ' || {json_kind(jtype)} || ', expected a string'"
    )


def _json_base(src: Source, keys: dict[str, str], lines: str | None = None, rejects: str | None = None) -> str:
    """Lines parsed as JSON objects; a line that is not one keeps _r NULL and gets a reason later.

    ``lines`` is a relation of (_line, _raw, _enc) to read instead of the whole file (``_enc``: a reason
    found before DuckDB saw the text, such as invalid UTF-8).
    """
    # One JSON parse to validate; a valid text starting with '{' is an object (no second parse for json_type).
    # Blank lines are not records; only invalid lines are trimmed to find them (trim copies the string).
    kinds = (
        "SELECT _line, _raw, _enc, CASE WHEN json_valid(_raw) THEN CASE WHEN starts_with(_raw, '{') THEN 'OBJECT' "
        "ELSE json_type(_raw) END WHEN trim(_raw) = '' THEN 'BLANK' ELSE 'INVALID' END AS _kind "
        f"FROM ({lines or _lines_relation(src, rejects)}) WHERE _raw IS NOT NULL"
    )
    return (f"SELECT *, CASE WHEN _kind = 'OBJECT' THEN from_json(_raw, {_json_struct(keys)}) END AS _r "
            f"FROM ({kinds}) WHERE _kind <> 'BLANK'")


def _json_record_reason() -> str:
    return (
        "WHEN _enc IS NOT NULL THEN _enc WHEN _kind = 'INVALID' THEN 'malformed JSON' "
        f"WHEN _kind <> 'OBJECT' THEN 'wrong type: record is a JSON ' || {json_kind('_kind')} || ', expected an object'"
    )


def jsonl_reader(src: Source, lines: str | None = None, rejects: str | None = None) -> Reader:
    """The flat format as JSON lines; blank lines are not records and are passed over.

    ``lines``: read only these (_line, _raw, _enc) rows instead of the whole file (see :func:`_json_base`).
    """
    keys = {f: "VARCHAR" for f in FIELDS}
    wrong = " ".join(_json_type_reason(f) for f in FIELDS if f != "value")
    return Reader(
        base=f"({_json_base(src, keys, lines, rejects)})", csv_rejects=None if lines else rejects,
        fields={f: _text(f"_r.{ident(f)}", f in _SHORT) for f in FIELDS},
        pre_reason=f"CASE {_json_record_reason()} {wrong} END",
    )


def _read_json(src: Source) -> str:
    """DuckDB's JSON reader over the flat fields: one row per non-blank line, in file order; a line it
    cannot read as an object (malformed, not an object, invalid UTF-8) is a row of NULLs, not an error."""
    cols = "{" + ", ".join(f"{q(f)}: 'VARCHAR'" for f in FIELDS) + "}"
    return (f"read_json({q(str(src.path))}, format='newline_delimited', records=true, columns={cols}, "
            "ignore_errors=true)")


def direct_reader(src: Source) -> Reader | None:
    """The fast path's reader: DuckDB's own reader as a plain table ``_r``, one parse per record, no line
    splitting, and only the columns a query uses (Parquet and plain JSONL; None for other formats).

    JSONL lines are numbered in read order, which is the file's line number when the file has no blank
    line (ingest checks that). The JSON reader turns a line it cannot read into NULLs and an object given
    for a text field into its JSON text, so the rows it rejects and its ``suspect`` rows are read again
    from their raw text by :func:`jsonl_reader`; it keeps no raw text (``raw`` is NULL).
    """
    if src.format == "parquet":
        return parquet_reader(src)
    if src.format != "jsonl" or src.path.suffix.lower() == ".gz":
        return None
    suspect = " OR ".join(f"starts_with(_r.{ident(f)}, '{{') OR starts_with(_r.{ident(f)}, '[')"
                          for f in FIELDS if f != "value")
    return Reader(base=f"{_read_json(src)} AS _r", fields={f: _text(f"_r.{ident(f)}", f in _SHORT) for f in FIELDS},
                  suspect=f"coalesce({suspect}, false)", raw="NULL::VARCHAR", carry={}, line="row_number() OVER ()")


def lines_relation(src: Source, rejects: str) -> str:
    """(_line, _raw) for every line of the file (lines not UTF-8 go to ``rejects``): the raw text of rejected records."""
    return _lines_relation(src, rejects)


# Feedback words of chat logs mapped onto event types (anything else must itself be an event type).
_UP = ("up", "thumbs_up", "thumbsup", "positive", "good", "like", "helpful", "+1")
_DOWN = ("down", "thumbs_down", "thumbsdown", "negative", "bad", "dislike", "unhelpful", "-1")


def _chat_content(msg: str) -> str:
    """Text of a chat message; content given as parts ([{"type":"text","text":...}]) is joined."""
    return (
        f"CASE WHEN json_type({msg}, '$.content') = 'ARRAY' "
        f"THEN array_to_string(json_extract_string({msg}, '$.content[*].text'), chr(10)) "
        f"ELSE json_extract_string({msg}, '$.content') END"
    )


def chat_reader(src: Source, rejects: str | None = None) -> Reader:
    """OpenAI-style chat JSONL: the last user turn is the prompt, the last assistant turn the response.

    ``event`` if present, else ``feedback`` (up/down words, true/false, or a number = a rating), else
    an impression. See interactions/README.md for the full mapping.
    """
    keys = {f: "VARCHAR" for f in FIELDS if f not in ("prompt", "response")}
    keys |= {"messages": "JSON", "feedback": "JSON"}
    turn = "list_filter(json_extract(_r.messages, '$[*]'), lambda m: json_extract_string(m, '$.role') = {role})[-1]"
    base = (
        f"(SELECT *, CASE WHEN json_type(_r.messages) = 'ARRAY' THEN {turn.format(role=q('user'))} END AS _u, "
        f"CASE WHEN json_type(_r.messages) = 'ARRAY' THEN {turn.format(role=q('assistant'))} END AS _a, "
        f"json_type(_r.feedback) AS _ft, lower(trim(json_extract_string(_r.feedback, '$'))) AS _fv "
        f"FROM ({_json_base(src, keys, rejects=rejects)}))"
    )
    up, down = ", ".join(map(q, _UP)), ", ".join(map(q, _DOWN))
    feedback_event = (
        "CASE WHEN _ft IN ('BIGINT', 'UBIGINT', 'DOUBLE') THEN 'rating' "
        "WHEN _ft = 'BOOLEAN' THEN CASE WHEN _fv = 'true' THEN 'thumbs_up' ELSE 'thumbs_down' END "
        f"WHEN _fv IN ({up}) THEN 'thumbs_up' WHEN _fv IN ({down}) THEN 'thumbs_down' ELSE _fv END"
    )
    fields = {f: _text(f"_r.{ident(f)}", f in _SHORT) for f in FIELDS if f not in ("prompt", "response")}
    fields["prompt"] = _text(_chat_content("_u"), False)
    fields["response"] = _text(_chat_content("_a"), False)
    fields["event"] = f"coalesce({fields['event']}, {feedback_event}, 'impression')"
    fields["value"] = f"coalesce({fields['value']}, CASE WHEN _ft IN ('BIGINT', 'UBIGINT', 'DOUBLE') THEN _fv END)"
    wrong = " ".join(_json_type_reason(f) for f in keys if f not in ("value", "messages", "feedback"))
    pre = (
        f"CASE {_json_record_reason()} "
        "WHEN _r.messages IS NULL THEN 'missing required field: messages' "
        f"WHEN json_type(_r.messages) <> 'ARRAY' THEN 'wrong type: messages is a JSON ' || {json_kind('json_type(_r.messages)')} "
        "|| ', expected a list of {role, content}' "
        "WHEN _u IS NULL THEN 'missing required field: messages has no user turn' "
        f"WHEN _ft IN ('OBJECT', 'ARRAY') THEN 'wrong type: feedback is a JSON ' || {json_kind('_ft')} {wrong} END"
    )
    return Reader(base=base, fields=fields, pre_reason=pre, csv_rejects=rejects)


def _csv_relation(src: Source, cols: list[str], rejects: str) -> str:
    delim = "\\t" if src.path.suffix.lower() == ".tsv" else ","
    columns = "{" + ", ".join(f"{q(c)}: 'VARCHAR'" for c in cols) + "}"
    return (
        f"read_csv({q(str(src.path))}, header=true, auto_detect=false, columns={columns}, delim=E'{delim}', "
        f"quote='\"', escape='\"', store_rejects=true, rejects_table={q(rejects)}, "
        f"rejects_scan={q(rejects + '_scan')}, max_line_size={_line_max(src)})"
    )


def _csv_columns(src: Source) -> list[str]:
    """Header names made unique and non-empty (DuckDB needs distinct column names)."""
    seen: dict[str, int] = {}
    out = []
    for i, c in enumerate(src.columns):
        c = c or f"column{i}"
        seen[c] = seen.get(c, 0) + 1
        out.append(c if seen[c] == 1 else f"{c}_{seen[c]}")
    return out


def csv_reader(src: Source, rejects: str) -> Reader:
    """The flat format as CSV with a header; rows that break CSV rules are collected from DuckDB's rejects."""
    cols = _csv_columns(src)
    base = f"(SELECT row_number() OVER () AS _n, _r FROM {_csv_relation(src, cols, rejects)} AS _r)"
    fields = {f: (_text(f"_r.{ident(f)}", f in _SHORT) if f in cols else "NULL::VARCHAR") for f in FIELDS}
    return Reader(base=base, fields=fields, raw="to_json(_r)::VARCHAR", carry={"_r": "_r"}, line="_n + 1",
                  csv_rejects=rejects)


def review_reader(src: Source, rejects: str) -> Reader:
    """The expert-review CSV (docs/contracts.md): each rated row becomes a ``review`` event."""
    cols = _csv_columns(src)
    base = f"(SELECT row_number() OVER () AS _n, _r FROM {_csv_relation(src, cols, rejects)} AS _r)"

    def col(name: str, short: bool = True) -> str:
        return _text(f"_r.{ident(name)}", short) if name in cols else "NULL::VARCHAR"

    rating, reviewer = col("rating"), f"coalesce({col('reviewer')}, 'reviewer')"
    fields = {
        "event_id": f"md5(concat_ws(chr(31), 'review', coalesce({col('review_id')}, ''), coalesce({col('example_id')}, ''), "
        f"coalesce({col('model')}, ''), {reviewer}, {rating}))",
        "ts": f"coalesce({col('reviewed_at')}, {q(src.mtime_iso)})",
        "user_id": reviewer, "segment": col("segment"), "example_id": col("example_id"), "domain": col("domain"),
        "prompt": col("prompt", False), "response": col("response", False), "reference": col("reference", False),
        "event": "'review'", "value": rating, "model_version": col("model"),
    }
    pre = (
        f"CASE WHEN try_cast({rating} AS DOUBLE) IS NOT NULL AND NOT (try_cast({rating} AS DOUBLE) BETWEEN 1 AND 5) "
        f"THEN 'rating out of range: ' || {rating} || ' (expected 1-5)' END"
    )
    return Reader(base=base, fields=fields, pre_reason=pre, raw="to_json(_r)::VARCHAR", carry={"_r": "_r"},
                  skip=f"{rating} IS NULL", line="_n + 1", csv_rejects=rejects)


_PARQUET_TEXT = ("VARCHAR",)


def _nested_kind(t: str) -> str | None:
    """'struct', 'map' or 'list' for a nested Parquet/DuckDB type, None for a scalar one."""
    if t.startswith("STRUCT") or t.startswith("UNION"):
        return "struct"
    if t.startswith("MAP"):
        return "map"
    if t.endswith("]"):
        return "list"
    return None


def parquet_reader(src: Source) -> Reader:
    """Parquet with the flat columns; typed ts (TIMESTAMP[_TZ], DATE, epoch number) and value are used as is.

    Lines are row numbers in the file (1-based). A nested column (struct, map, list) given for a field is
    the wrong type, as a JSON object or array is in JSONL.
    """
    cols = ", ".join(f"{ident(c)} := _r.{ident(c)}" for c in src.types) or "_empty := NULL"
    base = f"read_parquet({q(str(src.path))}, file_row_number=true) AS _r"
    fields, ts_parsed, value_parsed, wrong = {}, None, None, []
    for f in FIELDS:
        t = src.types.get(f)
        kind = _nested_kind(t) if t else None
        if t is None or kind:
            fields[f] = "NULL::VARCHAR"
        elif t in _PARQUET_TEXT:
            fields[f] = _text(f"_r.{ident(f)}", f in _SHORT)
        else:
            fields[f] = f"CAST(_r.{ident(f)} AS VARCHAR)"
        if kind:
            expected = "a number" if f == "value" else "a timestamp" if f == "ts" else "a string"
            wrong.append(f"WHEN _r.{ident(f)} IS NOT NULL THEN {q(f'wrong type: {f} is a Parquet {kind} ({t}), expected {expected}')}")
    ts_t, v_t = src.types.get("ts", ""), src.types.get("value", "")
    if ts_t.startswith("TIMESTAMP WITH TIME ZONE"):
        ts_parsed = "(_r.ts AT TIME ZONE 'UTC')"
    elif (ts_t.startswith("TIMESTAMP") or ts_t == "DATE") and not _nested_kind(ts_t):
        ts_parsed = "CAST(_r.ts AS TIMESTAMP)"
    if v_t and v_t not in _PARQUET_TEXT and v_t != "BOOLEAN" and not _nested_kind(v_t):
        value_parsed = "CAST(_r.value AS DOUBLE)"
    return Reader(base=base, fields=fields, raw="to_json(_rec)::VARCHAR", carry={"_rec": f"struct_pack({cols})"},
                  ts_parsed=ts_parsed,
                  value_parsed=value_parsed, line="_r.file_row_number + 1",
                  pre_reason=f"CASE {' '.join(wrong)} END" if wrong else "NULL")
