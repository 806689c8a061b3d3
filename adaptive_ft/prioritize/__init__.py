"""Prioritize: decide from real usage what to fine-tune, and write it down as ``plan.json``.

The stage is :mod:`.stage` (:func:`prioritize`, and :func:`score_interactions`, its store-free core); the math
lives in :mod:`.demand` (collaborative filtering, failure, priorities, sampling weights), :mod:`.metrics`
(recommender quality on a time-based hold-out) and :mod:`.layers` (layer probes, completion, selection).
"""

from adaptive_ft.prioritize.stage import (
                                          InteractionScores,
                                          PrioritizeResult,
                                          build_plan,
                                          domain_scores,
                                          prioritize,
                                          score_interactions,
)

__all__ = ["InteractionScores", "PrioritizeResult", "build_plan", "domain_scores", "prioritize", "score_interactions"]
