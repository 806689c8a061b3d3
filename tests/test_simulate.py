"""simulate: the planted structure is in the log, the truth file is right, formats agree, seeds reproduce."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from adaptive_ft.cli import cli
from adaptive_ft.config import SimulateConfig, load_config
from adaptive_ft.errors import ConfigError, InputError
from adaptive_ft.simulate import (
    BANKING77_DOMAINS,
    BANKING77_INTENT_DOMAIN,
    KINDS,
    Pool,
    builtin_pool,
    csv_pool,
    example_id_for,
    find_banking77,
    simulate,
    subset_pool,
    validate,
)

BANKING77 = Path(__file__).resolve().parents[2] / "shared/data/banking77"
needs_banking77 = pytest.mark.skipif(not (BANKING77 / "train.csv").is_file(),
                                     reason=f"Banking77 not found at {BANKING77} (shared data folder missing)")
NEGATIVE = ("thumbs_down", "regenerate", "edit", "escalate", "abandon")


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[pl.DataFrame, dict]:
    """60k events from 2,000 users: enough traffic per cell for the statistical properties below."""
    out = tmp_path_factory.mktemp("sim") / "big.parquet"
    res = simulate(SimulateConfig(users=2000, events=60_000), out, fmt="parquet", seed=7)
    return pl.read_parquet(res.log_path), json.loads(res.truth_path.read_text())


def _cells(frame: pl.DataFrame) -> pl.DataFrame:
    """Per segment x domain: queries (impressions) and negative feedback events per query."""
    q = frame.filter(pl.col("event") == "impression").group_by("segment", "domain").len("queries")
    neg = frame.filter(pl.col("event").is_in(NEGATIVE)).group_by("segment", "domain").len("negative")
    return q.join(neg, on=["segment", "domain"], how="left").with_columns(
        (pl.col("negative").fill_null(0) / pl.col("queries")).alias("neg_rate"))


# ------------------------------------------------------------------------------------------- pools


def test_example_id_is_sha256_of_the_normalized_prompt():
    expected = hashlib.sha256(b"where is my order?").hexdigest()[:16]
    assert example_id_for("  Where is   my\norder?  ") == expected
    assert example_id_for("where is my order?") == expected


def test_builtin_pool_is_300_distinct_deterministic_prompts_over_6_domains():
    pool = builtin_pool()
    frame = pool.frame
    assert frame.height == 300
    assert sorted(frame["domain"].unique()) == ["account", "billing", "returns", "security", "shipping", "technical"]
    assert frame["example_id"].n_unique() == 300
    assert frame["prompt"].map_elements(lambda p: " ".join(p.lower().split()), return_dtype=pl.String).n_unique() == 300
    assert frame.group_by("reference").len()["len"].to_list() == [10] * 30  # 30 intents x 10 prompts
    assert frame.group_by("domain").agg(pl.col("reference").n_unique())["reference"].to_list() == [5] * 6
    assert builtin_pool().frame.equals(frame)  # fixed, whatever the run seed


def test_csv_pool_with_domains_and_its_errors(tmp_path: Path):
    good = tmp_path / "pool.csv"
    good.write_text('prompt,reference,domain\n"Hi, where is it?",track,shipping\nrefund please,refund,billing\n'
                    "REFUND   please,refund,billing\n")
    pool = csv_pool(good)
    assert pool.frame.height == 2  # the third prompt normalizes to the second
    assert pool.frame["domain"].to_list() == ["shipping", "billing"]
    assert pool.name == "pool"
    bad = tmp_path / "bad.csv"
    bad.write_text("question,answer\na,b\n")
    with pytest.raises(InputError, match=r"missing column.*text,category"):
        csv_pool(bad)
    unmapped = tmp_path / "unmapped.csv"
    unmapped.write_text("text,category\nhello,greeting\n")
    with pytest.raises(InputError, match="no domain.*'greeting'.*add a 'domain' column"):
        csv_pool(unmapped)
    with pytest.raises(InputError, match="not found"):
        csv_pool(tmp_path / "missing.csv")


def test_find_banking77_looks_in_shared_data_above(tmp_path: Path):
    # the search walks up from tmp_path: a shared/ folder above it (some machines have one) would be found first
    if not any((p / "shared" / "data" / "banking77" / "train.csv").is_file() for p in tmp_path.parents):
        with pytest.raises(InputError, match="pass --examples PATH/train.csv"):
            find_banking77([tmp_path])
    data = tmp_path / "shared" / "data" / "banking77"
    data.mkdir(parents=True)
    (data / "train.csv").write_text("text,category\nmy card?,card_arrival\n")
    deep = tmp_path / "main" / "runs"
    assert find_banking77([deep]) == data / "train.csv"


def test_pool_size_keeps_each_domains_share_and_the_same_examples():
    pool = builtin_pool()
    small = subset_pool(pool, 60)
    assert small.frame.group_by("domain").len()["len"].to_list() == [10] * 6  # 50 each -> 60 * 50/300
    # the smallest example ids of each domain: independent of any seed
    expected = pool.frame.sort("example_id").group_by("domain", maintain_order=True).head(10)["example_id"]
    assert set(small.frame["example_id"]) == set(expected)
    assert subset_pool(pool, 0) is pool and subset_pool(pool, 1000) is pool


def test_simulate_with_pool_size_asks_only_that_subset(tmp_path: Path):
    allowed = set(subset_pool(builtin_pool(), 30).frame["example_id"])
    for seed in (0, 1):
        res = simulate(SimulateConfig(events=2000, pool_size=30), tmp_path / f"p{seed}.parquet", fmt="parquet",
                       seed=seed)
        assert set(pl.read_parquet(res.log_path)["example_id"]) <= allowed
        assert json.loads(res.truth_path.read_text())["pool_size"] == 30


def test_banking77_mapping_lists_77_intents_once_in_8_domains():
    listed = [i for intents in BANKING77_DOMAINS.values() for i in intents]
    assert len(listed) == 77 and len(set(listed)) == 77
    assert len(BANKING77_DOMAINS) == 8


@pytest.mark.shared_data
@needs_banking77
def test_every_banking77_intent_is_mapped_and_the_pool_loads():
    categories = set(json.loads((BANKING77 / "categories.json").read_text()))
    assert categories == set(BANKING77_INTENT_DOMAIN)
    pool = csv_pool(BANKING77 / "train.csv")
    assert pool.name == "banking77"
    assert set(pool.frame["reference"].unique()) == categories
    assert sorted(pool.frame["domain"].unique()) == sorted(BANKING77_DOMAINS)
    assert pool.frame.height > 9900  # 10,003 rows; a few repeat after normalization


@pytest.mark.shared_data
@needs_banking77
def test_simulate_on_banking77_labels_are_intents(tmp_path: Path):
    res = simulate(SimulateConfig(events=3000), tmp_path / "b.jsonl", pool=BANKING77 / "train.csv", seed=1)
    frame = pl.read_ndjson(res.log_path)
    truth = json.loads(res.truth_path.read_text())
    assert truth["pool"] == "banking77" and truth["domains"] == sorted(BANKING77_DOMAINS)
    assert set(frame["reference"].unique()) <= set(BANKING77_INTENT_DOMAIN)
    assert set(frame["response"].unique()) <= set(BANKING77_INTENT_DOMAIN)
    mapped = frame.select(pl.col("reference").replace_strict(BANKING77_INTENT_DOMAIN), "domain")
    assert (mapped["reference"] == mapped["domain"]).all()


# ------------------------------------------------------------------------------------------- planted structure


def test_planted_bad_cells_draw_more_negative_feedback(big):
    frame, truth = big
    cells = _cells(frame).join(pl.DataFrame(truth["need"]), on=["segment", "domain"])
    bad = cells.filter(pl.col("bad_cell"))
    good = cells.filter(~pl.col("bad_cell") & (pl.col("queries") >= 200))
    assert bad.height == 3 and good.height >= 6
    assert bad["neg_rate"].min() > good["neg_rate"].max() + 0.15
    # Across all cells with traffic, negative feedback tracks the planted failure rate.
    busy = cells.filter(pl.col("queries") >= 200)
    assert np.corrcoef(busy["neg_rate"], busy["failure_rate"])[0, 1] > 0.95


def test_segment_preferences_are_recovered_from_the_log(big):
    frame, truth = big
    imp = frame.filter(pl.col("event") == "impression")
    shares = imp.group_by("segment", "domain").len().with_columns(pl.col("len") / pl.col("len").sum().over("segment"))
    for segment, prefs in truth["segment_preferences"].items():
        got = dict(shares.filter(pl.col("segment") == segment).select("domain", "len").iter_rows())
        l1 = sum(abs(got.get(d, 0.0) - p) for d, p in prefs.items())
        assert l1 < 0.12, (segment, l1)
    # and the segments really differ from each other
    prefs = np.array([list(p.values()) for p in truth["segment_preferences"].values()])
    assert np.abs(prefs[0] - prefs[1]).sum() > 0.5


def test_popularity_is_zipf_skewed_within_domains(big, tmp_path: Path):
    frame, _ = big

    def top_decile_share(f: pl.DataFrame) -> float:
        counts = f.filter(pl.col("event") == "impression").group_by("domain", "example_id").len()
        ranked = counts.with_columns(pl.col("len").rank("ordinal", descending=True).over("domain").alias("r"),
                                     pl.len().over("domain").alias("n"))
        return ranked.filter(pl.col("r") <= pl.col("n") / 10)["len"].sum() / counts["len"].sum()

    # Zipf(1.1) over 50 examples: the top 5 hold sum(r^-1.1, r<=5) / sum(r^-1.1, r<=50) of a domain's traffic.
    w = np.arange(1, 51) ** -1.1
    assert top_decile_share(frame) == pytest.approx(w[:5].sum() / w.sum(), abs=0.03)
    flat = simulate(SimulateConfig(users=2000, events=60_000, popularity_skew=0.0), tmp_path / "f.parquet",
                    fmt="parquet", seed=7)
    assert top_decile_share(pl.read_parquet(flat.log_path)) < 0.15  # ~0.10 plus sampling noise


def test_feedback_follows_correctness_exactly_without_noise(tmp_path: Path):
    res = simulate(SimulateConfig(events=20_000, noise=0.0), tmp_path / "n.parquet", fmt="parquet", seed=3)
    frame = pl.read_parquet(res.log_path).with_columns((pl.col("response") == pl.col("reference")).alias("right"))
    assert frame.filter(pl.col("event") == "thumbs_up")["right"].all()
    assert not frame.filter(pl.col("event").is_in(["thumbs_down", "edit"]))["right"].any()
    ratings = frame.filter(pl.col("event") == "rating")
    assert set(ratings.filter("right")["value"].unique()) == {4.0, 5.0}
    assert set(ratings.filter(~pl.col("right"))["value"].unique()) == {1.0, 2.0, 3.0}


def test_noise_flips_reactions(tmp_path: Path):
    res = simulate(SimulateConfig(events=40_000, noise=0.2), tmp_path / "n.parquet", fmt="parquet", seed=3)
    frame = pl.read_parquet(res.log_path).with_columns((pl.col("response") == pl.col("reference")).alias("right"))
    ups = frame.filter(pl.col("event") == "thumbs_up")
    # P(wrong | thumbs_up) = 0.2 f / (0.2 f + 0.8 (1 - f)) for the overall failure rate f
    f = 1 - frame.filter(pl.col("event") == "impression")["right"].mean()
    expected = 0.2 * f / (0.2 * f + 0.8 * (1 - f))
    assert (~ups["right"]).mean() == pytest.approx(expected, abs=0.02)


def test_events_are_well_formed(big):
    frame, truth = big
    assert frame.height == pytest.approx(60_000, rel=0.03)
    assert set(frame["event"].unique()) == set(KINDS)
    assert frame["event_id"].n_unique() == frame.height
    assert frame["ts"].is_sorted()
    start = pl.datetime(2025, 1, 1)
    assert frame.select((pl.col("ts") >= start).all()).item()
    assert frame.filter(pl.col("event") == "impression")["ts"].max() < pl.select(start + pl.duration(days=30)).item()
    # every feedback event follows an impression of the same user and example, never before it
    first = frame.group_by("user_id", "example_id").agg(
        pl.col("ts").filter(pl.col("event") == "impression").min().alias("first_imp"), pl.col("ts").min())
    assert (first["first_imp"] == first["ts"]).all()
    assert frame.filter(pl.col("event") != "impression")["value"].null_count() > 0
    assert frame.filter(pl.col("event") == "rating")["value"].is_between(1, 5).all()
    assert frame.filter(pl.col("event") == "click")["value"].min() > 0
    # each user keeps one segment
    assert frame.group_by("user_id").agg(pl.col("segment").n_unique())["segment"].max() == 1
    # traffic comes from heavy and light users (log-normal activity)
    per_user = frame.filter(pl.col("event") == "impression").group_by("user_id").len()["len"]
    assert per_user.max() > 8 * per_user.median()


# ------------------------------------------------------------------------------------------- truth


def test_truth_file_follows_the_contract(big):
    frame, truth = big
    assert {"seed", "pool", "segments", "domains", "need", "domain_need", "top_domains"} <= set(truth)
    assert truth["seed"] == 7 and truth["pool"] == "builtin" and truth["segments"] == ["free", "pro", "enterprise"]
    rows = pl.DataFrame(truth["need"])
    assert rows.height == 3 * 6
    assert sum(r["traffic_share"] for r in truth["need"]) == pytest.approx(1.0, abs=1e-4)
    for r in truth["need"]:
        assert r["need"] == pytest.approx(r["traffic_share"] * r["failure_rate"], abs=2e-6)
    for d, need in truth["domain_need"].items():
        assert need == pytest.approx(rows.filter(pl.col("domain") == d)["need"].sum(), abs=1e-5)
    needs = [truth["domain_need"][d] for d in truth["top_domains"]]
    assert needs == sorted(needs, reverse=True) and set(truth["top_domains"]) == set(truth["domains"])
    # traffic shares are the log's own: queries per cell / all queries
    cells = _cells(frame).join(rows, on=["segment", "domain"])
    assert (cells["queries"] / cells["queries"].sum() - cells["traffic_share"]).abs().max() < 1e-5
    assert truth["n_events"] == frame.height


def test_responder_replaces_planted_failures(tmp_path: Path):
    pool = builtin_pool()
    answer = dict(pool.frame.select("prompt", "reference").iter_rows())
    asked: list[str] = []

    def responder(prompts: list[str]) -> list[str]:  # right on billing only, otherwise a fixed wrong label
        asked.extend(prompts)
        return [answer[p] if answer[p] in BILLING else "no_idea" for p in prompts]

    BILLING = set(pool.frame.filter(pl.col("domain") == "billing")["reference"])
    res = simulate(SimulateConfig(events=5000), tmp_path / "r.jsonl", pool=pool, responder=responder)
    frame = pl.read_ndjson(res.log_path)
    truth = json.loads(res.truth_path.read_text())
    assert truth["failure_source"] == "responder"
    assert len(asked) == len(set(asked)) == frame["example_id"].n_unique()  # each distinct prompt asked once
    for r in truth["need"]:
        if r["queries"]:
            assert r["failure_rate"] == (0.0 if r["domain"] == "billing" else 1.0)
    assert set(frame.filter(pl.col("domain") != "billing")["response"].unique()) == {"no_idea"}
    assert truth["domain_need"]["billing"] == 0.0


def test_responder_must_answer_every_prompt(tmp_path: Path):
    with pytest.raises(InputError, match="one answer per prompt"):
        simulate(SimulateConfig(events=200), tmp_path / "r.jsonl", responder=lambda ps: ps[:-1])


# ------------------------------------------------------------------------------------------- determinism, formats


def test_same_seed_gives_byte_identical_logs(tmp_path: Path):
    cfg = SimulateConfig(events=3000)
    for fmt in ("jsonl", "parquet"):
        a = simulate(cfg, tmp_path / f"a.{fmt}", fmt=fmt, seed=5)
        b = simulate(cfg, tmp_path / f"b.{fmt}", fmt=fmt, seed=5)
        assert a.log_path.read_bytes() == b.log_path.read_bytes()
        assert a.truth_path.read_text() == b.truth_path.read_text()
    c = simulate(cfg, tmp_path / "c.jsonl", seed=6)
    assert c.log_path.read_bytes() != (tmp_path / "a.jsonl").read_bytes()
    # event ids differ between runs, so logs of two seeds never collide in a store
    ids = lambda p: set(pl.read_ndjson(p)["event_id"])  # noqa: E731
    assert not ids(c.log_path) & ids(tmp_path / "a.jsonl")


def _flatten_chat(path: Path) -> pl.DataFrame:
    """Chat records back to flat rows: the user turn is the prompt, the assistant turn the response."""
    chat = pl.read_ndjson(path)
    assert chat["messages"].list.eval(pl.element().struct.field("role")).to_list()[0] == ["user", "assistant"]
    return chat.with_columns(pl.col("messages").list.get(0).struct.field("content").alias("prompt"),
                             pl.col("messages").list.get(1).struct.field("content").alias("response")).select(
        "event_id", "ts", "user_id", "segment", "example_id", "domain", "prompt", "response", "reference",
        "event", "value", "model_version")


def test_formats_round_trip_the_same_records(tmp_path: Path):
    cfg = SimulateConfig(events=2000)
    ref = pl.read_parquet(simulate(cfg, tmp_path / "l.parquet", fmt="parquet", seed=2).log_path)
    ref = ref.with_columns(pl.col("ts").dt.to_string("%Y-%m-%dT%H:%M:%SZ"))
    jsonl = pl.read_ndjson(simulate(cfg, tmp_path / "l.jsonl", fmt="jsonl", seed=2).log_path)
    csv = pl.read_csv(simulate(cfg, tmp_path / "l.csv", fmt="csv", seed=2).log_path,
                      schema_overrides={"value": pl.Float64})
    chat = _flatten_chat(simulate(cfg, tmp_path / "l.chat.jsonl", fmt="chat", seed=2).log_path)
    assert jsonl.equals(ref) and csv.equals(ref)
    assert chat.equals(ref)
    assert list(ref.columns) == ["event_id", "ts", "user_id", "segment", "example_id", "domain", "prompt",
                                 "response", "reference", "event", "value", "model_version"]


def test_chat_lines_escape_any_text(tmp_path: Path):
    tricky = ['He said "refund" \\ twice', "line one\nline two\ttab", "café ☕ naïve", "{\"json\": [1]}"]
    frame = pl.DataFrame({"domain": ["a", "a", "b", "b"], "prompt": tricky,
                          "reference": ['lab "x"', "lab\\y", "ünï", "z"]})
    pool = Pool("tricky", frame.with_columns(pl.Series("example_id", [example_id_for(p) for p in tricky])))
    cfg = SimulateConfig(events=400, segments=['se"g', "plain"], model_version="v\\1")
    res = simulate(cfg, tmp_path / "t.chat.jsonl", fmt="chat", pool=pool)
    assert res.truth_path.name == "t.chat.truth.json"
    flat = pl.read_parquet(simulate(cfg, tmp_path / "t.parquet", fmt="parquet", pool=pool).log_path)
    assert _flatten_chat(res.log_path).equals(flat.with_columns(pl.col("ts").dt.to_string("%Y-%m-%dT%H:%M:%SZ")))
    assert set(flat["prompt"]) == set(tricky)


def test_bad_config_reports_every_problem_at_once(tmp_path: Path):
    cfg = SimulateConfig(users=0, noise=1.5, segment_shares=[1.0], start="January")
    with pytest.raises(ConfigError) as err:
        simulate(cfg, tmp_path / "x.jsonl")
    assert len(err.value.problems) == 4
    assert {p.split(":")[0] for p in err.value.problems} == {
        "simulate.users", "simulate.noise", "simulate.segment_shares", "simulate.start"}
    with pytest.raises(InputError, match="unknown format 'xml'"):
        simulate(SimulateConfig(), tmp_path / "x.xml", fmt="xml")


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_simulate(path: Path, tmp_path: Path):
    cfg = load_config(path)
    validate(cfg.simulate)
    cfg.simulate.events = min(cfg.simulate.events, 1000)
    res = simulate(cfg.simulate, tmp_path / "c.parquet", fmt="parquet", seed=cfg.seed)
    assert json.loads(res.truth_path.read_text())["segments"] == cfg.simulate.segments


# ------------------------------------------------------------------------------------------- CLI


def test_cli_writes_log_and_truth_and_says_where(tmp_path: Path):
    out = tmp_path / "logs.parquet"
    result = CliRunner().invoke(cli, ["simulate", "--out", str(out), "--events", "500", "--users", "50",
                                      "--seed", "4", "simulate.bad_cells=1"])
    assert result.exit_code == 0, result.output
    assert "[parquet]" in result.output and str(tmp_path / "logs.truth.json") in result.output
    truth = json.loads((tmp_path / "logs.truth.json").read_text())
    assert truth["seed"] == 4 and len(truth["bad_cells"]) == 1 and truth["config"]["users"] == 50
    assert pl.read_parquet(out)["user_id"].n_unique() <= 50


def test_cli_errors_are_one_line(tmp_path: Path):
    result = CliRunner().invoke(cli, ["simulate", "--out", str(tmp_path / "x.jsonl"),
                                      "--examples", str(tmp_path / "none.csv")])
    assert result.exit_code == 1
    assert "Error: example pool not found" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["simulate", "--out", str(tmp_path / "x.jsonl"), "simulate.noise=2"])
    assert result.exit_code == 1 and "simulate.noise: 2.0 must be in [0, 1]" in result.output


@pytest.mark.shared_data
@needs_banking77
def test_cli_pool_banking77(tmp_path: Path):
    result = CliRunner().invoke(cli, ["simulate", "--out", str(tmp_path / "b.csv"), "--pool", "banking77",
                                      "--events", "300"])
    assert result.exit_code == 0, result.output
    assert "[csv]" in result.output
    assert json.loads((tmp_path / "b.truth.json").read_text())["pool"] == "banking77"


@pytest.mark.slow
def test_a_million_events_in_seconds(tmp_path: Path):
    res = simulate(SimulateConfig(users=20_000, events=1_000_000), tmp_path / "m.parquet", fmt="parquet")
    assert res.n_events == pytest.approx(1_000_000, rel=0.02)
    assert res.seconds < 30, f"1M events took {res.seconds:.1f}s (about 2.5s on the 2-core dev machine)"
    assert pl.scan_parquet(res.log_path).select(pl.len()).collect().item() == res.n_events


# ------------------------------------------------------------------------------------------- into the store


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "chat"])
def test_every_format_ingests_completely_and_all_formats_share_ids(tmp_path: Path, fmt: str):
    store = pytest.importorskip("adaptive_ft.store")
    cfg = SimulateConfig(events=1500, users=60)
    res = simulate(cfg, tmp_path / f"log.{fmt}", fmt=fmt, seed=9)
    db = tmp_path / "s.duckdb"
    first = store.ingest([res.log_path], db, fmt=fmt).files[0]
    assert (first.error, first.rows_ok, first.rows_rejected) == (None, res.n_events, 0)
    # the same run in another format holds the same event ids: nothing new
    other = simulate(cfg, tmp_path / "other.parquet", fmt="parquet", seed=9)
    again = store.ingest([other.log_path], db, fmt="parquet").files[0]
    assert (again.rows_ok, again.rows_duplicate) == (0, res.n_events)
    log = pl.read_parquet(other.log_path)
    with store.Store.open(db, read_only=True) as s:
        examples = s.examples()
        counts = s.segment_domain_counts().sort("segment", "domain", "event")
    assert examples.height == res.n_examples and examples["reference"].null_count() == 0
    expected = log.group_by("segment", "domain", "event").len("n").sort("segment", "domain", "event")
    assert counts.select("segment", "domain", "event", pl.col("n").cast(pl.UInt32)).equals(expected)


def test_segments_only_in_the_users_file_reach_the_store(tmp_path: Path):
    store = pytest.importorskip("adaptive_ft.store")
    res = simulate(SimulateConfig(events=1500, users=80, segment_in_log=False, users_file=True),
                   tmp_path / "l.jsonl", seed=4)
    assert res.users_path == tmp_path / "l.users.csv"
    log = pl.read_ndjson(res.log_path)
    assert log["segment"].null_count() == log.height
    users = pl.read_csv(res.users_path)
    assert users.columns == ["user_id", "segment", "region", "signup_date"] and users.height == 80
    assert set(users["region"]) <= {"emea", "amer", "apac"}
    # the same seed with segments in the log: the users file says exactly what the log would have said
    with_seg = pl.read_ndjson(simulate(SimulateConfig(events=1500, users=80), tmp_path / "w.jsonl", seed=4).log_path)
    truth = with_seg.select("user_id", "segment").unique()
    assert truth.join(users, on="user_id")["segment_right"].equals(truth.join(users, on="user_id")["segment"])
    db = tmp_path / "s.duckdb"
    store.ingest([res.log_path], db, users=res.users_path)
    with store.Store.open(db, read_only=True) as s:
        got = s.events().select("user_id", "segment").unique()
    assert got.join(truth, on="user_id", how="inner").filter(pl.col("segment") != pl.col("segment_right")).height == 0
    assert got["segment"].null_count() == 0 and "unknown" not in set(got["segment"])
