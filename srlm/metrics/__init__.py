"""Evaluation metrics (torchmetrics) for srlm."""

from srlm.metrics.reward import (
    ExactMatch,
    FiveBest,
    KendallTau,
    PairwiseAccuracy,
    RewardMetrics,
    Spearman,
    average_ranks,
    kendall_tau_b,
    spearman_rho,
)

__all__ = [
    "ExactMatch",
    "FiveBest",
    "KendallTau",
    "PairwiseAccuracy",
    "RewardMetrics",
    "Spearman",
    "average_ranks",
    "kendall_tau_b",
    "spearman_rho",
]
