"""A model's answers to prompts: greedy decoding, the teacher-forced check that skips it, label parsing, reference loss.

Label answers (:func:`label_responses`) cost about one teacher-forced pass: decoding runs only where it can
still change the label an answer names, and resumes from that pass's KV cache.

Evaluation scores these; the responder (the loop's deployed model) answers simulated users with them.
"""

from __future__ import annotations

import inspect
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


# Label answers are decided before decoding ends. parse_label reads only the first line, compares it lower-cased,
# and ignores whitespace and punctuation at its edges; so once the first line's text so far, lower-cased with
# whitespace and _EDGE_PUNCTUATION dropped (its "key"), is no prefix of any label's key, no continuation can
# name a label. Keys drop those characters everywhere (not only at the edges): a weaker test, so it never
# rules out an answer that could still match, and it is blind to the spaces a tokenizer's decode may clean up
# around punctuation. The final sigma (the one context-dependent lower-casing) is folded to the plain sigma.


def _key(text: str) -> str:
    return "".join(c for c in text.lower().replace("\u03c2", "\u03c3")
                   if not c.isspace() and c not in _EDGE_PUNCTUATION)


def label_keys(labels: list[str]) -> frozenset[str]:
    """The keys of ``labels`` that :func:`could_name_label` compares a partial answer with."""
    return frozenset(_key(label) for label in labels)


def could_name_label(text: str, keys: frozenset[str]) -> bool:
    """Whether some continuation of the partial answer ``text`` could make :func:`parse_label` name a label.

    A trailing U+FFFD is a character whose bytes are still arriving (byte-level tokens), so it is ignored.
    """
    lines = text.lstrip().splitlines()
    k = _key(lines[0].rstrip("\ufffd")) if lines else ""
    return any(key.startswith(k) for key in keys)


def first_line_done(text: str) -> bool:
    """Whether the answer's first line has ended (what :func:`parse_label` reads can no longer change)."""
    rest = text.lstrip()
    lines = rest.splitlines()
    return bool(lines) and len(rest) > len(lines[0])


def _label_decided(tokenizer: Any, start: int, keys: frozenset[str]) -> Any:
    """A ``generate`` stopping rule: a row stops once the label its answer names is decided (see
    :func:`could_name_label`): its first line ended, or no continuation can name a label any more."""
    from transformers import StoppingCriteria  # deferred: transformers is heavy, and loaded with a model anyway

    class LabelDecided(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            texts = tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
            return torch.tensor([first_line_done(t) or not could_name_label(t, keys) for t in texts],
                                dtype=torch.bool, device=input_ids.device)

    return LabelDecided()




@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int,
             desc: str = "generating", labels: list[str] | None = None) -> list[str]:
    """Greedy answers, batched with left padding (so every row's answer starts at the same column).

    With ``labels``, a row stops as soon as the label its answer names (:func:`parse_label`) is decided, so its
    answer is greedy decoding's text up to there: the same label, fewer steps.
    """
    from transformers import StoppingCriteriaList

    tokenizer.padding_side = "left"
    keys = label_keys(labels) if labels is not None else None
    out: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=f"answering ({desc})", unit="batch", disable=None):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False)
        width = batch.input_ids.shape[1]
        stop = StoppingCriteriaList([_label_decided(tokenizer, width, keys)] if keys is not None else [])
        gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, stopping_criteria=stop)
        out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return out


