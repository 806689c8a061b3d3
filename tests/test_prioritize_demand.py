"""Demand, failure, priorities and sampling weights: exact values by hand and recovered planted structure."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import polars as pl
import pytest
from prioritize_synth import planted_log

from adaptive_ft.artifacts.plan import Plan
from adaptive_ft.config import Config, PrioritizeConfig
from adaptive_ft.errors import InputError, PlanError
from adaptive_ft.prioritize import build_plan, domain_scores, score_interactions
from adaptive_ft.prioritize import demand as dm
from adaptive_ft.prioritize.layers import spearman


def test_beta_failure_with_neighbour_prior_matches_hand_computation():
    exposures = np.array([10.0, 0.0, 5.0])
    negatives = np.array([5.0, 0.0, 0.0])
    idx = np.array([[1, 2], [0, 2], [0, 1]])
    sim = np.array([[0.5, -1.0], [1.0, 1.0], [0.0, 0.0]])
    f = dm.example_failure(exposures, negatives, (idx, sim), strength=2.0)
    g = 5 / 15
    r = [(5 + 2 * g) / 12, (0 + 2 * g) / 2, (0 + 2 * g) / 7]  # shrunk to the global rate
    prior = [r[1], (r[0] + r[2]) / 2, g]  # positive-similarity neighbours only; none -> global
    assert f.global_rate == pytest.approx(g)
    assert f.prior == pytest.approx(prior)
    assert f.rate == pytest.approx([(5 + 2 * prior[0]) / 12, prior[1], (0 + 2 * prior[2]) / 7])


def test_unseen_example_inherits_failure_from_look_alikes():
    # items 0-2 are look-alikes (same factor direction) that fail often; 3-5 another group that never fails
    item = np.array([[1, 0], [1, 0.01], [1, -0.01], [0, 1], [0.01, 1], [-0.01, 1]], dtype=np.float32)
    exposures = np.array([50, 50, 0, 50, 50, 0.0])
    negatives = np.array([40, 40, 0, 0, 0, 0.0])
    f = dm.example_failure(exposures, negatives, dm.item_neighbours(item, 2), strength=5.0)
    assert f.rate[2] > 0.6 and f.rate[5] < 0.1  # same zero feedback, opposite inherited failure


def test_item_neighbours_are_the_most_similar_others():
    item = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    idx, sim = dm.item_neighbours(item, 1, block=3)  # block < I exercises the blocked path
    assert idx[:, 0].tolist() == [1, 0, 3, 2]
    assert sim[0, 0] == pytest.approx(0.9 / math.hypot(0.9, 0.1), rel=1e-5)


def test_priority_is_weighted_demand_times_failure():
    demand = np.array([[0.5, 0.5, 0.0], [0.1, 0.2, 0.7]])
    failure = np.array([0.2, 0.4, 0.1])
    prio, contrib = dm.priorities(demand, failure, np.array([0.25, 0.75]))
    assert prio == pytest.approx([0.25 * 0.5 * 0.2 + 0.75 * 0.1 * 0.2, 0.25 * 0.5 * 0.4 + 0.75 * 0.2 * 0.4,
                                  0.75 * 0.7 * 0.1])
    assert contrib.sum(axis=0) == pytest.approx(prio)


def test_segment_weights_modes():
    names, traffic, fail = ["a", "b"], np.array([300.0, 100.0]), np.array([0.1, 0.3])
    cfg = PrioritizeConfig()
    assert dm.segment_weights(names, traffic, fail, cfg) == pytest.approx([0.75, 0.25])
    assert dm.segment_weights(names, traffic, fail, replace(cfg, segment_weighting="uniform")) == pytest.approx([0.5, 0.5])
    # under-served: traffic x failure = 0.075 vs 0.075 -> equal, although b has a third of a's traffic
    assert dm.segment_weights(names, traffic, fail, replace(cfg, segment_weighting="underserved")) == pytest.approx([0.5, 0.5])
    assert dm.segment_weights(names, traffic, fail, replace(cfg, segment_weights={"b": 3, "a": 1})) == pytest.approx([0.25, 0.75])


def test_explicit_weight_on_a_segment_without_events_is_an_error():
    cfg = PrioritizeConfig(segment_weights={"a": 1.0, "enterprise": 1.0})
    with pytest.raises(InputError, match="enterprise"):
        dm.segment_weights(["a", "b"], np.array([5.0, 5.0]), np.array([0.1, 0.1]), cfg)


def test_sampling_weights_respect_floor_and_cap():
    rng = np.random.default_rng(0)
    prio = np.concatenate([rng.uniform(1, 2, 30), [100.0], rng.uniform(0.001, 0.002, 10)])
    domain = np.array([0] * 31 + [1] * 10)
    clusters = np.arange(41)
    cfg = PrioritizeConfig(domain_floor=0.1, example_cap=0.05)
    w, notes = dm.sampling_weights(prio, domain, clusters, cfg)
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all() and not notes
    assert w[domain == 1].sum() >= 0.1 - 1e-9  # starving domain lifted to the floor
    assert w.max() <= 0.05 + 1e-9  # the one dominant example is capped
    # an example temperature flattens: the spread between examples of one domain shrinks
    hot, _ = dm.sampling_weights(prio, domain, clusters, replace(cfg, example_temperature=10.0))
    assert np.ptp(hot[:30]) < np.ptp(w[:30])


def test_domain_share_follows_total_priority_and_example_temperature_only_spreads_within():
    # heavy-tailed priorities, as traffic gives: domain 0 holds 3x domain 1's total priority
    prio = np.array([60.0, 10.0, 5.0, 3.0, 12.0, 20.0, 5.0, 5.0])
    domain = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    cfg = PrioritizeConfig(domain_floor=0.0, example_cap=1.0, temperature=1.0, example_temperature=1.0)
    sharp, _ = dm.sampling_weights(prio, domain, np.arange(8), cfg)
    assert sharp == pytest.approx(prio / prio.sum())  # both temperatures 1: proportional to priority
    flat, _ = dm.sampling_weights(prio, domain, np.arange(8), replace(cfg, example_temperature=4.0))
    for d, share in ((0, 0.75), (1, 0.25)):  # the plan's domain mix is unchanged...
        assert flat[domain == d].sum() == pytest.approx(share)
        assert sharp[domain == d].sum() == pytest.approx(share)
    ess = lambda w: 1.0 / (w ** 2).sum()  # noqa: E731
    assert ess(flat) > 1.5 * ess(sharp)  # ...but its draws spread over more distinct examples
    even, _ = dm.sampling_weights(prio, domain, np.arange(8), replace(cfg, temperature=1e9))
    assert even[domain == 0].sum() == pytest.approx(0.5)  # a high domain temperature evens the domains


def test_cap_applies_to_a_cluster_of_near_duplicates():
    prio = np.array([1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.1])
    clusters = np.array([0, 0, 0, 1, 2, 3, 4, 5])  # three copies of one question
    w, _ = dm.sampling_weights(prio, np.zeros(8, dtype=int), clusters, PrioritizeConfig(example_cap=0.3))
    assert w[:3].sum() == pytest.approx(0.3)


def test_duplicate_clusters_join_same_normalized_prompt():
    items = pl.DataFrame({"example_id": ["a", "b", "c"], "prompt": ["Reset my PIN!", "reset my  pin", "Other"]})
    none = (np.zeros((3, 0), dtype=np.int64), np.zeros((3, 0)))
    c = dm.duplicate_clusters(items, none, np.ones(3), 0.98, 5)
    assert c[0] == c[1] != c[2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_highest_need_domains_come_first(seed):
    inter, truth = planted_log(seed=seed)
    scores = domain_scores(score_interactions(inter, Config(seed=seed)))
    top = [d.domain for d in scores]
    assert len(set(top[:3]) & set(truth["top"][:3])) >= 2
    assert top[0] in truth["top"][:2]  # seed 1 plants d0 and d1 within 1% of each other
    plan_prio = np.array([next(d.priority for d in scores if d.domain == k) for k in truth["need"]])
    assert spearman(plan_prio, np.array(list(truth["need"].values()))) >= 0.8  # 6 domains, near ties swap


def _plan_doc(seed: int) -> dict:
    inter, _ = planted_log(seed=1)
    plan = build_plan(score_interactions(inter, Config(seed=seed)), Config(seed=seed), {"store": "x"})
    doc = plan.__dict__.copy()
    doc.pop("created")
    doc["examples"] = doc["examples"].to_dicts()
    doc["domains"] = [d.__dict__ for d in doc["domains"]]
    return doc


def test_same_input_config_and_seed_give_the_same_plan():
    assert json.dumps(_plan_doc(0), default=str) == json.dumps(_plan_doc(0), default=str)


def test_plan_roundtrip_has_no_nan(tmp_path):
    inter, _ = planted_log(seed=0)
    plan = build_plan(score_interactions(inter, Config()), Config(), {"store": "x"})
    path = plan.save(tmp_path / "plan.json")
    back = Plan.load(path)
    assert back.domain_names == plan.domain_names
    assert back.example_weights()["weight"].sum() == pytest.approx(1.0)
    assert "NaN" not in path.read_text()


# ------------------------------------------------------------------------------------------ bad inputs


def _small(pairs: list[tuple[int, int, int]], users: int = 2, domains: list[str | None] | None = None):
    domains = domains or ["x", "y"]
    return dm.Interactions(
        pl.DataFrame({"uix": range(users), "user_id": [f"u{i}" for i in range(users)], "segment": ["s"] * users},
                     schema_overrides={"uix": pl.Int32}),
        pl.DataFrame({"iix": range(len(domains)), "example_id": [f"e{i}" for i in range(len(domains))],
                      "domain": domains, "prompt": [f"p{i}" for i in range(len(domains))]},
                     schema_overrides={"iix": pl.Int32, "domain": pl.Utf8}),
        pl.DataFrame({"uix": [p[0] for p in pairs], "iix": [p[1] for p in pairs], "conf": [1.0] * len(pairs),
                      "neg": [p[2] for p in pairs], "t0": [float(i) for i in range(len(pairs))]},
                     schema={"uix": pl.Int32, "iix": pl.Int32, "conf": pl.Float32, "neg": pl.Int8, "t0": pl.Float64}),
        "test-store")


def test_one_user_is_refused():
    with pytest.raises(InputError, match="one user.*at least 2 users"):
        score_interactions(_small([(0, 0, 1), (0, 1, 0)], users=1), Config())


def test_no_events_is_refused():
    with pytest.raises(InputError, match="no events"):
        score_interactions(_small([]), Config())


def test_example_without_domain_is_refused():
    with pytest.raises(InputError, match="1 example.*no domain.*e1"):
        score_interactions(_small([(0, 0, 1), (1, 1, 0)], domains=["x", None]), Config())


def test_no_negative_feedback_is_an_error_unless_planning_by_demand():
    inter = _small([(0, 0, 0), (1, 1, 0), (1, 0, 0)])
    with pytest.raises(PlanError, match="no negative feedback.*no_feedback=demand"):
        score_interactions(inter, Config())
    cfg = Config()
    cfg.prioritize.no_feedback = "demand"
    cfg.prioritize.factors = 2
    scored = score_interactions(inter, cfg)
    assert scored.examples["priority"].to_numpy() == pytest.approx(scored.examples["demand"].to_numpy())
    assert any("priority = demand" in n for n in scored.notes)
    assert np.isfinite(scored.examples["weight"].to_numpy()).all()
    assert scored.examples["weight"].sum() == pytest.approx(1.0)


def test_demand_blends_observed_traffic_with_the_cf_prediction():
    predicted = np.array([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    observed = np.array([[3.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # segment 1 has asked nothing yet
    d = dm.blend_demand(predicted, observed, per_example=1.0)  # 3 pseudo-interactions per segment
    assert d[0] == pytest.approx(np.array([3 + 1.5, 1 + 0.75, 0 + 0.75]) / (4 + 3))
    assert d[1] == pytest.approx(predicted[1])  # no traffic: CF alone
    assert d.sum(axis=1) == pytest.approx([1.0, 1.0])


def test_noise_floor_is_estimated_from_well_measured_examples_and_inverted():
    # observed = f + eps * (1 - 2f): removing the floor gives f back, clipped at 0 below the floor
    f = np.array([0.0, 0.1, 0.3, 0.6])
    eps = 0.08
    assert np.allclose(dm.remove_floor(f + eps * (1 - 2 * f), eps), f)
    assert dm.remove_floor(0.02, eps) == 0.0
    # the floor: a low quantile of raw rates among examples with enough judged queries only
    exposures = np.array([100.0] * 20 + [5.0] * 5)
    negatives = np.concatenate([np.linspace(5, 43, 20), np.zeros(5)])  # the 5 barely-seen ones read 0
    floor = dm.signal_floor(exposures, negatives, quantile=0.05, min_queries=20)
    assert floor == pytest.approx(np.quantile(np.linspace(5, 43, 20) / 100, 0.05))
    assert dm.signal_floor(exposures, negatives, quantile=0.0, min_queries=20) == 0.0
    assert dm.signal_floor(exposures[:9], negatives[:9], quantile=0.05, min_queries=20) == 0.0  # < 10 qualify
    assert dm.signal_floor(exposures, negatives + 60, quantile=0.05, min_queries=20) == 0.2  # capped


def test_failure_is_counted_per_query_not_per_pair():
    from adaptive_ft.prioritize.stage import _outcomes

    # one pair asked 4 times with 1 negative and 3 positive signal events; one asked once, no verdict
    pairs = pl.DataFrame({"neg": [1, 0], "pos": [1, 0], "hits": [4, 1], "neg_n": [1, 0], "pos_n": [3, 0]})
    hits = pairs["hits"].to_numpy().astype(float)
    known, failed, basis, _ = _outcomes(pairs, pairs["neg"].to_numpy().astype(float), hits, PrioritizeConfig())
    assert basis == "feedback"
    assert known.tolist() == [4.0, 0.0] and failed.tolist() == [1.0, 0.0]  # 1 of 4, not 'any negative' = 1 of 1
    known, failed, basis, _ = _outcomes(pairs, pairs["neg"].to_numpy().astype(float), hits,
                                        PrioritizeConfig(failure_basis="exposure"))
    assert basis == "exposure" and known.tolist() == [4.0, 1.0] and failed.tolist() == [1.0, 0.0]


def test_an_examples_domain_is_its_own_else_its_events_commonest(tmp_path):
    """ITEMS_SQL: the examples table's domain wins; else the most frequent non-null event domain (ties by
    name); an example whose events all lack one has none, and every example with events is listed once."""
    from adaptive_ft.store import Store

    events = [("x1", None)] * 3 + [("x1", "a"), ("x1", "b"), ("x1", "b"), ("x2", None), ("x3", "c"), ("x3", "a"),
                                   ("x4", None), ("x5", "z")]
    with Store.open(tmp_path / "s.duckdb") as s:
        s.con.executemany("INSERT INTO events (event_id, ts, user_id, example_id, domain, event, batch_id) "
                          "VALUES (?, TIMESTAMP '2026-01-01', 'u', ?, ?, 'impression', 1)",
                          [(f"e{i}", x, d) for i, (x, d) in enumerate(events)])
        s.con.executemany("INSERT INTO examples (example_id, domain, prompt) VALUES (?, ?, ?)",
                          [("x2", "own", "p2"), ("x5", "mine", "p5"), ("x9", "unused", "p9")])
        items = s.sql(dm.ITEMS_SQL)
    assert items.rows() == [("x1", "b", None), ("x2", "own", "p2"), ("x3", "a", None), ("x4", None, None),
                            ("x5", "mine", "p5")]


@pytest.mark.parametrize("factors", [4, 12])
def test_the_refit_after_the_hold_out_solves_least_squares_exactly_with_few_factors(factors):
    """With few factors the warm refit on the full log runs exact (Cholesky) ALS iterations, as converged as
    CG ones and cheaper there: its last half-step leaves every item at the exact least-squares solution for
    the final user factors. With more factors it keeps implicit's CG steps (cheaper there), which stop short
    of that solution. Either way the model object keeps CG for any later fit."""
    from threadpoolctl import threadpool_limits

    from adaptive_ft.prioritize.stage import EXACT_REFIT_MAX_FACTORS, _fit_with_holdout

    inter = dm.check_interactions(planted_log(seed=0)[0])
    cfg = Config()
    cfg.prioritize.factors = factors
    segments, user_segment = dm.segment_index(inter.users)
    timings: dict[str, float] = {}
    factors_, rec = _fit_with_holdout(inter, cfg, user_segment, segments, timings, progress=False)
    assert {"fit", "evaluate", "refit"} <= set(timings) and rec["evaluated_after_iterations"] == 13
    model, full = factors_.model, inter.matrix()
    with threadpool_limits(1, "blas"):
        exact = model.recalculate_item(np.arange(full.shape[1]), full.T.tocsr())
    assert model.use_cg
    if factors <= EXACT_REFIT_MAX_FACTORS:
        np.testing.assert_array_equal(factors_.item, exact)
    else:
        assert not np.array_equal(factors_.item, exact)
        np.testing.assert_allclose(factors_.item, exact, atol=1e-3)  # CG: close, not exact


def test_pairs_aggregated_in_numpy_equal_the_sql_group_by(tmp_path):
    """load_interactions' pairs (events joined and sorted in DuckDB, runs reduced in numpy) have exactly the
    columns, types and values of the reference GROUP BY (pairs_sql): several events per pair in shuffled
    order, ratings and reviews on both sides of the thresholds and without a value, an event type with no
    weight, a type no configuration knows, pairs with no impression (hits at least 1), a rated type that
    is also a negative signal by type."""
    from adaptive_ft.config import EVENT_TYPES
    from adaptive_ft.store import Store

    rng = np.random.default_rng(5)
    kinds = list(EVENT_TYPES)
    rows = []
    for n in range(3000):
        ev = kinds[rng.integers(len(kinds))]
        value = None if ev not in ("rating", "review") or rng.random() < 0.2 else float(rng.integers(1, 6))
        rows.append((f"e{n}", f"2026-01-{1 + rng.integers(28):02d} {rng.integers(24):02d}:00:00.{rng.integers(10**6):06d}",
                     f"u{rng.integers(40)}", f"x{rng.integers(25)}", "d", ev, value))
    cfg = PrioritizeConfig(event_weights={**PrioritizeConfig().event_weights, "click": 0.1, "rating": 1.7})
    cfg.event_weights.pop("abandon", None)  # a type with no weight
    thirds = PrioritizeConfig(event_weights={**cfg.event_weights, "click": 1 / 3})  # not whole millionths
    assert dm._micro_weights(cfg) is not None and dm._micro_weights(thirds) is None
    # a rated type that is also a signal by type (a low rating counts once, not twice), and no positive type
    rated = PrioritizeConfig(event_weights=cfg.event_weights, negative_events=["thumbs_down", "rating"],
                             positive_events=[])
    with Store.open(tmp_path / "s.duckdb") as s:
        s.con.executemany("INSERT INTO events (event_id, ts, user_id, example_id, domain, event, value, batch_id) "
                          "VALUES (?, ?::TIMESTAMP, ?, ?, ?, ?, ?, 1)", rows)
        # one pair with more signals of each kind than a 16-bit count holds
        s.con.execute("INSERT INTO events (event_id, ts, user_id, example_id, domain, event, value, batch_id) "
                      "SELECT 'h' || i, TIMESTAMP '2026-02-01' + i * INTERVAL 1 SECOND, 'u7', 'x3', 'd', "
                      "CASE i % 3 WHEN 0 THEN 'thumbs_down' WHEN 1 THEN 'resolve' ELSE 'impression' END, NULL, 1 "
                      "FROM range(200000) t(i)")
        # a type no configuration knows (ingest refuses them; the pairs must not lose the event either way)
        s.con.execute("INSERT INTO events (event_id, ts, user_id, example_id, domain, event, value, batch_id) "
                      "VALUES ('odd', TIMESTAMP '2026-03-01', 'u99', 'x99', 'd', 'bogus', 1.0, 1)")
        for c in (cfg, thirds, rated):
            inter = dm.load_interactions(s, c)
            s.con.register(dm._USER_IX, inter.users.select("user_id", "uix").to_arrow())
            s.con.register(dm._ITEM_IX, inter.items.select("example_id", "iix").to_arrow())
            want = s.sql(dm.pairs_sql(c))
            got = inter.pairs.select(want.columns)
            assert got.schema == want.schema
            assert got.equals(want)
            assert want.height < len(rows) and (want["hits"] >= 1).all() and want["neg_n"].sum() > 0
            assert want["neg_n"].max() > 2**16  # the long pair
            assert want.filter(pl.col("uix") == inter.users["user_id"].index_of("u99")).height == 1  # 'bogus'
            assert (want["conf"] != want["conf"].round(0)).any()  # the fractional weights reached the sums


def test_scoring_holds_blas_to_one_thread_beyond_the_fits(monkeypatch):
    """score_interactions runs its small factor products (the hold-out top-k, the neighbours) with BLAS at
    one thread whatever the caller's setting: a multi-threaded BLAS on those products costs many times
    the work when another job shares the cores. The thread count is read where those products run."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from adaptive_ft.prioritize import metrics, stage

    seen: dict[str, set[int]] = {}

    def spy(name, f):
        def run(*a, **k):
            seen.setdefault(name, set()).update(i["num_threads"] for i in threadpool_info()
                                                if i["user_api"] == "blas")
            return f(*a, **k)
        return run

    monkeypatch.setattr(metrics, "top_k_unseen", spy("top_k", metrics.top_k_unseen))
    monkeypatch.setattr(dm, "item_neighbours", spy("neighbours", dm.item_neighbours))
    inter, _ = planted_log(seed=0)
    with threadpool_limits(2, "blas"):
        assert {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"} == {2}
        stage.score_interactions(inter, Config())
        assert {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"} == {2}  # restored
    assert seen == {"top_k": {1}, "neighbours": {1}}


def test_matrices_hold_exactly_their_pairs_in_writable_arrays():
    """Interactions.matrix() over all pairs, or the pairs where a mask is set, holds exactly their conf at
    (uix, iix), in arrays implicit's solvers can take (writable), also when polars lends its columns
    read-only."""
    inter = dm.check_interactions(planted_log(seed=0)[0])
    inter.pairs = inter.pairs.with_columns(pl.col("iix").cast(pl.Int32), pl.col("conf").cast(pl.Float32)).rechunk()
    assert not inter.pairs["conf"].to_numpy().flags.writeable  # lent: the case that needs a copy
    for mask in (None, np.arange(inter.pairs.height) % 3 == 0):
        m = inter.matrix(mask)
        assert m.data.flags.writeable and m.indices.flags.writeable and m.data.dtype == np.float32
        p = inter.pairs if mask is None else inter.pairs.filter(pl.Series(mask))
        want = np.zeros(inter.shape, dtype=np.float32)
        want[p["uix"].to_numpy(), p["iix"].to_numpy()] = p["conf"].to_numpy()
        np.testing.assert_array_equal(m.toarray(), want)
        assert m.nnz == p.height
