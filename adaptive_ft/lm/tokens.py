"""What the model sees: the chat-formatted prompt, answer-only labels, padded batches, logits at answer positions.

Training, the layer probe and evaluation all encode through here, so each asks the model exactly the same
question (the same system turn, the same template, the same answer tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# The system turn every prompt carries. SmolLM2's template injects "You are a helpful AI assistant named
# SmolLM, trained by Hugging Face" (17 tokens) when a conversation has no system turn: that doubles the cost
# of a short Banking77 query (median 12 tokens), so an explicit empty system turn (4 tokens) replaces it.
# Training and evaluation both call format_prompt, so they always ask the same question.
DEFAULT_SYSTEM = ""
IGNORE = -100  # label of a token that carries no loss (prompt and padding)


def format_prompt(tokenizer: Any, prompt: str, system: str | None = DEFAULT_SYSTEM) -> str:
    """The prompt as the model sees it: its chat template with the generation prompt (training and evaluation)."""
    messages = [{"role": "user", "content": prompt}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def format_for_model(tokenizer: Any, prompt: str, manifest: dict[str, Any] | None = None) -> str:
    """The prompt as training formatted it: :func:`format_prompt` (chat template + generation prompt),
    with the system turn the run recorded in its manifest (``system_prompt``), so evaluation asks what training taught.
    """
    if manifest is not None and "system_prompt" in manifest:
        return format_prompt(tokenizer, prompt, system=manifest["system_prompt"])
    return format_prompt(tokenizer, prompt)


@dataclass
class Encoded:
    """One tokenized example: ``ids`` = prompt + answer, the first ``n_prompt`` ids carry no loss."""

    ids: list[int]
    n_prompt: int
    truncated: bool


def encode_example(tokenizer: Any, prompt: str, reference: str, max_len: int,
                   system: str | None = DEFAULT_SYSTEM) -> Encoded:
    """Prompt and answer ids; over-long examples lose the start of the prompt, never the answer's end token.

    Keeping the end of the prompt keeps the generation prompt right before the answer, which is what
    the model sees at inference.
    """
    p = tokenizer(format_prompt(tokenizer, prompt, system), add_special_tokens=False).input_ids
    a = tokenizer(reference, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    truncated = len(p) + len(a) > max_len
    if truncated:
        if len(a) > max_len - 1:  # the answer alone is too long: keep its start, its end token, one prompt token
            a = a[: max_len - 2] + [tokenizer.eos_token_id]
        p = p[-(max_len - len(a)):]
    return Encoded(p + a, len(p), truncated)


def encode_all(tokenizer: Any, frame: Any, max_len: int, system: str | None = DEFAULT_SYSTEM) -> list[Encoded]:
    """Encode every row (prompt, reference) of ``frame`` in order."""
    rows = frame.select("prompt", "reference").iter_rows()
    return [encode_example(tokenizer, p, r, max_len, system) for p, r in rows]


def collate(items: list[Encoded], pad_id: int) -> dict[str, Any]:
    """Right-padded ``input_ids`` (B, T) and the flat indices of the positions that predict answer tokens.

    ``predict_pos`` are indices into the flattened (B*T) hidden states: position t predicts token t+1, so
    the answer tokens at [n_prompt, len) are predicted from [n_prompt - 1, len - 1). ``targets`` are those
    answer tokens. With right padding and causal attention no real token ever sees a pad, so no attention
    mask is needed.
    """
    width = max(len(it.ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    pos, tgt, row = [], [], []
    for b, it in enumerate(items):
        ids[b, : len(it.ids)] = torch.tensor(it.ids)
        for t in range(it.n_prompt, len(it.ids)):
            pos.append(b * width + t - 1)
            tgt.append(it.ids[t])
            row.append(b)
    return {"input_ids": ids, "predict_pos": torch.tensor(pos, dtype=torch.long),
            "targets": torch.tensor(tgt, dtype=torch.long), "row": torch.tensor(row, dtype=torch.long),
            "n_tokens": sum(len(it.ids) for it in items), "n_padded": ids.numel()}


def answer_logits(model: Any, input_ids: torch.Tensor, predict_pos: torch.Tensor) -> torch.Tensor:
    """Logits (N, V) at the positions that predict answer tokens only: the output layer skips the prompt."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, H)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, predict_pos)  # (N, H)
    return base.get_output_embeddings()(h)  # (N, V)