@torch.no_grad()
def label_responses(model: torch.nn.Module, tokenizer: Any, prompts: list[str], refs: list[str], labels: list[str],
                    batch_size: int, max_new_tokens: int, decode_rejected: bool = True, desc: str = "") -> list[str]:
    """Greedy label-task answers, each decoded only as far as it can change the label it names.

    One teacher-forced pass over prompt + reference + end token shows, per example, where greedy decoding
    leaves the reference: nowhere (the answer is the reference), at the end token (a prefix of it), or at a
    token ``j`` with greedy's own choice there. Greedy's first ``j + 1`` tokens are then known without
    decoding; when they already decide the label (:func:`could_name_label`, :func:`first_line_done`) the
    example is done, and otherwise decoding continues from that pass's KV cache (no second pass over the
    prompt) until the label is decided, the end token, or ``max_new_tokens``. A wrong label counts for
    precision, so answers that may name some other label are decoded too. An answer is greedy decoding's text
    up to where its label was decided. ``decode_rejected`` false leaves the still-undecided ones empty.
    """
    eos = tokenizer.eos_token_id
    if eos is None:  # no end token to force: decode them all, each until its label is decided
        return generate(model, tokenizer, prompts, max_new_tokens, batch_size, desc=desc, labels=labels)
    keys = label_keys(labels)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(model.parameters()).device
    out: list[str] = [""] * len(prompts)
    decoded = 0
    bar = tqdm(range(0, len(prompts), batch_size), desc=f"answering ({desc})", unit="batch", disable=None)
    for start in bar:
        items, answers = [], []
        for prompt, ref in zip(prompts[start:start + batch_size], refs[start:start + batch_size]):
            p = tokenizer(prompt, add_special_tokens=False).input_ids
            a = tokenizer(ref, add_special_tokens=False).input_ids
            items.append(Encoded(p + a + [eos], len(p), False))
            answers.append(a)
        b = collate(items, pad)  # training's batching: right padding, positions that predict answer tokens
        run = base.get_decoder()(input_ids=b["input_ids"].to(device), use_cache=True)
        hidden = run.last_hidden_state.reshape(-1, run.last_hidden_state.shape[-1])
        greedy = base.get_output_embeddings()(hidden.index_select(0, b["predict_pos"].to(device))).argmax(-1).cpu()
        follow: list[tuple[int, list[int], int]] = []  # (row, greedy tokens so far, cache positions they use)
        offset = 0
        for r, (it, a) in enumerate(zip(items, answers)):
            g, t = greedy[offset:offset + len(a) + 1].tolist(), a + [eos]
            offset += len(a) + 1
            j = next((k for k in range(len(t)) if g[k] != t[k]), len(t))  # where greedy leaves the reference
            if j == len(t) or g[j] == eos or j >= max_new_tokens:  # the reference, or a prefix of it
                out[start + r] = tokenizer.decode(a[:min(j, max_new_tokens)], skip_special_tokens=True)
                continue
            so_far = a[:j] + [g[j]]
            text = tokenizer.decode(so_far, skip_special_tokens=True)
            out[start + r] = text
            if len(so_far) < max_new_tokens and could_name_label(text, keys) and not first_line_done(text):
                follow.append((r, so_far, it.n_prompt + j))
                if not decode_rejected:  # scored wrong, undecoded
                    out[start + r] = ""
        if follow and decode_rejected:
            decoded += len(follow)
            cache = run.cache if getattr(run, "cache", None) is not None else run.past_key_values
            for (r, _, _), text in zip(follow, _continue_greedy(base, tokenizer, cache, follow,
                                                                 b["input_ids"].shape[1], keys, max_new_tokens)):
                out[start + r] = text
        bar.set_postfix(decoded=decoded)
    return out


def _continue_greedy(base: Any, tokenizer: Any, cache: Any, rows: list[tuple[int, list[int], int]], width: int,
                     keys: frozenset[str], max_new_tokens: int) -> list[str]:
    """Greedy decoding of ``rows`` onward from a teacher-forced pass's KV ``cache`` (``width`` positions).

    Each row's cache is valid for its first ``used`` positions (its prompt and the reference tokens greedy
    agreed with); the rest (the reference from where greedy left it, padding) is masked out, and each new
    token takes the next position id after ``used``, so attention sees exactly prompt + greedy's tokens.
    """
    device = next(base.parameters()).device
    cache.batch_select_indices(torch.tensor([r for r, _, _ in rows], device=device))
    tokens = [list(t) for _, t, _ in rows]
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for i, (_, _, used) in enumerate(rows):
        mask[i, :used] = 1
    pos = torch.tensor([used for _, _, used in rows], device=device)
    # transformers 5.x renamed past_key_values to cache; either, as this version's forward names it
    name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    texts = [""] * len(rows)
    live = list(range(len(rows)))  # rows still decoding, in the cache's current row order
    while live:
        mask = torch.cat([mask, torch.ones(len(live), 1, dtype=torch.long, device=device)], 1)
        nxt = torch.tensor([tokens[i][-1] for i in live], device=device)
        logits = base(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None], use_cache=True,
                      **{name: cache}).logits[:, -1]
        keep = []
        for k, (i, tok) in enumerate(zip(live, logits.argmax(-1).tolist())):
            if tok == tokenizer.eos_token_id:
                texts[i] = tokenizer.decode(tokens[i], skip_special_tokens=True)
                continue
            tokens[i].append(tok)
            texts[i] = tokenizer.decode(tokens[i], skip_special_tokens=True)
            if len(tokens[i]) < max_new_tokens and could_name_label(texts[i], keys) and not first_line_done(texts[i]):
                keep.append(k)
        if len(keep) < len(live):
            idx = torch.tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(idx)
            mask, pos = mask[idx], pos[idx]
            live = [live[k] for k in keep]
        pos = pos + 1
    return texts


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
