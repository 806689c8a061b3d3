"""A deployed model as the simulated users' assistant: ``simulate --responder M``.

The loop (DESIGN.md, "Closing the loop") needs logs whose failures are a real model's own: M answers each
distinct prompt once, and right or wrong decides the users' feedback. M is anything the ship stages load
(``lm.models.load_any``): a train RUN (base + adapter), an EXPORT variant folder, an HF folder or a ``.gguf``.

For label tasks the answer is found the way ``evaluate`` finds it: one teacher-forced pass shows where greedy
decoding would emit the reference token for token (``evaluate.forced_answers``, exact up to float ties); only
the rest are decoded, and a decoded answer that names a label (``evaluate.parse_label``: case and edge
punctuation ignored) is recorded as that label, so the feedback judges what a user would read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from adaptive_ft.artifacts.run import guess_task, is_run
from adaptive_ft.errors import InputError, ModelError
from adaptive_ft.lm.answers import forced_answers, generate, parse_label
from adaptive_ft.lm.models import load_any, read_run, resolve_variant
from adaptive_ft.lm.tokens import format_for_model


def responder_name(spec: str | Path) -> str:
    """The ``model_version`` a responder's events carry: the RUN / variant folder or file name."""
    path = Path(spec).resolve()
    if path.name in ("merged", "int8", "nf4") or path.suffix == ".gguf":
        return f"{path.parent.name}/{path.name}"
    return path.name


@dataclass
class ModelResponder:
    """Answers batches of prompts with a model; ``labels`` (a label task) enables the forced check."""

    spec: str
    labels: list[str] | None = None
    batch_size: int = 32
    max_new_tokens: int = 16
    decode: bool = True
    name: str = ""
    _model: Any = field(default=None, repr=False)
    _tokenizer: Any = field(default=None, repr=False)
    _manifest: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        path = resolve_variant(Path(self.spec))  # EXPORT/<variant name> too
        if not path.exists():
            raise InputError(f"--responder {self.spec}: no such RUN folder, EXPORT variant, HF folder or .gguf "
                             "file; pass what `adaptive-ft train --out` or `adaptive-ft export` wrote")
        self.name = self.name or responder_name(path)
        try:
            self._model, self._tokenizer = load_any(path)
        except (InputError, ModelError) as e:
            raise ModelError(f"--responder {self.spec}: cannot be loaded to answer prompts: {e}") from e
        self._manifest = read_run(path) if is_run(path) else None

    def prepare(self, references: list[str]) -> None:
        """Called by ``simulate`` with every reference of the pool: a label task (short answers from a small set,
        the rule training uses) turns on the forced check and label parsing."""
        if self.labels is None and references and guess_task(pl.DataFrame({"reference": references})) == "label":
            self.labels = sorted(set(references))

    def answer(self, prompts: list[str], references: list[str] | None = None) -> list[str]:
        """One answer per prompt, in order. With ``references`` and labels, the forced check runs first."""
        texts = [format_for_model(self._tokenizer, p, self._manifest) for p in prompts]
        out: list[str | None] = [None] * len(prompts)
        if self.labels is not None and references is not None:
            out = forced_answers(self._model, self._tokenizer, texts, references, self.batch_size,
                                 self.max_new_tokens)
        todo = [i for i, a in enumerate(out) if a is None]
        if self.decode:
            decoded = generate(self._model, self._tokenizer, [texts[i] for i in todo], self.max_new_tokens,
                               self.batch_size, desc=f"{self.name}, {len(todo)} of {len(prompts)} to decode")
        else:  # the forced check already proved these wrong; their text is not needed to judge them
            decoded = ["" for _ in todo]
        index = {label: i for i, label in enumerate(self.labels or [])}
        for i, text in zip(todo, decoded):
            label = parse_label(text, index) if index else None
            out[i] = label if label is not None else text.strip()
        return [str(a) for a in out]

    def __call__(self, prompts: list[str]) -> list[str]:
        return self.answer(prompts)


__all__ = ["ModelResponder", "responder_name"]
