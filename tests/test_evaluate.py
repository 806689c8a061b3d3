"""Evaluation: traffic-weighted cells computed by hand, too-small cells withheld, planted segment drops flagged,
the representation audit, and eval.json's contract on a tiny run end to end."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.metrics import precision_recall_fscore_support

from adaptive_ft.config import EvaluateConfig
from adaptive_ft.evaluate import ModelScores, evaluate, representation, summarize
from adaptive_ft.lm.answers import parse_label

LABELS = ["card_arrival", "card_declined", "exchange_rate", "transfer_pending"]


def _test_frame(n: int = 8) -> pl.DataFrame:
    refs = [LABELS[i % 4] for i in range(n)]
    return pl.DataFrame({"example_id": [f"e{i}" for i in range(n)], "split": ["test"] * n,
                         "domain": ["cards" if r.startswith("card") else "transfers" for r in refs],
                         "prompt": [f"q{i}" for i in range(n)], "reference": refs})


def _traffic(rows: list[tuple[str, str, int]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"example_id": pl.String, "segment": pl.String, "n": pl.Int64}, orient="row")


def _scored(test: pl.DataFrame, answers: list[str | None]) -> ModelScores:
    index = {label: i for i, label in enumerate(LABELS)}
    refs = test["reference"].to_list()
    return ModelScores([a or "?" for a in answers], correct=np.array([a == r for a, r in zip(answers, refs)], float),
                  pred_idx=np.array([index.get(a, -1) if a else -1 for a in answers]))


def _cell(data: dict, model: str, scope: str, metric: str, segment=None, domain=None) -> dict:
    (row,) = [r for r in data["metrics"] if r["model"] == model and r["scope"] == scope and r["metric"] == metric
              and r["segment"] == segment and r["domain"] == domain]
    return row


CFG = EvaluateConfig(bootstrap=200, min_count=3, min_examples=2)


def test_segment_cells_count_each_example_as_often_as_the_segment_asked_it():
    test = _test_frame(4)
    # free asks e0 three times and e1 once; pro asks e1, e2, e3 twice each.
    traffic = _traffic([("e0", "free", 3), ("e1", "free", 1), ("e1", "pro", 2), ("e2", "pro", 2), ("e3", "pro", 2)])
    answers = ["card_arrival", "wrong", "exchange_rate", None]   # e0, e2 right
    data = summarize(test, test, traffic, {"m": _scored(test, answers)}, "label", LABELS, CFG)
    free = _cell(data, "m", "segment", "accuracy", segment="free")
    assert (free["value"], free["n"], free["n_examples"]) == (0.75, 4, 2)     # (3*1 + 1*0) / 4
    pro = _cell(data, "m", "segment", "accuracy", segment="pro")
    assert pro["value"] == pytest.approx(2 / 6) and pro["n"] == 6
    overall = _cell(data, "m", "overall", "accuracy")
    assert overall["value"] == pytest.approx(5 / 10) and overall["n"] == 10
    assert data["n_test_queries"] == 10 and data["n_test_examples"] == 4
    # Too little traffic: free x transfers has 1 query (e1) -> withheld, not a number.
    small = _cell(data, "m", "segment_domain", "accuracy", segment="free", domain="cards")
    assert small["n"] == 4 and small["enough"]
    thin = _cell(data, "m", "segment_domain", "accuracy", segment="free", domain="transfers")
    assert thin["n"] == 0 and thin["enough"] is False and thin["value"] is None
    assert data["worst_segment"] == {"model": "m", "segment": "pro", "metric": "accuracy", "value": pytest.approx(1 / 3)}
    assert data["largest_gap"]["best"] == "free" and data["largest_gap"]["gap"] == pytest.approx(0.75 - 1 / 3)


def test_macro_cells_match_sklearn_on_the_expanded_queries():
    rng = np.random.default_rng(0)
    test = _test_frame(40)
    counts = rng.integers(1, 5, 40)
    traffic = _traffic([(f"e{i}", "all", int(c)) for i, c in enumerate(counts)])
    answers = [LABELS[int(rng.integers(0, 4))] if rng.random() < 0.8 else None for _ in range(40)]
    data = summarize(test, test, traffic, {"m": _scored(test, answers)}, "label", LABELS, CFG)
    theirs = precision_recall_fscore_support(test["reference"].to_list(), [a or "none" for a in answers],
                                             labels=LABELS, average="macro", zero_division=0, sample_weight=counts)
    for metric, value in zip(("precision", "recall", "f1"), theirs[:3]):
        row = _cell(data, "m", "overall", metric)
        assert row["value"] == pytest.approx(value, abs=1e-6)  # eval.json rounds to 6 places
        assert row["ci_low"] <= row["value"] <= row["ci_high"]


def test_a_planted_drop_in_one_segment_is_flagged_and_only_there():
    test = _test_frame(40)
    ids = test["example_id"].to_list()
    # free asks the first 20 examples, pro the last 20; fine-tuning broke exactly free's examples.
    traffic = _traffic([(e, "free" if i < 20 else "pro", 3) for i, e in enumerate(ids)])
    refs = test["reference"].to_list()
    base = _scored(test, refs)
    tuned = _scored(test, [None if i < 16 else r for i, r in enumerate(refs)])
    data = summarize(test, test, traffic, {"base": base, "runs/r1": tuned}, "label", LABELS, CFG)
    assert [(f["segment"], f["model"]) for f in data["flags"]] == [("free", "runs/r1")]
    flag = data["flags"][0]
    assert flag["base"] == 1.0 and flag["finetuned"] == pytest.approx(0.2) and flag["delta"] == pytest.approx(-0.8)
    assert flag["ci_high"] < 0 and flag["reason"] == "dropped from base to fine-tuned"
    pro = [d for d in data["deltas"] if d["segment"] == "pro"][0]
    assert pro["delta"] == 0.0


def test_bootstrap_intervals_are_reproducible():
    test = _test_frame(30)
    traffic = _traffic([(f"e{i}", "s", 1 + i % 3) for i in range(30)])
    scored = {"m": _scored(test, [LABELS[i % 3] for i in range(30)])}
    a = summarize(test, test, traffic, scored, "label", LABELS, CFG)
    b = summarize(test, test, traffic, scored, "label", LABELS, CFG)
    assert a["metrics"] == b["metrics"]
    other = summarize(test, test, traffic, scored, "label", LABELS, EvaluateConfig(bootstrap=200, min_count=3,
                                                                                   min_examples=2, seed=1))
    assert _cell(a, "m", "overall", "accuracy")["ci_low"] != _cell(other, "m", "overall", "accuracy")["ci_low"] or \
        _cell(a, "m", "overall", "accuracy")["ci_high"] != _cell(other, "m", "overall", "accuracy")["ci_high"]


def test_intervals_are_the_metrics_modules_bootstrap_on_each_cells_weights():
    """eval.json's intervals come from metrics.bootstrap_ci / paired_bootstrap_delta (tested in test_metrics) on
    the cell's query weights and the cell's seed: the bootstrap users see is the tested one."""
    from adaptive_ft.evaluate import _seed, cell_weights
    from adaptive_ft.metrics import bootstrap_ci, paired_bootstrap_delta, weighted_mean

    rng = np.random.default_rng(5)
    test = _test_frame(40)
    traffic = _traffic([(f"e{i}", "free" if i % 3 else "pro", int(rng.integers(1, 5))) for i in range(40)])
    refs = test["reference"].to_list()
    scored = {"base": _scored(test, [r if rng.random() < 0.7 else None for r in refs]),
              "m": _scored(test, [r if rng.random() < 0.8 else None for r in refs])}
    data = summarize(test, test, traffic, scored, "label", LABELS, CFG)
    cells, _, _ = cell_weights(test, traffic)
    for key in (("overall", None, None), ("segment", "free", None), ("segment_domain", "pro", "cards")):
        w = cells[key]
        idx = np.flatnonzero(w > 0)
        base, tuned = scored["base"].correct[idx], scored["m"].correct[idx]
        low, high = bootstrap_ci(lambda x: weighted_mean(tuned, x), w[idx], CFG.bootstrap, _seed(CFG, key))
        row = _cell(data, "m", key[0], "accuracy", segment=key[1], domain=key[2])
        assert (row["ci_low"], row["ci_high"]) == (round(low, 6), round(high, 6)) and low < high, key
    w = cells[("segment", "free", None)]
    idx = np.flatnonzero(w > 0)
    delta, low, high = paired_bootstrap_delta(lambda x: weighted_mean(scored["base"].correct[idx], x),
                                              lambda x: weighted_mean(scored["m"].correct[idx], x), w[idx],
                                              CFG.bootstrap, _seed(CFG, ("segment", "free", None)))
    (row,) = [d for d in data["deltas"] if d["segment"] == "free"]
    assert (row["delta"], row["ci_low"], row["ci_high"]) == (round(delta, 6), round(low, 6), round(high, 6))


def test_representation_audit_by_hand():
    split = pl.DataFrame({"example_id": ["a", "b", "c", "d"], "domain": ["x", "x", "x", "y"],
                          "split": ["train", "train", "train", "test"]})
    # a: free only; b: free 1, pro 3; c: pro only; d (test): pro 10 -> traffic free 2/16, pro 14/16.
    traffic = _traffic([("a", "free", 1), ("b", "free", 1), ("b", "pro", 3), ("c", "pro", 1), ("d", "pro", 10)])
    rows = {(r["kind"], r["name"]): r for r in representation(split, traffic, 0.8)}
    # Training shares: free = (1 + 1/4) / 3, pro = (3/4 + 1) / 3.
    assert rows[("segment", "free")]["train_share"] == pytest.approx(1.25 / 3)
    assert rows[("segment", "pro")]["train_share"] == pytest.approx(1.75 / 3)
    assert rows[("segment", "pro")]["traffic_share"] == pytest.approx(14 / 16)
    assert rows[("segment", "pro")]["underserved"] and not rows[("segment", "free")]["underserved"]
    assert rows[("domain", "y")] == {"kind": "domain", "name": "y", "train_share": 0.0,
                                     "traffic_share": pytest.approx(10 / 16), "underserved": True}
    # With the run's sampling weights, the audit reads the sample drawn, not the examples eligible.
    weighted = split.with_columns(weight=pl.Series([0.5, 0.25, 0.25, 0.0]))
    rows = {(r["kind"], r["name"]): r for r in representation(weighted, traffic, 0.8)}
    assert rows[("segment", "free")]["train_share"] == pytest.approx(0.5 + 0.25 / 4)
    assert rows[("segment", "pro")]["train_share"] == pytest.approx(0.25 * 3 / 4 + 0.25)
    assert rows[("domain", "x")]["train_share"] == pytest.approx(1.0)


def test_parse_label():
    index = {label: i for i, label in enumerate(LABELS)}
    assert parse_label(" Card_Arrival.\nbecause...", index) == "card_arrival"
    assert parse_label("I think card_arrival", index) is None
    assert parse_label("", index) is None
    # a label with its own trailing punctuation (Banking77's "reverted_card_payment?") matches itself
    punct = {"reverted_card_payment?": 0, "card_arrival": 1}
    assert parse_label("reverted_card_payment?", punct) == "reverted_card_payment?"
    assert parse_label("Reverted_card_payment.", punct) == "reverted_card_payment?"
    assert parse_label("x?", {"x": 0, "x?": 1}) == "x?" and parse_label("x", {"x": 0, "x?": 1}) == "x"


@pytest.fixture(scope="module")
def tiny(tiny_run):
    torch.set_num_threads(1)
    return tiny_run()


def _store_with_traffic(path, split: pl.DataFrame) -> None:
    from adaptive_ft.store import Store

    with Store.open(path) as s:
        rows = []
        for i, e in enumerate(split.filter(pl.col("split") == "test")["example_id"].to_list()):
            for seg, n in (("free", 3 + i), ("pro", 2)):
                rows += [(f"{e}-{seg}-{k}", f"u-{seg}", seg, e, "impression") for k in range(n)]
        s.con.executemany("INSERT INTO events (event_id, ts, user_id, segment, example_id, event, batch_id) "
                          "VALUES (?, TIMESTAMP '2026-01-01', ?, ?, ?, ?, 1)", rows)


def test_end_to_end_on_a_tiny_run_writes_the_contract(tiny, tmp_path):
    store = tmp_path / "s.duckdb"
    _store_with_traffic(store, pl.read_parquet(tiny / "split.parquet"))
    out = tmp_path / "eval.json"
    cfg = EvaluateConfig(bootstrap=50, min_count=5, min_examples=2, max_new_tokens=4)
    result = evaluate(store, ["base", str(tiny)], out, cfg)
    data = json.loads(out.read_text())
    for key in ("task", "models", "primary_metric", "n_test_examples", "n_test_queries", "metrics", "worst_segment",
                "largest_gap", "flags", "representation", "variants"):
        assert key in data, key
    assert data["models"] == ["base", str(tiny)] and data["task"] == "label" and data["primary_metric"] == "accuracy"
    assert data["n_test_examples"] == 6 and data["n_test_queries"] == sum(3 + i + 2 for i in range(6))
    scopes = {r["scope"] for r in data["metrics"]}
    assert scopes == {"overall", "segment", "domain", "segment_domain"}
    free = _cell(data, "base", "segment", "accuracy", segment="free")
    assert free["n"] == sum(3 + i for i in range(6)) and free["n_examples"] == 6
    outputs = pl.read_parquet(result.outputs_path)
    assert outputs.height == 12 and set(outputs["model"]) == {"base", str(tiny)}


def test_text_task_reports_loss_and_perplexity(tiny, tmp_path):
    manifest = json.loads((tiny / "manifest.json").read_text())
    manifest["task"] = "text"
    (tiny / "manifest.json").write_text(json.dumps(manifest))
    try:
        data = evaluate(None, [str(tiny)], tmp_path / "e.json",
                        EvaluateConfig(bootstrap=50, min_count=2, min_examples=2, max_new_tokens=3)).data
    finally:
        manifest["task"] = "label"
        (tiny / "manifest.json").write_text(json.dumps(manifest))
    loss = _cell(data, str(tiny), "overall", "loss")
    ppl = _cell(data, str(tiny), "overall", "perplexity")
    assert loss["value"] > 0 and ppl["value"] == pytest.approx(np.exp(loss["value"]), rel=1e-4)
    assert data["primary_metric"] == "token_f1" and data["n_test_queries"] == 6  # no store: each example once


def test_export_variants_evaluate_like_the_run_and_carry_their_figures(tiny, tmp_path):
    from adaptive_ft.config import ExportConfig
    from adaptive_ft.export import export

    export(tiny, tmp_path / "export", ExportConfig(variants=["int8", "gguf"], gguf_types=["q8_0"], probe_prompts=4,
                                                   latency_prompts=1, latency_tokens=2))
    int8, gguf = str(tmp_path / "export" / "int8"), str(tmp_path / "export" / "model-q8_0.gguf")
    cfg = EvaluateConfig(bootstrap=20, min_count=2, min_examples=2, max_new_tokens=4)
    result = evaluate(None, [str(tiny), int8, gguf], tmp_path / "eval.json", cfg)
    assert set(result.data["variants"]) == {int8, gguf}
    assert result.data["variants"][gguf]["size_bytes"] == (tmp_path / "export" / "model-q8_0.gguf").stat().st_size
    outputs = pl.read_parquet(result.outputs_path)
    answers = {m: outputs.filter(pl.col("model") == m).sort("example_id")["response"].to_list()
               for m in (str(tiny), gguf)}
    # The merged Q8_0 GGUF, read back by transformers with its own tokenizer, answers as the adapter run does.
    same = sum(a == b for a, b in zip(answers[str(tiny)], answers[gguf]))
    assert same >= 5, answers


def test_evaluate_command(tiny, tmp_path):
    from click.testing import CliRunner

    from adaptive_ft.cli import cli

    store = tmp_path / "s.duckdb"
    _store_with_traffic(store, pl.read_parquet(tiny / "split.parquet"))
    result = CliRunner().invoke(cli, ["evaluate", "--store", str(store), "--models", f"base,{tiny}", "--out",
                                      str(tmp_path / "e.json"), "evaluate.bootstrap=30", "evaluate.min_count=5",
                                      "evaluate.min_examples=2", "evaluate.max_new_tokens=2"])
    assert result.exit_code == 0, result.output
    assert "test examples" in result.output and (tmp_path / "e.json").is_file()


def test_the_run_is_found_from_an_export_variant(tmp_path):
    from adaptive_ft.evaluate import find_run

    (tmp_path / "export" / "int8").mkdir(parents=True)
    (tmp_path / "export" / "manifest.json").write_text(json.dumps({"run": "runs/r1", "variants": []}))
    assert str(find_run([str(tmp_path / "export" / "int8")], None)) == "runs/r1"
    assert str(find_run([str(tmp_path / "export" / "model-q8_0.gguf")], None)) == "runs/r1"
    with pytest.raises(Exception, match="--run"):
        find_run(["base"], None)


def test_an_export_folder_stands_for_its_variants(tmp_path):
    from adaptive_ft.evaluate import expand_models

    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "manifest.json").write_text(json.dumps(
        {"run": "runs/r1", "variants": [{"path": "merged"}, {"path": "model-q8_0.gguf"}]}))
    ex = str(tmp_path / "export")
    assert expand_models(["base", ex]) == ["base", f"{ex}/merged", f"{ex}/model-q8_0.gguf"]


def test_max_examples_scores_a_seeded_subset(tiny, tmp_path):
    cfg = EvaluateConfig(bootstrap=20, min_count=2, min_examples=2, max_new_tokens=2, max_examples=3)
    first = evaluate(None, [str(tiny)], tmp_path / "a.json", cfg)
    again = evaluate(None, [str(tiny)], tmp_path / "b.json", cfg)
    assert first.data["n_test_examples"] == 3
    ids = pl.read_parquet(first.outputs_path)["example_id"].to_list()
    assert ids == pl.read_parquet(again.outputs_path)["example_id"].to_list() and len(set(ids)) == 3


def test_forced_answers_are_exactly_the_greedy_answers(tiny):
    """The teacher-forced shortcut returns a reference exactly where greedy decoding produces it."""
    from transformers import AutoModelForCausalLM

    from adaptive_ft.lm.answers import forced_answers, generate
    from adaptive_ft.lm.tokens import format_for_model
    from tests.ship_helpers import TEXTS, tiny_tokenizer

    base = tiny / "base" if (tiny / "base").is_dir() else tiny.parent / "base"
    model, tok = AutoModelForCausalLM.from_pretrained(base).eval(), tiny_tokenizer()
    prompts = [format_for_model(tok, t) for t in TEXTS[:10]]
    greedy = generate(model, tok, prompts, max_new_tokens=12, batch_size=4)
    # references: what greedy says (hits), then the same with a word changed (misses)
    refs = greedy[:5] + [g + " card" for g in greedy[5:]]
    forced = forced_answers(model, tok, prompts, refs, batch_size=3, max_new_tokens=12)
    hits = [i for i, f in enumerate(forced) if f is not None]
    assert hits, (greedy, forced)  # the base is fit to answer these: some references are greedy's own answers
    assert all(forced[i] is None for i in range(5, 10))  # a changed word is never taken for greedy's answer
    for i, (f, g) in enumerate(zip(forced, greedy)):
        if f is not None:  # whatever the shortcut takes is exactly what decoding said
            assert f.strip() == g.strip(), (i, f, g)
        elif i < 5:  # a reference greedy does produce is only missed when decoding ran out of tokens before its end
            n = len(tok(g, add_special_tokens=False).input_ids)
            assert n >= 11, (i, g)
    # a reference longer than the decoding budget would be cut short by greedy decoding: not taken
    assert forced_answers(model, tok, prompts[:1], refs[:1], batch_size=1, max_new_tokens=1) == [None] \
        or len(tok(refs[0], add_special_tokens=False).input_ids) <= 1


def test_evaluating_with_the_shortcut_gives_the_same_answers_as_decoding_all(tiny, tmp_path):
    import dataclasses

    cfg = EvaluateConfig(bootstrap=20, min_count=2, min_examples=2, max_new_tokens=12)
    fast = evaluate(None, ["base", str(tiny)], tmp_path / "fast.json", cfg)
    slow = evaluate(None, ["base", str(tiny)], tmp_path / "slow.json", dataclasses.replace(cfg, decode_all=True))
    a = pl.read_parquet(fast.outputs_path).sort("model", "example_id")
    b = pl.read_parquet(slow.outputs_path).sort("model", "example_id")
    labels = {label: i for i, label in enumerate(fast.data["labels"])}
    # the same label named, the same score; the fast answer is decoding's text up to where its label was decided
    assert [parse_label(r, labels) for r in a["response"]] == [parse_label(r, labels) for r in b["response"]]
    assert a["score"].to_list() == b["score"].to_list()
    assert all(y.strip().startswith(x.strip()) for x, y in zip(a["response"], b["response"]))
    assert [m["value"] for m in fast.data["metrics"]] == [m["value"] for m in slow.data["metrics"]]


def test_label_answers_skip_only_the_decoding_that_cannot_name_a_label(tiny, monkeypatch):
    """Lenient matches (case, punctuation) still count; answers ruled out by their first token are not decoded."""
    from transformers import AutoModelForCausalLM

    import adaptive_ft.lm.answers as E
    from adaptive_ft.lm.tokens import format_for_model
    from tests.ship_helpers import TEXTS, tiny_tokenizer

    base = tiny / "base" if (tiny / "base").is_dir() else tiny.parent / "base"
    model, tok = AutoModelForCausalLM.from_pretrained(base).eval(), tiny_tokenizer()
    prompts = [format_for_model(tok, t) for t in TEXTS[:10]]
    greedy = E.generate(model, tok, prompts, max_new_tokens=12, batch_size=4)
    # references greedy names only leniently (the forced pass rejects them) or verbatim, and for the answers
    # that start like no label ("as..."), an unrelated label: those are decided by their first token
    lead = "as"
    refs = ["zz_other" if g.startswith(lead) else g.strip().upper() + "." if i % 2 == 0 else g
            for i, g in enumerate(greedy)]
    ruled_out = [i for i, g in enumerate(greedy) if g.startswith(lead)]
    assert 2 <= len(ruled_out) <= 8 and not any(r.lower().startswith(lead) for r in refs)
    labels = sorted(set(refs))
    index = {label: i for i, label in enumerate(labels)}
    decoded = []
    cont = E._continue_greedy
    monkeypatch.setattr(E, "_continue_greedy", lambda *a: decoded.extend(a[3]) or cont(*a))
    fast = E.label_responses(model, tok, prompts, refs, labels, batch_size=3, max_new_tokens=12)
    assert [parse_label(r, index) for r in fast] == [parse_label(g, index) for g in greedy]
    lenient = [i for i, r in enumerate(refs) if r.endswith(".")]
    assert lenient and all(parse_label(fast[i], index) == refs[i] for i in lenient)  # lenient matches count
    assert decoded  # the lenient ones were decoded on
    decoded.clear()
    alone = E.label_responses(model, tok, [prompts[i] for i in ruled_out], [refs[i] for i in ruled_out], labels,
                              batch_size=3, max_new_tokens=12)
    assert not decoded and all(parse_label(r, index) is None for r in alone)  # decided by the forced pass alone
    assert all(g.strip().startswith(f.strip()) for f, g in zip(fast, greedy))


def test_decoding_on_from_the_forced_pass_where_greedy_leaves_the_reference_is_greedy_decoding(tiny):
    """References that greedy follows for a while and then leaves: decoding resumes from the forced pass's KV
    cache (the reference's later tokens masked out) and must say what decoding from scratch says."""
    from transformers import AutoModelForCausalLM

    import adaptive_ft.lm.answers as E
    from adaptive_ft.lm.tokens import format_for_model
    from tests.ship_helpers import TEXTS, tiny_tokenizer

    base = tiny / "base" if (tiny / "base").is_dir() else tiny.parent / "base"
    model, tok = AutoModelForCausalLM.from_pretrained(base).eval(), tiny_tokenizer()
    prompts = [format_for_model(tok, t) for t in TEXTS[:10]]
    greedy = E.generate(model, tok, prompts, max_new_tokens=12, batch_size=4)
    ids = [tok(g, add_special_tokens=False).input_ids for g in greedy]
    # each reference: greedy's first half, then other tokens (a different answer's end); greedy's answers are labels
    refs = [tok.decode(a[:len(a) // 2] + ids[(i + 1) % 10][len(ids[(i + 1) % 10]) // 2:]) for i, a in enumerate(ids)]
    left = [i for i in range(10) if refs[i] != greedy[i] and len(ids[i]) >= 4]
    assert len(left) >= 5
    labels = sorted(set(greedy) | set(refs))
    index = {label: i for i, label in enumerate(labels)}
    fast = E.label_responses(model, tok, prompts, refs, labels, batch_size=4, max_new_tokens=12)
    assert [parse_label(f, index) for f in fast] == [parse_label(g, index) for g in greedy]
    assert all(fast[i].strip() == greedy[i].strip() for i in left if parse_label(greedy[i], index) is not None)


def test_a_partial_answer_is_ruled_out_only_when_no_continuation_names_a_label():
    """could_name_label / first_line_done against parse_label itself, on every prefix of random answers."""
    import random

    from adaptive_ft.lm.answers import could_name_label, first_line_done, label_keys

    rng = random.Random(0)
    labels = LABELS + ["reverted_card_payment?", "x?", "x", "Top up", "\u03a3igma"]
    index = {label: i for i, label in enumerate(labels)}
    keys = label_keys(labels)
    noise = [" ", "\n", "\t", ".", "?", "*", "_", "'", "card", "x", "up", "\u03c3", "\u03c2", "I think "]
    checked = 0
    for _ in range(3000):
        label = rng.choice(labels)
        named = "".join(c.upper() if rng.random() < 0.3 else c for c in label)
        answer = "".join(rng.choice(noise) for _ in range(rng.randrange(3)))
        answer += named if rng.random() < 0.7 else rng.choice(noise)
        answer += "".join(rng.choice(noise) for _ in range(rng.randrange(4)))
        truth = parse_label(answer, index)
        for cut in range(len(answer) + 1):
            part = answer[:cut]
            if truth is not None:  # an answer that names a label is never ruled out on the way
                assert could_name_label(part, keys), (answer, part)
                checked += 1
            if not could_name_label(part, keys):
                assert parse_label(part, index) is None and truth is None, (answer, part)
            if first_line_done(part):  # what parse_label reads is complete
                assert parse_label(part, index) == truth, (answer, part)
    assert checked > 1000
    assert not could_name_label("I think", keys) and not could_name_label("card_arrival is", keys)
    assert could_name_label("  CARD_arr", keys) and first_line_done(" card\n") and not first_line_done("\n card")


def test_cell_weighting_spreads_each_cells_traffic_over_the_domains_test_examples():
    from adaptive_ft.evaluate import spread_cells

    # a: 9 queries by free users on one popular example, 1 on another; b: 2 pro queries; train-only ids too
    events = pl.DataFrame({"example_id": ["a1"] * 9 + ["a2", "a3", "b1", "b9"],
                           "segment": ["free"] * 11 + ["pro", "pro"],
                           "event": ["impression"] * 13})
    domains = pl.DataFrame({"example_id": ["a1", "a2", "a3", "b1", "b9"], "domain": ["a", "a", "a", "b", "b"]})
    test = pl.DataFrame({"example_id": ["a1", "a2", "b1"], "domain": ["a", "a", "b"]})
    got = {(r["example_id"], r["segment"]): r["n"] for r in spread_cells(events, domains, ["impression"], test).to_dicts()}
    # free asked domain a 11 times (a3 is not a test example but its query still counts), 2 test examples
    assert got == {("a1", "free"): 5.5, ("a2", "free"): 5.5, ("b1", "pro"): 2.0}
