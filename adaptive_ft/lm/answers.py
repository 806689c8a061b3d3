"""A model's answers to prompts: greedy decoding, the teacher-forced check that skips it, label parsing, reference loss.

Evaluation scores these; the responder (the loop's deployed model) answers simulated users with them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from adaptive_ft.lm.tokens import Encoded, answer_logits, collate

_EDGE_PUNCTUATION = " .,:;!?\"'`*"


def parse_label(response: str, index: dict[str, int]) -> str | None:
    """The label a response names: its first line, case and surrounding punctuation ignored; None if no label.

    Labels are normalized the same way, so a label that itself ends in punctuation (Banking77 has
    ``reverted_card_payment?``) matches a response that says it verbatim.
    """
    lines = response.strip().splitlines()
    line = lines[0].strip().lower() if lines else ""
    verbatim = {label.lower(): label for label in index}
    if line in verbatim:  # exact first: two labels may differ only in their punctuation
        return verbatim[line]
    normalized = {label.strip(_EDGE_PUNCTUATION).lower(): label for label in index}
    return normalized.get(line.strip(_EDGE_PUNCTUATION))


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int,
             desc: str = "generating") -> list[str]:
    """Greedy answers, batched with left padding (so every row's answer starts at the same column)."""
    tokenizer.padding_side = "left"
    out: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=f"answering ({desc})", unit="batch", disable=None):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False)
        gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        out += tokenizer.batch_decode(gen[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    return out


@torch.no_grad()
def forced_answers(model: torch.nn.Module, tokenizer: Any, prompts: list[str], refs: list[str],
                   batch_size: int, max_new_tokens: int) -> list[str | None]:
    """Each reference where greedy decoding (``max_new_tokens`` at most) would answer it token for token, else None.

    Greedy decoding emits the reference's tokens and then the end token exactly when each of them is the
    argmax after the reference's own prefix -- which one teacher-forced forward pass shows, where decoding
    takes one pass per token. Answers found this way are the ones decoding would give (up to float ties);
    only the rest need decoding, so a mostly-right model is scored several times faster.
    """
    eos = tokenizer.eos_token_id
    out: list[str | None] = [None] * len(prompts)
    if eos is None:
        return out
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(prompts), batch_size), desc="checking answers", unit="batch", disable=None):
        items = []
        for prompt, ref in zip(prompts[start:start + batch_size], refs[start:start + batch_size]):
            p = tokenizer(prompt, add_special_tokens=False).input_ids
            items.append(Encoded(p + tokenizer(ref, add_special_tokens=False).input_ids + [eos], len(p), False))
        b = collate(items, pad)  # training's batching: right padding, positions that predict answer tokens
        logits = answer_logits(model, b["input_ids"].to(device), b["predict_pos"].to(device))
        wrong = torch.zeros(len(items)).index_add_(0, b["row"], (logits.argmax(-1).cpu() != b["targets"]).float())
        for r, it in enumerate(items):
            answer = it.ids[it.n_prompt:-1]
            if wrong[r] == 0 and len(answer) <= max_new_tokens:
                out[start + r] = tokenizer.decode(answer, skip_special_tokens=True)
    return out


@torch.no_grad()
def reference_nll(model: torch.nn.Module, tokenizer: Any, prompts: list[str], refs: list[str]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Summed negative log-likelihood of each reference's tokens after its prompt, and their count."""
    nll, ntok = np.zeros(len(prompts)), np.zeros(len(prompts))
    for i, (prompt, ref) in enumerate(zip(prompts, refs)):
        p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        r_ids = tokenizer(ref, add_special_tokens=False).input_ids
        ids = torch.tensor([p_ids + r_ids])
        logits = model(input_ids=ids).logits[0, len(p_ids) - 1:-1].float()   # (R, V): predicts each ref token
        nll[i] = torch.nn.functional.cross_entropy(logits, torch.tensor(r_ids), reduction="sum").item()
        ntok[i] = len(r_ids)
    return nll, ntok
