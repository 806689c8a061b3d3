"""A planted interaction log for the prioritize tests and benchmarks, built in memory (no store needed).

Segments prefer different domains; each domain has a planted failure rate; each interaction draws a
negative signal with its domain's failure rate. The planted need of a domain is
sum over segments of traffic share x the segment's share of traffic on the domain x failure rate.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from adaptive_ft.prioritize.demand import Interactions


def planted_log(n_users: int = 300, n_domains: int = 6, per_domain: int = 20, events_per_user: int = 25,
                seed: int = 0, segments: tuple[str, ...] = ("free", "pro")) -> tuple[Interactions, dict]:
    """(Interactions, truth) with truth = {"need": {domain: need}, "failure": {domain: rate}, "top": [...]}"""
    rng = np.random.default_rng(seed)
    domains = [f"d{j}" for j in range(n_domains)]
    fail = rng.uniform(0.05, 0.6, n_domains)
    seg_pref = rng.dirichlet(np.ones(n_domains) * 0.7, len(segments))  # (S, D)
    seg_share = np.linspace(1.0, 2.0, len(segments))
    seg_share /= seg_share.sum()
    user_seg = rng.choice(len(segments), n_users, p=seg_share)
    item_dom = np.repeat(np.arange(n_domains), per_domain)
    pop = 1.0 / np.arange(1, per_domain + 1) ** 1.1
    pop /= pop.sum()
    rows = []
    for u in range(n_users):
        doms = rng.choice(n_domains, events_per_user, p=seg_pref[user_seg[u]])
        for t, d in enumerate(doms):
            i = d * per_domain + rng.choice(per_domain, p=pop)
            rows.append((u, i, float(rng.random() < fail[d]), float(u * 7 + t * 1000 + rng.random())))
    arr = np.array(rows)
    pairs = (pl.DataFrame({"uix": arr[:, 0].astype(np.int32), "iix": arr[:, 1].astype(np.int32),
                           "neg": arr[:, 2], "t0": arr[:, 3]})
             .group_by("uix", "iix").agg(conf=pl.len().cast(pl.Float32) + pl.col("neg").sum().cast(pl.Float32) * 2,
                                         neg=pl.col("neg").max().cast(pl.Int8), t0=pl.col("t0").min())
             .with_columns(pos=(1 - pl.col("neg")).cast(pl.Int8))
             .sort("uix", "iix"))
    users = pl.DataFrame({"uix": np.arange(n_users, dtype=np.int32),
                          "user_id": [f"u{u:05d}" for u in range(n_users)],
                          "segment": [segments[s] for s in user_seg]})
    items = pl.DataFrame({"iix": np.arange(len(item_dom), dtype=np.int32),
                          "example_id": [f"e{i:05d}" for i in range(len(item_dom))],
                          "domain": [domains[d] for d in item_dom],
                          "prompt": [f"question {i} about {domains[d]}" for i, d in enumerate(item_dom)]})
    need = (seg_share[:, None] * seg_pref).sum(axis=0) * fail
    truth = {"need": dict(zip(domains, need)), "failure": dict(zip(domains, fail)),
             "top": [domains[j] for j in np.argsort(-need)]}
    return Interactions(users, items, pairs, "synthetic"), truth
