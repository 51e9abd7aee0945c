"""The reward-modelling metrics of one model from its scores file's rows (``reward_scores.jsonl``).

Each row is one judged reply ``{prompt_id, human_rank, model_score}`` (``model_score`` null when the
judgement could not be parsed); rows are grouped by prompt and fed to ``RewardMetrics``.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

from srlm.metrics.reward import RewardMetrics

METRIC_KEYS = ("pairwise_accuracy", "exact_match", "five_best", "spearman", "kendall_tau")


def _finite(value) -> Optional[float]:
    """A float for JSON, None where undefined (NaN is not valid JSON)."""
    value = float(value)
    return value if math.isfinite(value) else None


def reward_metrics_from_scores(rows: Iterable[dict], five_threshold: float = 4.5) -> dict:
    """The reward metrics from ``reward_scores.jsonl`` rows, grouped by ``prompt_id`` (NaN -> None)."""
    groups: dict[str, tuple[list[float], list[int]]] = {}
    n_unparsed = n_replies = 0
    for row in rows:
        scores, ranks = groups.setdefault(str(row["prompt_id"]), ([], []))
        score = row.get("model_score")
        n_replies += 1
        n_unparsed += score is None
        scores.append(math.nan if score is None else float(score))  # unparsed: dropped by the metrics
        ranks.append(int(row["human_rank"]))
    metrics = RewardMetrics(five_threshold=five_threshold)
    for metric in metrics.values():  # every row is here: no sync with other ranks (the DDP loop evaluates on rank 0)
        metric.distributed_available_fn = lambda: False
    if groups:
        metrics.update([g[0] for g in groups.values()], [g[1] for g in groups.values()])
    values = metrics.compute()
    out = {key: _finite(values[key]) for key in METRIC_KEYS}
    out.update(n_prompts=int(values["n_prompts"]), n_pairs=int(values["n_pairs"]), n_unparsed=n_unparsed,
               n_replies=n_replies)
    return out
