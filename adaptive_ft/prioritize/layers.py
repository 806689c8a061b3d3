"""Which adapter layers to train: probe a fraction of domain x layer cells, complete the rest, select.

The probe of one cell (domain d, layer l) answers "how much can an adapter on layer l alone quickly
lower the loss on domain d's top examples?": a trial LoRA of rank ``probe_rank`` on the layer's target
linear modules (B = 0 at start, so the model is unchanged), ``probe_steps`` Adam steps on the domain's
``probe_examples`` top examples (loss on the reference-answer tokens only), and the score is the relative
loss drop (loss_before - loss_after) / loss_before. This measures what adapting the layer buys -- the
criterion DESIGN.md asks for -- rather than a proxy such as an initial gradient norm, which on SmolLM2
picked layers that trained worst. Its cost is one forward pass plus a backward pass down to layer l per
step, so probing every cell of a 30-layer model is expensive; only ``probe_fraction`` of the cells are
probed (every row and column at least twice where possible) and the rest are completed: row and
column effects plus a rank-r residual by soft-impute (:func:`complete`).

``layer_probe: warmup`` scores layers differently, for the question a real run asks ("which layers
carry the learning after many steps?"): one trial LoRA on every layer at once, ``probe_steps`` Adam
steps at the training learning rate on the probed domains' examples (three quarters of each domain's),
then each layer's adapter is switched off in turn and the rise in loss on the held-out quarter of each
domain is that (domain, layer) cell -- every cell measured, none completed. This is ablation of a jointly
trained adapter, in the spirit of LoRA-drop (Zhou et al. 2024, arXiv:2402.07721), which keeps the layers
whose LoRA output matters most after a short all-layer fit; it uses the loss itself rather than the
LoRA output's norm, because a layer with outsized activations can dominate the output norm without being
worth adapting. It answers a different question from the one-step cell probe: one step measures which layer
moves the loss fastest at first, the warm-up which layers keep carrying the learning; how each ranks trained
layer sets on Banking77 is in the README's benchmark table (``benchmarks/layer_completion.py``,
``benchmarks/probe_sets.py``).

Selection weighs score against compute: the backward pass runs down to the lowest adapted layer, so the
cost of a set of layers is its depth (L - min(layer)) / L. The plan keeps the k layers maximizing
sum(score) - ``layer_cost_weight`` x depth (greedy; with weight 0, simply the top k by score).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from adaptive_ft.errors import ModelError
from adaptive_ft.lm.tokens import IGNORE, answer_logits, encode_example


@dataclass
class LayerScores:
    """The domain x layer sensitivity matrix, which cells were measured, and the selection."""

    domains: list[str]
    values: np.ndarray          # (D, L) measured where ``measured``, completed elsewhere
    measured: np.ndarray        # (D, L) bool
    layer_score: np.ndarray     # (L,) share-weighted mean of the row-normalized values
    selected: list[int]
    rank_pattern: dict[str, int] = field(default_factory=dict)
    depth_fraction: float = 1.0
    probe_seconds: float = 0.0
    method: str = "cells"


# --------------------------------------------------------------------------------------------- probing


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The transformer blocks of a causal LM (``model.model.layers`` for Llama-style models)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None and hasattr(model, "get_decoder"):
        layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ModelError(f"{type(model).__name__}: cannot find its decoder layers (expected model.model.layers)")
    return layers


def encode_examples(tokenizer: Any, pairs: list[tuple[str, str]], max_len: int = 256) -> dict[str, torch.Tensor]:
    """Prompt + reference answers as a padded batch, encoded exactly as training encodes them
    (:func:`adaptive_ft.lm.tokens.encode_example`: the same system turn, template and end token), so the probe
    scores layers on the question training asks; labels are -100 outside the answer."""
    encoded = [encode_example(tokenizer, prompt, answer, max_len) for prompt, answer in pairs]
    width = max(len(e.ids) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        input_ids[i, :len(e.ids)] = torch.tensor(e.ids)
        labels[i, e.n_prompt:len(e.ids)] = torch.tensor(e.ids[e.n_prompt:])
        mask[i, :len(e.ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class _TrialLora:
    """A throw-away LoRA on chosen Linear modules, added with forward hooks (the model itself is untouched).

    ``enabled = False`` switches it off without removing it (the warm-up probe's ablation)."""

    def __init__(self, modules: list[torch.nn.Linear], rank: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.params: list[torch.nn.Parameter] = []
        self.handles = []
        self.enabled = True
        for mod in modules:
            a = torch.nn.Parameter(torch.randn(rank, mod.in_features, generator=gen) / mod.in_features ** 0.5)
            b = torch.nn.Parameter(torch.zeros(mod.out_features, rank))
            self.params += [a, b]
            self.handles.append(mod.register_forward_hook(self._hook(a, b)))

    def _hook(self, a: torch.nn.Parameter, b: torch.nn.Parameter):
        def hook(_mod, inputs, output):
            if not self.enabled:
                return output
            return output + (inputs[0] @ a.T) @ b.T  # (B, T, in) -> (B, T, r) -> (B, T, out)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _target_modules(model: Any, layer: int, targets: list[str]) -> list[torch.nn.Linear]:
    block = decoder_layers(model)[layer]
    modules = [m for name, m in block.named_modules()
               if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets]
    if not modules:
        raise ModelError(f"layer {layer}: none of the target modules {targets} found; "
                         "set train.lora.target_modules to the model's Linear layer names")
    return modules


def probe_cell(model: Any, batch: dict[str, torch.Tensor], layer: int, targets: list[str], rank: int,
               steps: int, lr: float, seed: int) -> float:
    """Relative loss drop on ``batch`` after ``steps`` Adam steps of a trial LoRA on ``layer`` alone."""
    trial = _TrialLora(_target_modules(model, layer, targets), rank, seed + layer)
    opt = torch.optim.Adam(trial.params, lr=lr)
    try:
        before = None
        for _ in range(steps):
            opt.zero_grad()
            loss = model(**batch).loss
            if before is None:  # B = 0 at the first step: this forward is the unchanged model's loss
                before = float(loss.detach())
            loss.backward()
            opt.step()
        with torch.no_grad():
            after = float(model(**batch).loss)
    finally:
        trial.remove()
    if before is None:  # steps == 0: nothing trained, nothing gained
        return 0.0
    return (before - after) / max(before, 1e-8)


def split_probe_examples(pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(fit, held-out): every fourth example held out (2 or 3 examples: the last); one example serves as both."""
    if len(pairs) <= 1:
        return pairs, pairs
    if len(pairs) < 4:
        return pairs[:-1], pairs[-1:]
    return [p for i, p in enumerate(pairs) if i % 4 != 3], pairs[3::4]


def _answer_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean answer-token cross-entropy of ``model(**batch).loss``, with the output layer applied only at
    the positions that predict an answer token (``lm.tokens.answer_logits``; a 49k-word output layer
    over every prompt position is a fifth of SmolLM2's forward pass, and most positions are prompt)."""
    ids, tgt = batch["input_ids"], batch["labels"][:, 1:]
    rows, cols = (tgt != -100).nonzero(as_tuple=True)  # position t predicts token t + 1
    return F.cross_entropy(answer_logits(model, ids, rows * ids.shape[1] + cols), tgt[rows, cols])


class _PrefixCache:
    """Replays decoder layers' outputs: while ``replay(batch, upto)`` is active, layers below ``upto``
    return what they returned in the recorded pass instead of computing it.

    Switching off layer l's adapter cannot change what layers 0..l-1 compute, so the ablation of layer l
    only needs layers l..L-1: half the ablation's forward passes on average, the results unchanged."""

    def __init__(self, layers: Any):
        self.layers = layers
        self.outputs: dict[int, list[Any]] = {}

    def record(self, key: int, fn: Any) -> Any:
        outs: list[Any] = []
        hooks = [layer.register_forward_hook(lambda _m, _i, out: outs.append(out)) for layer in self.layers]
        try:
            result = fn()
        finally:
            for h in hooks:
                h.remove()
        self.outputs[key] = outs
        return result

    def replay(self, key: int, upto: int, fn: Any) -> Any:
        outs = self.outputs[key]
        for j in range(upto):
            self.layers[j].forward = (lambda out: lambda *_a, **_k: out)(outs[j])
        try:
            return fn()
        finally:
            for j in range(upto):
                del self.layers[j].forward  # the class's forward again


def warmup_ablation(model: Any, tokenizer: Any, examples: dict[str, list[tuple[str, str]]], *, rank: int,
                    steps: int, lr: float, batch_size: int, targets: list[str], seed: int,
                    progress: bool = False, fast: bool = True) -> np.ndarray:
    """(D, L): the rise in each domain's held-out loss when one layer's adapter is switched off, after
    ``steps`` Adam steps of a trial LoRA on all layers at once (see the module docstring).

    The fit batches are drawn round-robin from a seeded shuffle of every domain's fit examples. Each
    domain's held-out loss is its mean answer-token cross-entropy; a cell is
    loss(without layer l's adapter) - loss(with all adapters), so a layer whose adapter the others can
    stand in for scores near 0. The model itself is left as it was.

    ``fast`` (the default) computes the output layer at answer positions only and replays the layers below
    the ablated one from the all-adapters pass (:class:`_PrefixCache`); ``fast=False`` runs whole forward
    passes (``model(**batch).loss``): the same losses up to float rounding, about 3x slower on SmolLM2.
    """
    from tqdm.auto import tqdm

    domains = list(examples)
    layers = decoder_layers(model)
    n_layers = len(layers)
    fit, held = [], []
    for d in domains:
        f, h = split_probe_examples(examples[d])
        fit += f
        held.append(encode_examples(tokenizer, h))
    trials = [_TrialLora(_target_modules(model, li, targets), rank, seed + li) for li in range(n_layers)]
    values = np.zeros((len(domains), n_layers))
    loss_of = _answer_loss if fast else (lambda m, b: m(**b).loss)
    try:
        opt = torch.optim.Adam([p for t in trials for p in t.params], lr=lr)
        # the run's schedule in miniature: linear warm-up over the first quarter, cosine decay after it
        # (Adam at full lr from step 0 on every layer at once scatters the adapters and the ablation with them)
        warm = max(1, steps // 4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (i + 1) / warm if i < warm else
                                                  0.5 * (1 + np.cos(np.pi * (i - warm) / max(1, steps - warm))))
        order = np.random.default_rng(seed).permutation(len(fit))
        bs = max(1, min(batch_size, len(fit)))
        for step in tqdm(range(steps), desc="layer warm-up", disable=None if progress else True):
            idx = [order[(step * bs + i) % len(order)] for i in range(bs)]
            opt.zero_grad()
            loss = loss_of(model, encode_examples(tokenizer, [fit[i] for i in idx]))
            if not torch.isfinite(loss):
                raise ModelError(f"layer warm-up: the loss is {float(loss)} at step {step}; "
                                 "lower train.lr or prioritize.probe_steps")
            loss.backward()
            opt.step()
            sched.step()

        cache = _PrefixCache(layers)

        def held_loss(i: int, ablated: int | None = None) -> float:
            run = lambda: loss_of(model, held[i])  # noqa: E731
            if not fast:
                return float(run())
            return float(cache.record(i, run) if ablated is None else cache.replay(i, ablated, run))

        with torch.no_grad():
            full = np.array([held_loss(i) for i in range(len(held))])
            for li in tqdm(range(n_layers), desc="layer ablation", disable=None if progress else True):
                trials[li].enabled = False
                values[:, li] = [held_loss(i, li) for i in range(len(held))]
                trials[li].enabled = True
            values -= full[:, None]
    finally:
        for t in trials:
            t.remove()
    return values


def choose_cells(n_rows: int, n_cols: int, fraction: float, seed: int) -> np.ndarray:
    """A balanced (rows, cols) bool mask with about ``fraction`` of the cells.

    Every column (layer) gets the same number m = round(fraction x rows) of rows, at least 2 where
    there are 2 (a bias plus a rank-1 factor per layer needs two measurements to be identified). Each
    column takes the rows measured least so far, ties broken at random: balanced across rows, and
    random enough that the pattern is connected (a fixed round-robin can split into blocks that share
    no row or column, and then no factorization can relate them).
    """
    rng = np.random.default_rng(seed)
    m = min(n_rows, max(min(2, n_rows), int(round(fraction * n_rows))))
    counts = np.zeros(n_rows)
    mask = np.zeros((n_rows, n_cols), dtype=bool)
    for j in range(n_cols):
        rows = np.argsort(counts + rng.random(n_rows), kind="stable")[:m]
        mask[rows, j] = True
        counts[rows] += 1
    for r in np.flatnonzero(~mask.any(axis=1)):  # more rows than cells handed out: one each
        mask[r, rng.integers(n_cols)] = True
    return mask


# ------------------------------------------------------------------------------------------- completion


def complete(values: np.ndarray, observed: np.ndarray, rank: int = 1, shrink: float = 0.05, iters: int = 200
             ) -> np.ndarray:
    """Fill the unobserved cells of ``values``: additive row + column effects, plus a low-rank residual.

    1. mu + a_d + b_l by alternating least squares on the observed cells (a domain's overall
       sensitivity, a layer's overall sensitivity).
    2. The residual's interaction by soft-impute (Mazumder, Hastie & Tibshirani 2010): fill the missing
       cells with the current estimate, take the SVD, shrink the singular values by ``shrink`` x the
       largest and keep ``rank`` of them; repeat. Unlike an alternating factorization with free
       factors, this cannot blow up on a column whose few observed rows happen to be alike.

    Observed cells are returned as measured.
    """
    base = _additive(values, observed)
    resid = np.where(observed, values - base, 0.0)
    z = np.zeros_like(resid)
    for _ in range(iters):
        u, s, vt = np.linalg.svd(np.where(observed, resid, z), full_matrices=False)
        s = np.maximum(s - shrink * s[0], 0.0)
        s[rank:] = 0.0
        z = (u * s) @ vt
    return np.where(observed, values, base + z)


def _additive(values: np.ndarray, observed: np.ndarray, iters: int = 100) -> np.ndarray:
    """mu + a_d + b_l fit to the observed cells (alternating means of the residuals)."""
    mu = float(values[observed].mean())
    a, b = np.zeros(values.shape[0]), np.zeros(values.shape[1])
    n_row, n_col = np.maximum(observed.sum(axis=1), 1), np.maximum(observed.sum(axis=0), 1)
    for _ in range(iters):
        a = np.where(observed, values - mu - b[None, :], 0.0).sum(axis=1) / n_row
        b = np.where(observed, values - mu - a[:, None], 0.0).sum(axis=0) / n_col
    return mu + a[:, None] + b[None, :]


# -------------------------------------------------------------------------------------------- selection


def layer_scores(values: np.ndarray, shares: np.ndarray, normalize_rows: bool = True) -> np.ndarray:
    """(L,) score per layer, the domains averaged with their shares of the plan.

    ``normalize_rows`` (the cell probes): each domain's row is clipped at 0 and scaled to max 1 first, so a
    domain with a large loss scale does not outvote the rest. The warm-up probe's cells are all in one
    unit (nats of held-out loss, from one shared adapter), and there scaling a domain whose rises are all
    small up to 1 would only amplify its noise; its rows are averaged as they are (a negative cell --
    switching that adapter off helped -- counts against the layer) and the result scaled to max 1.
    """
    w = shares / max(shares.sum(), 1e-12)
    if not normalize_rows:
        score = w @ values
        return score / max(float(np.abs(score).max()), 1e-12)
    v = np.clip(values, 0.0, None)
    v = v / np.maximum(v.max(axis=1, keepdims=True), 1e-12)
    return w @ v


def select_layers(score: np.ndarray, k: int, cost_weight: float) -> tuple[list[int], float]:
    """Greedy: add the layer that most increases sum(score) - cost_weight x depth; returns (layers, depth)."""
    n = len(score)
    chosen: list[int] = []
    k = min(k, n)
    for _ in range(k):
        best, best_gain = -1, -np.inf
        for layer in range(n):
            if layer in chosen:
                continue
            trial = chosen + [layer]
            gain = score[trial].sum() - cost_weight * (n - min(trial)) / n
            if gain > best_gain + 1e-12:
                best, best_gain = layer, gain
        chosen.append(best)
    chosen.sort()
    return chosen, (n - chosen[0]) / n if chosen else 0.0


def rank_pattern(score: np.ndarray, selected: list[int], base_rank: int) -> dict[str, int]:
    """Per-layer LoRA rank proportional to score (mean = base rank), within [base/4, base*4], at least 1."""
    s = score[selected]
    mean = max(float(s.mean()), 1e-12)
    return {str(layer): int(np.clip(round(base_rank * sc / mean), max(1, base_rank // 4), base_rank * 4))
            for layer, sc in zip(selected, s)}


# ---------------------------------------------------------------------------------------------- the stage


def probe_layers(model: Any, tokenizer: Any, examples: dict[str, list[tuple[str, str]]], shares: np.ndarray,
                 *, fraction: float, rank: int, steps: int, lr: float, targets: list[str], completion_rank: int,
                 k: int, cost_weight: float, base_rank: int, by_score: bool, seed: int,
                 progress: bool = False, method: str = "cells", batch_size: int = 16) -> LayerScores:
    """Score the (domain, layer) cells, then select ``k`` layers.

    ``method="cells"``: probe ``fraction`` of the cells with one-layer trial LoRAs and complete the rest.
    ``method="warmup"``: :func:`warmup_ablation` measures every cell (``fraction`` is not used).
    ``examples`` maps each probed domain to its top (prompt, reference) pairs; ``shares`` is each domain's
    share of the plan, in the same order.
    """
    import time

    from tqdm.auto import tqdm

    if method not in ("cells", "warmup"):
        raise ValueError(f"layer probe method {method!r}: expected 'cells' or 'warmup'")
    domains = list(examples)
    n_layers = len(decoder_layers(model))
    start = time.perf_counter()
    model.eval()  # no dropout: a probe must be repeatable
    for p in model.parameters():
        p.requires_grad_(False)
    if method == "warmup":
        mask = np.ones((len(domains), n_layers), dtype=bool)
        values = warmup_ablation(model, tokenizer, examples, rank=rank, steps=steps, lr=lr, batch_size=batch_size,
                                 targets=targets, seed=seed, progress=progress)
    else:
        mask = choose_cells(len(domains), n_layers, fraction, seed)
        values = np.zeros(mask.shape)
        batches = [encode_examples(tokenizer, examples[d]) for d in domains]
        cells = list(zip(*np.nonzero(mask)))
        for di, li in tqdm(cells, desc="layer probes", disable=None if progress else True):
            values[di, li] = probe_cell(model, batches[di], int(li), targets, rank, steps, lr, seed)
    seconds = time.perf_counter() - start
    filled = values if mask.all() else complete(values, mask, rank=completion_rank)
    score = layer_scores(filled, shares, normalize_rows=method == "cells")
    selected, depth = select_layers(score, k, cost_weight)
    pattern = rank_pattern(score, selected, base_rank) if by_score else {}
    return LayerScores(domains, filled, mask, score, selected, pattern, depth, seconds, method)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); 0.0 when either side is constant."""
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)
