"""review export: per segment x domain strata, the contract's columns with blank ratings, seeded and stable."""

from __future__ import annotations

import json

import polars as pl
import pytest
from click.testing import CliRunner

from adaptive_ft.cli import cli
from adaptive_ft.review import COLUMNS, review_export, review_id, stratified_sample


def _outputs(n: int = 12) -> pl.DataFrame:
    return pl.DataFrame({"example_id": [f"e{i:02d}" for i in range(n)],
                         "domain": ["cards" if i % 3 else "transfers" for i in range(n)],
                         "prompt": [f"<b>q{i}</b>" for i in range(n)], "reference": ["r"] * n,
                         "model": ["runs/r1"] * n, "response": [f"a{i}" for i in range(n)], "score": [1.0] * n})


def _traffic() -> pl.DataFrame:
    # free asked every example, pro only e00..e03
    rows = [(f"e{i:02d}", "free") for i in range(12)] + [(f"e{i:02d}", "pro") for i in range(4)]
    return pl.DataFrame(rows, schema={"example_id": pl.String, "segment": pl.String}, orient="row")


def test_stratified_sample_takes_up_to_k_per_segment_domain_cell():
    sample = stratified_sample(_outputs(), _traffic(), per_cell=3, seed=0)
    assert sample.columns == COLUMNS
    counts = dict(sample.group_by("segment", "domain").agg(pl.len()).select(
        pl.concat_str("segment", "domain", separator="/"), "len").iter_rows())
    # free: cards has 8 examples, transfers 4 -> 3 each; pro: e00, e03 transfers and e01, e02 cards -> 2 each.
    assert counts == {"free/cards": 3, "free/transfers": 3, "pro/cards": 2, "pro/transfers": 2}
    assert sample["rating"].null_count() == sample.height and sample["reviewer"].null_count() == sample.height
    pro = sample.filter(pl.col("segment") == "pro")["example_id"].to_list()
    assert set(pro) <= {"e00", "e01", "e02", "e03"}  # only what pro users asked
    assert sample.equals(stratified_sample(_outputs(), _traffic(), per_cell=3, seed=0))
    assert sample["review_id"][0] == review_id(sample["model"][0], sample["example_id"][0], sample["segment"][0])
    assert sample["review_id"].n_unique() == sample.height


def test_review_export_writes_csv_and_html(tmp_path):
    eval_path = tmp_path / "eval.json"
    _outputs().write_parquet(tmp_path / "eval.outputs.parquet")
    eval_path.write_text(json.dumps({"models": ["runs/r1"], "finetuned_model": "runs/r1",
                                     "outputs": "eval.outputs.parquet"}))
    result = review_export(eval_path, tmp_path / "review.csv", store=None, per_cell=2)
    back = pl.read_csv(result.csv)
    assert back.columns == COLUMNS and back.height == 4  # no store: one stratum per domain, 2 each
    page = result.html.read_text()
    assert "&lt;b&gt;q" in page and "<b>q" not in page  # prompts are escaped, not rendered
    with pytest.raises(Exception, match="not in"):
        review_export(eval_path, tmp_path / "r2.csv", models=["nope"])


def test_review_export_command(tmp_path):
    _outputs().write_parquet(tmp_path / "eval.outputs.parquet")
    (tmp_path / "eval.json").write_text(json.dumps({"models": ["runs/r1"], "outputs": "eval.outputs.parquet"}))
    result = CliRunner().invoke(cli, ["review", "export", "--eval", str(tmp_path / "eval.json"), "--out",
                                      str(tmp_path / "r.csv"), "--store", str(tmp_path / "missing.duckdb")])
    assert result.exit_code != 0 and "no store" in result.output and "Traceback" not in result.output


def test_filled_review_csv_ingests_back_as_review_events(tmp_path):
    """The round trip the review loop relies on: export -> people rate -> ingest --format review."""
    from adaptive_ft.store import Store

    sample = stratified_sample(_outputs(), _traffic(), per_cell=1, seed=0)
    filled = sample.with_columns(rating=pl.when(pl.int_range(pl.len()) < 2).then(5).otherwise(None),
                                 reviewer=pl.lit("ann"))
    filled.write_csv(tmp_path / "rated.csv")
    store = tmp_path / "s.duckdb"
    result = CliRunner().invoke(cli, ["ingest", "--format", "review", str(tmp_path / "rated.csv"), "--store", str(store)])
    assert result.exit_code == 0, result.output
    with Store.open(store, read_only=True) as s:
        events = s.events().sort("example_id")
    expected = filled.head(2).sort("example_id")
    assert events["event"].to_list() == ["review", "review"] and events["value"].to_list() == [5.0, 5.0]
    assert events["example_id"].to_list() == expected["example_id"].to_list()
    assert events["segment"].to_list() == expected["segment"].to_list() and set(events["user_id"]) == {"ann"}
