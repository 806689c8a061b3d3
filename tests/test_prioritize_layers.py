"""Layer probes, completion and selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptive_ft.lm.tokens import encode_example, format_prompt
from adaptive_ft.prioritize.layers import (
    choose_cells,
    complete,
    decoder_layers,
    encode_examples,
    layer_scores,
    probe_cell,
    probe_layers,
    rank_pattern,
    select_layers,
    spearman,
    split_probe_examples,
    warmup_ablation,
)

TEXTS = ["how do I reset my card pin", "my transfer has not arrived", "what is the exchange rate",
         "card_pin", "transfer_pending", "exchange_rate", "why was I charged twice", "duplicate_charge"]


def test_completion_recovers_a_planted_low_rank_matrix():
    rng = np.random.default_rng(0)
    d, l_ = 8, 30  # the shape of 8 domains x SmolLM2's 30 layers
    rows, cols = rng.normal(size=(d, 1)), rng.normal(size=(1, l_))
    truth = 1.0 + rows + cols + 0.5 * rng.normal(size=(d, 1)) @ rng.normal(size=(1, l_))
    mask = choose_cells(d, l_, 0.5, seed=0)
    filled = complete(np.where(mask, truth, 0.0), mask, rank=1, shrink=0.0)
    assert (filled[mask] == truth[mask]).all()  # measured cells are kept as measured
    assert np.median(np.abs(filled - truth)[~mask]) < 0.2  # the interaction has sd 0.5
    assert spearman(filled[~mask], truth[~mask]) > 0.95
    # a purely additive matrix (layer effect + domain effect) is recovered exactly
    additive = 1.0 + rows + cols
    assert complete(np.where(mask, additive, 0.0), mask, rank=1) == pytest.approx(additive, abs=1e-6)


def test_choose_cells_covers_every_row_and_column():
    mask = choose_cells(4, 10, 0.5, seed=1)
    assert (mask.sum(axis=0) == 2).all()  # every layer measured for half the domains
    assert mask.sum(axis=1).min() == 5 == mask.sum(axis=1).max()  # and every domain as often
    assert (choose_cells(6, 10, 0.1, seed=1).sum(axis=0) == 2).all()  # at least 2 per layer: identifiable
    assert choose_cells(3, 5, 1.0, 0).all()


def test_selection_by_score_and_by_cost():
    score = np.array([0.9, 0.1, 0.2, 0.8, 0.7, 0.3])
    assert select_layers(score, 2, cost_weight=0.0) == ([0, 3], 1.0)
    # adapting layer 0 means a backward pass through all 6 layers: a cost weight of 1 moves the choice up
    chosen, depth = select_layers(score, 2, cost_weight=1.0)
    assert chosen == [3, 4] and depth == pytest.approx(3 / 6)


def test_layer_scores_normalize_each_domain_and_weigh_shares():
    values = np.array([[2.0, 1.0], [0.1, 0.4]])  # domain 0 on a 5x larger loss scale
    assert layer_scores(values, np.array([0.5, 0.5])) == pytest.approx([(1.0 + 0.25) / 2, (0.5 + 1.0) / 2])
    # the warm-up's cells share one unit: averaged as they are (a negative cell counts against), then max 1
    raw = np.array([[0.02, 0.01, -0.01], [0.4, 0.1, 0.0]])
    assert layer_scores(raw, np.array([0.5, 0.5]), normalize_rows=False) == pytest.approx([1.0, 0.11 / 0.42, -0.01 / 0.42])


def test_rank_pattern_scales_with_score():
    assert rank_pattern(np.array([0.2, 0.4, 0.6]), [0, 1, 2], 8) == {"0": 4, "1": 8, "2": 12}


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from adaptive_ft.lm.models import load_model

    torch.set_num_threads(1)
    folder = tiny_model(texts=TEXTS, n_layers=4, hidden=32)
    return load_model(folder)


def test_answer_tokens_only_carry_loss(tiny):
    _, tok = tiny
    pairs = [("reset my pin", "card_pin"), ("what is the exchange rate today", "exchange_rate")]
    batch = encode_examples(tok, pairs)
    for row, (prompt, answer) in enumerate(pairs):
        trained = encode_example(tok, prompt, answer, 256)  # what training feeds the model for this example
        head, full = trained.ids[: trained.n_prompt], trained.ids
        # the probe sees training's token ids: the same system turn, template and end token
        assert batch["input_ids"][row, : len(full)].tolist() == full
        assert tok.decode(head) == format_prompt(tok, prompt)
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        # exactly the answer's positions carry labels, and each label is the token at its position
        assert (labels[: len(head)] == -100).all() and (labels[len(full):] == -100).all()
        assert labels[len(head): len(full)].tolist() == full[len(head):] == ids[len(head): len(full)].tolist()
        assert tok.decode(full[len(head):]).startswith(answer)
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_probe_prompts_carry_trainings_system_turn(tiny):
    """A template with a default system prompt (SmolLM2's) must not inject it into the probe's prompts."""
    _, tok = tiny
    saved = tok.chat_template
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are SmolLM<|im_end|>\n"
                         "{% endif %}" + saved)
    try:
        ids = encode_examples(tok, [("reset my pin", "card_pin")])["input_ids"][0].tolist()
        assert "You are SmolLM" not in tok.decode(ids)
        assert ids == encode_example(tok, "reset my pin", "card_pin", 256).ids
    finally:
        tok.chat_template = saved


def test_probe_leaves_the_model_unchanged_and_is_repeatable(tiny):
    model, tok = tiny
    for p in model.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = encode_examples(tok, [("reset my pin", "card_pin"), ("why was I charged twice", "duplicate_charge")])
    a = probe_cell(model, batch, 1, ["q_proj", "v_proj", "down_proj"], rank=2, steps=3, lr=1e-2, seed=0)
    b = probe_cell(model, batch, 1, ["q_proj", "v_proj", "down_proj"], rank=2, steps=3, lr=1e-2, seed=0)
    assert a == b and np.isfinite(a) and a > 0  # a few steps on the batch lower its loss
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())


def test_probe_layers_records_measured_and_completed_cells(tiny):
    model, tok = tiny
    examples = {"cards": [("reset my pin", "card_pin")], "transfers": [("my transfer has not arrived", "transfer_pending")],
                "fx": [("what is the exchange rate", "exchange_rate")]}
    res = probe_layers(model, tok, examples, np.array([0.5, 0.3, 0.2]), fraction=0.5, rank=2, steps=2, lr=1e-2,
                       targets=["q_proj", "v_proj"], completion_rank=1, k=2, cost_weight=0.0, base_rank=8,
                       by_score=True, seed=0)
    assert res.values.shape == (3, 4) and np.isfinite(res.values).all()
    assert res.measured.sum() == 8 and (res.measured.sum(axis=0) == 2).all()  # round(0.5 x 3) -> at least 2
    assert len(res.selected) == 2 and set(res.rank_pattern) == {str(i) for i in res.selected}


WARMUP_EXAMPLES = {"cards": [("reset my pin", "card_pin"), ("how do I reset my card pin", "card_pin")],
                   "transfers": [("my transfer has not arrived", "transfer_pending"),
                                 ("why was I charged twice", "duplicate_charge")],
                   "fx": [("what is the exchange rate", "exchange_rate"), ("exchange rate", "exchange_rate")]}


def test_split_probe_examples_holds_out_a_quarter():
    pairs = [(str(i), str(i)) for i in range(8)]
    fit, held = split_probe_examples(pairs)
    assert held == [pairs[3], pairs[7]] and len(fit) == 6 and not set(fit) & set(held)
    assert split_probe_examples(pairs[:2]) == (pairs[:1], pairs[1:2])
    assert split_probe_examples(pairs[:1]) == (pairs[:1], pairs[:1])


def test_warmup_ablation_scores_what_each_layer_adapter_carries(tiny):
    model, tok = tiny
    for p in model.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(rank=2, lr=2e-2, batch_size=4, targets=["q_proj", "v_proj"], seed=0)
    # untrained, every adapter is zero (B = 0): switching one off changes nothing
    assert (warmup_ablation(model, tok, WARMUP_EXAMPLES, steps=0, **kw) == 0).all()
    a = warmup_ablation(model, tok, WARMUP_EXAMPLES, steps=6, **kw)
    assert a.shape == (3, 4) and np.isfinite(a).all() and np.abs(a).max() > 0
    assert (a == warmup_ablation(model, tok, WARMUP_EXAMPLES, steps=6, **kw)).all()  # seeded: repeatable
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())
    # a layer whose q/v inputs are all zero cannot carry anything: its column must be exactly 0
    norm = decoder_layers(model)[2].input_layernorm.weight
    saved = norm.detach().clone()
    try:
        with torch.no_grad():
            norm.zero_()
        dead = warmup_ablation(model, tok, WARMUP_EXAMPLES, steps=6, **kw)
    finally:
        with torch.no_grad():
            norm.copy_(saved)
    assert (dead[:, 2] == 0).all() and np.abs(np.delete(dead, 2, axis=1)).max() > 0


def test_warmup_ablation_fast_path_gives_the_whole_forward_losses(tiny):
    """Answer-position logits plus replayed lower layers must equal plain ``model(**batch).loss`` passes."""
    model, tok = tiny
    for p in model.parameters():
        p.requires_grad_(False)
    kw = dict(rank=2, lr=2e-2, batch_size=4, targets=["q_proj", "v_proj", "down_proj"], seed=1, steps=6)
    fast = warmup_ablation(model, tok, WARMUP_EXAMPLES, fast=True, **kw)
    slow = warmup_ablation(model, tok, WARMUP_EXAMPLES, fast=False, **kw)
    assert np.abs(slow).max() > 1e-3  # something to compare
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-5)
    layers = decoder_layers(model)
    assert not any("forward" in vars(layer) for layer in layers)  # every replayed layer computes again
    assert not any(m._forward_hooks for m in model.modules())


def test_probe_layers_warmup_measures_every_cell(tiny):
    model, tok = tiny
    res = probe_layers(model, tok, WARMUP_EXAMPLES, np.array([0.5, 0.3, 0.2]), fraction=0.25, rank=2, steps=4,
                       lr=2e-2, targets=["q_proj", "v_proj"], completion_rank=1, k=2, cost_weight=0.0, base_rank=8,
                       by_score=False, seed=0, method="warmup", batch_size=4)
    assert res.method == "warmup" and res.measured.all() and res.values.shape == (3, 4)
    assert res.selected == sorted(np.argsort(-res.layer_score)[:2].tolist())  # weight 0: the top 2 by score
    with pytest.raises(ValueError, match="cells"):
        probe_layers(model, tok, WARMUP_EXAMPLES, np.ones(3), fraction=0.5, rank=2, steps=1, lr=1e-2,
                     targets=["q_proj"], completion_rank=1, k=2, cost_weight=0.0, base_rank=8, by_score=False,
                     seed=0, method="oneshot")


def test_spearman_helper():
    assert spearman(np.array([1, 2, 3.0]), np.array([10, 20, 30.0])) == pytest.approx(1.0)
    assert spearman(np.array([1, 1, 1.0]), np.array([1, 2, 3.0])) == 0.0
