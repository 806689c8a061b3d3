"""File helpers every layer shares."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from adaptive_ft.errors import InputError


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (the plan hash a run records, the input hashes a plan records, ingest's batches)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# The files a run or export folder is made of: a command given such a folder as input never writes these
# (its own outputs may still go into the folder, e.g. RUN/report.html).
FOLDER_FILES = ("manifest.json", "metrics.jsonl", "split.parquet")


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _same_file(a: Path, b: Path) -> bool:
    if _real(a) == _real(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def refuse_overwrite(outputs: Iterable[str | Path | None], inputs: dict[str, str | Path | None]) -> None:
    """Raise InputError when an output would write over one of the command's inputs (issue 16).

    Every writing command calls this before it reads or writes anything, with all the files it will write
    (``report.html`` and its ``.md`` / ``.json``, ``eval.json`` and its outputs Parquet...) and each input by
    its option name. A file input is protected itself (symlinks and hard links resolved); a folder input (a
    RUN, an EXPORT) protects the files it is made of: :data:`FOLDER_FILES` at its top and whatever exists in its
    subfolders (``adapter/``, ``checkpoints/``, the variants); a new file inside it overwrites nothing.
    """
    given = [(opt, Path(p)) for opt, p in inputs.items() if p is not None and str(p) != ""]
    for out in outputs:
        if out is None:
            continue
        out = Path(out)
        real = _real(out)
        for option, path in given:
            if path.is_dir():
                folder = _real(path)
                inside = folder in real.parents  # and only what is there: a new file overwrites nothing
                if real.exists() and (real == folder or inside and (real.parent != folder or real.name in FOLDER_FILES)):
                    what = "" if real == folder else f"{real.relative_to(folder)} of "
                    raise InputError(f"{out} would overwrite {what}{option} {path}, an input of this command; "
                                     f"write the output somewhere else")
            elif _same_file(out, path):
                raise InputError(f"{out} is {option} {path}, an input of this command; refusing to write over it. "
                                 f"Choose another output path")
