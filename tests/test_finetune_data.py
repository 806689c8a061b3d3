"""adaptive_ft.finetune.data: split, formatting, answer-only labels, weighted sampling, length-grouped batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy import stats

from adaptive_ft.artifacts import run as run_art
from adaptive_ft.artifacts.plan import Plan
from adaptive_ft.errors import PlanError, TrainingError
from adaptive_ft.finetune import data as D
from adaptive_ft.lm import tokens as tk
from adaptive_ft.lm.models import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(["my card has not arrived", "card_arrival", "top up failed", "top_up_failed"])


def _examples(counts: dict[str, int]) -> pl.DataFrame:
    rows = [{"example_id": f"{d}-{i:03d}", "domain": d, "prompt": f"q {i} {d}", "reference": f"{d}_a"}
            for d, n in counts.items() for i in range(n)]
    return pl.DataFrame(rows)


def test_split_is_stratified_disjoint_and_order_independent() -> None:
    ex = _examples({"a": 10, "b": 20, "c": 1})
    s = D.split_examples(ex, val_fraction=0.1, test_fraction=0.2, seed=0)
    counts = {(d, sp): n for d, sp, n in s.group_by("domain", "split").len().iter_rows()}
    # round(10*0.2)=2 test, round(10*0.1)=1 val; round(20*.2)=4, round(20*.1)=2; a lone example stays in train
    assert counts == {("a", "test"): 2, ("a", "val"): 1, ("a", "train"): 7,
                      ("b", "test"): 4, ("b", "val"): 2, ("b", "train"): 14, ("c", "train"): 1}
    assert s["example_id"].n_unique() == s.height == ex.height
    shuffled = D.split_examples(ex.sample(fraction=1.0, shuffle=True, seed=5), 0.1, 0.2, seed=0)
    assert run_art.split_sha256(shuffled) == run_art.split_sha256(s)
    assert run_art.split_sha256(D.split_examples(ex, 0.1, 0.2, seed=1)) != run_art.split_sha256(s)


def test_select_examples_errors_name_the_domains() -> None:
    ex = _examples({"a": 3})
    with pytest.raises(PlanError, match=r"\['zzz'\]"):
        D.select_examples(ex, Plan.from_dict({"domains": ["a", "zzz"]}))
    with pytest.raises(TrainingError, match="no examples with a reference"):
        D.select_examples(ex.with_columns(pl.lit(None, pl.Utf8).alias("reference")), Plan.from_dict({"domains": ["a"]}))


def test_format_prompt_is_the_chat_template_with_a_short_system_turn(tok) -> None:
    assert tk.format_prompt(tok, "hi") == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_encoding_puts_answer_and_eos_after_the_prompt(tok) -> None:
    e = tk.encode_example(tok, "my card", "card_arrival", max_len=256)
    prompt_ids = tok(tk.format_prompt(tok, "my card"), add_special_tokens=False).input_ids
    answer_ids = tok("card_arrival", add_special_tokens=False).input_ids
    assert e.ids == prompt_ids + answer_ids + [tok.eos_token_id]
    assert e.n_prompt == len(prompt_ids) and not e.truncated


def test_truncation_keeps_the_answer_and_the_generation_prompt(tok) -> None:
    long_prompt = " ".join(["card"] * 200)
    e = tk.encode_example(tok, long_prompt, "card_arrival", max_len=40)
    full = tk.encode_example(tok, long_prompt, "card_arrival", max_len=10_000)
    assert e.truncated and len(e.ids) == 40
    assert e.ids[e.n_prompt:] == full.ids[full.n_prompt:]  # the whole answer with its end token
    assert e.ids[: e.n_prompt] == full.ids[full.n_prompt - e.n_prompt: full.n_prompt]  # the prompt's end


def test_collate_gives_loss_positions_for_answer_tokens_only() -> None:
    items = [tk.Encoded([5, 6, 7, 8, 9], n_prompt=3, truncated=False),   # answer 8, 9
             tk.Encoded([1, 2, 3], n_prompt=2, truncated=False)]         # answer 3
    b = tk.collate(items, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 0, 0]]
    # flat position t predicts token t+1: row 0 positions 2, 3 predict 8, 9; row 1 position 1 predicts 3
    assert b["predict_pos"].tolist() == [2, 3, 5 + 1]
    assert b["targets"].tolist() == [8, 9, 3]
    assert b["row"].tolist() == [0, 0, 1]
    assert b["n_tokens"] == 8 and b["n_padded"] == 10


def test_uniform_weights_draw_every_example_exactly_once_per_epoch() -> None:
    order = D.draw_epoch(np.full(50, 1 / 50), 50, seed=0, epoch=3)
    assert sorted(order.tolist()) == list(range(50))
    assert order.tolist() != list(range(50))  # shuffled
    assert D.draw_epoch(np.full(50, 1 / 50), 50, 0, 3).tolist() == order.tolist()  # reproducible


def test_weighted_sampling_follows_the_plan_weights() -> None:
    """Over many epochs, draw counts match the weights (chi-square), and each epoch is within one draw of n*w."""
    w = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
    n, epochs = 37, 400
    total = np.zeros(len(w))
    for epoch in range(epochs):
        counts = np.bincount(D.draw_epoch(w, n, seed=1, epoch=epoch), minlength=len(w))
        assert np.all(np.abs(counts - n * w) < 1 + 1e-9)  # residual sampling: floor or ceil of n*w
        total += counts
    expected = w * n * epochs
    assert stats.chisquare(total, expected).pvalue > 1e-3
    assert np.allclose(total / total.sum(), w, atol=0.005)


def test_sampling_weights_from_plan_examples_and_from_domain_shares() -> None:
    train = _examples({"a": 2, "b": 3})
    plan = Plan.from_dict({"domains": ["a", "b"], "examples": [
        {"example_id": "a-000", "domain": "a", "weight": 3.0}, {"example_id": "b-002", "domain": "b", "weight": 1.0}]})
    assert D.train_probabilities(train, plan).tolist() == [0.75, 0.0, 0.0, 0.0, 0.25]
    shares = Plan.from_dict({"domains": [{"domain": "a", "share": 0.8}, {"domain": "b", "share": 0.2}]})
    assert np.allclose(D.train_probabilities(train, shares), [0.4, 0.4, 0.2 / 3, 0.2 / 3, 0.2 / 3])
    assert D.train_probabilities(train, Plan.from_dict({"domains": ["a", "b"]})).tolist() == [0.2] * 5
    nothing = Plan.from_dict({"domains": ["a"], "examples": [{"example_id": "zz", "weight": 1.0}]})
    with pytest.raises(TrainingError, match="weight 0"):
        D.train_probabilities(train, nothing)


def test_length_grouping_cuts_padding_and_keeps_every_draw() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 200, size=1000)
    order = rng.permutation(1000)
    batches = D.length_grouped_batches(order, lengths, batch_size=16, seed=0, epoch=0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))

    def pad_fraction(bs: list[np.ndarray]) -> float:
        return 1 - sum(lengths[b].sum() for b in bs) / sum(lengths[b].max() * len(b) for b in bs)

    plain = [order[i:i + 16] for i in range(0, 1000, 16)]
    assert pad_fraction(plain) > 0.3 and pad_fraction(batches) < 0.05


def test_processes_draw_disjoint_shards_of_one_sample() -> None:
    w, lengths = np.full(100, 0.01), np.arange(100) % 7 + 5
    one = D.epoch_batches(w, lengths, 8, seed=0, epoch=0)
    r0 = D.epoch_batches(w, lengths, 8, seed=0, epoch=0, rank=0, world=2)
    r1 = D.epoch_batches(w, lengths, 8, seed=0, epoch=0, rank=1, world=2)
    assert len(r0) == len(r1) == len(one) // 2
    assert [b.tolist() for b in r0 + r1] == [b.tolist() for b in one[0:12:2] + one[1:12:2]]
