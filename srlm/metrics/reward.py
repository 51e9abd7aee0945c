"""Reward-modelling metrics: how well judge scores agree with human rankings.

These are the five figures the paper reports on the EFT eval split (pairwise accuracy, exact
match, 5-best, Spearman, Kendall tau). Every metric takes the same input: for each prompt
group, the judge's scores for the replies (float, higher = better, NaN = judgement not parsed)
and the human ranks of the same replies (int, 0 = best)::

    metric.update(scores=[[4.0, 2.0, 5.0], [3.0, float("nan")]], ranks=[[1, 2, 0], [0, 1]])

Rules shared by all metrics:

- A reply whose score is NaN is dropped from its prompt before anything is computed (an
  unparsed judgement is missing, not bad).
- A prompt left with fewer than 2 replies is skipped and counted in ``n_skipped``.
- Human goodness is ``-rank``, so a positive correlation means agreement.
- Statistics are reduced per prompt group inside ``update`` and accumulated in scalar sum states
  (``dist_reduce_fx="sum"``), so the metrics sync correctly across DDP ranks and
  ``merge_state`` works; nothing of variable length is stored. Arithmetic is in float64.
- ``compute`` before any usable prompt returns NaN.

``srlm.metrics.reward_scores`` computes them from a scores file's rows (``reward_scores.jsonl``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence, Union

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection

Group = Union[Tensor, Sequence[float], Sequence[int]]

__all__ = [
    "PairwiseAccuracy",
    "ExactMatch",
    "FiveBest",
    "Spearman",
    "KendallTau",
    "RewardMetrics",
    "average_ranks",
    "spearman_rho",
    "kendall_tau_b",
]


# ---------------------------------------------------------------------------------------------
# Per-prompt helpers (1-D float64 tensors on CPU; prompt groups are small, so O(n^2) is fine).


def average_ranks(x: Tensor) -> Tensor:
    """Ranks 1..n of ``x`` in ascending order, ties given the mean of the ranks they span."""
    less = (x.unsqueeze(0) < x.unsqueeze(1)).sum(dim=1).to(torch.float64)
    equal = (x.unsqueeze(0) == x.unsqueeze(1)).sum(dim=1).to(torch.float64)
    return less + (equal + 1.0) / 2.0


def spearman_rho(x: Tensor, y: Tensor) -> float:
    """Spearman's rho: Pearson correlation of average ranks. NaN if either side is constant."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx * rx).sum()) * float((ry * ry).sum()))
    if denom == 0.0:
        return math.nan
    # Clamp: rounding can push a perfect correlation a hair past 1.
    return max(-1.0, min(1.0, float((rx * ry).sum()) / denom))


def _pair_signs(v: Tensor) -> Tensor:
    """Upper-triangle (i < j) of sign(v_i - v_j), flattened."""
    n = v.numel()
    i, j = torch.triu_indices(n, n, offset=1)
    return torch.sign(v[i] - v[j])


def kendall_tau_b(x: Tensor, y: Tensor) -> float:
    """Kendall's tau-b: (concordant - discordant) / sqrt(pairs untied in x * pairs untied in y).

    NaN if either side is constant. Same definition as ``scipy.stats.kendalltau`` (variant 'b').
    """
    sx, sy = _pair_signs(x), _pair_signs(y)
    nx, ny = int((sx != 0).sum()), int((sy != 0).sum())
    if nx == 0 or ny == 0:
        return math.nan
    return max(-1.0, min(1.0, float((sx * sy).sum()) / math.sqrt(nx * ny)))


# ---------------------------------------------------------------------------------------------
# Base class: input checking, NaN dropping and the common prompt counters.


def _as_1d(group: Group, what: str, index: int) -> Tensor:
    t = group.detach() if isinstance(group, Tensor) else torch.as_tensor(group)
    t = t.to(device="cpu", dtype=torch.float64)
    if t.dim() != 1:
        raise ValueError(f"{what}[{index}] must be 1-D (one prompt group), got shape {tuple(t.shape)}")
    return t


class _PromptGroupMetric(Metric):
    """Shared update loop. Subclasses implement ``_group`` and declare their own sum states.

    ``n_prompts`` counts prompts that contributed to the metric; ``n_skipped`` counts prompts
    seen but not used (fewer than 2 scored replies, or the metric is undefined for them).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("n_prompts", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("n_skipped", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def _add_sum_state(self, name: str) -> None:
        self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _group(self, scores: Tensor, ranks: Tensor) -> dict[str, float] | None:
        """Increments of the sum states for one cleaned prompt group, or None to skip it."""
        raise NotImplementedError

    def update(self, scores: Sequence[Group], ranks: Sequence[Group]) -> None:
        """Add prompt groups: ``scores[k]`` and ``ranks[k]`` are the replies of prompt ``k``."""
        if (isinstance(scores, Tensor) and scores.dim() < 2) or (isinstance(ranks, Tensor) and ranks.dim() < 2):
            raise TypeError("scores and ranks are sequences of prompt groups; wrap a single group in a list")
        if len(scores) != len(ranks):
            raise ValueError(f"{len(scores)} score groups but {len(ranks)} rank groups")
        totals: dict[str, float] = {}
        used = skipped = 0
        for k, (s_raw, r_raw) in enumerate(zip(scores, ranks)):
            s, r = _as_1d(s_raw, "scores", k), _as_1d(r_raw, "ranks", k)
            if s.numel() != r.numel():
                raise ValueError(f"prompt group {k}: {s.numel()} scores but {r.numel()} ranks")
            if torch.isnan(r).any():
                raise ValueError(f"prompt group {k}: ranks must not be NaN")
            keep = ~torch.isnan(s)
            s, r = s[keep], r[keep]
            inc = self._group(s, r) if s.numel() >= 2 else None
            if inc is None:
                skipped += 1
                continue
            used += 1
            for name, value in inc.items():
                totals[name] = totals.get(name, 0.0) + value
        # One state write per update call, not per prompt, so GPU-resident states sync rarely.
        totals["n_prompts"], totals["n_skipped"] = used, skipped
        for name, value in totals.items():
            state = getattr(self, name)
            # Count states are int64: keep them integral so they stay exact however long the run.
            setattr(self, name, state + (value if state.is_floating_point() else round(value)))

    @staticmethod
    def _ratio(num: Tensor, den: Tensor) -> Tensor:
        den = den.to(torch.float64)
        if float(den) == 0.0:
            return torch.tensor(math.nan, dtype=torch.float64, device=num.device)
        return num.to(torch.float64) / den


# ---------------------------------------------------------------------------------------------
# The five metrics.


class PairwiseAccuracy(_PromptGroupMetric):
    """Share of reply pairs whose judge order agrees with the human order (micro-average).

    Pairs are the replies of the same prompt with *different* human ranks; pairs the humans tied
    are not counted. A pair scores 1 if the judge puts the human-better reply strictly higher,
    0 if strictly lower, and 0.5 if the judge gives both the same score (a tie is a coin flip).
    The result is the mean over all pairs of all prompts (so prompts with more replies weigh
    more). A prompt with no pair of different human ranks is skipped.

    States: ``agree`` (sum of pair scores), ``n_pairs``, ``n_prompts``, ``n_skipped``.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_sum_state("agree")
        self.add_state("n_pairs", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def _group(self, scores: Tensor, ranks: Tensor) -> dict[str, float] | None:
        human = _pair_signs(-ranks)  # +1: reply i better than reply j
        model = _pair_signs(scores)
        comparable = human != 0
        n = int(comparable.sum())
        if n == 0:
            return None
        h, m = human[comparable], model[comparable]
        agree = float((m == h).sum()) + 0.5 * float((m == 0).sum())
        return {"agree": agree, "n_pairs": n}

    def compute(self) -> Tensor:
        return self._ratio(self.agree, self.n_pairs)


class ExactMatch(_PromptGroupMetric):
    """Share of prompts whose whole judge ordering equals the human ordering.

    Strict: every pair of replies with different human ranks must be ordered the same way by the
    judge, and a judge tie on such a pair means no match. Pairs the humans tied may be ordered
    either way. A prompt with no pair of different human ranks is skipped.

    States: ``n_match``, ``n_prompts``, ``n_skipped``.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_sum_state("n_match")

    def _group(self, scores: Tensor, ranks: Tensor) -> dict[str, float] | None:
        human = _pair_signs(-ranks)
        comparable = human != 0
        if not bool(comparable.any()):
            return None
        match = bool((_pair_signs(scores)[comparable] == human[comparable]).all())
        return {"n_match": float(match)}

    def compute(self) -> Tensor:
        return self._ratio(self.n_match, self.n_prompts)


class FiveBest(_PromptGroupMetric):
    """Among replies the judge scores 5, the share that humans ranked best (rank 0).

    A reply counts as "scored 5" when its score is ``>= threshold`` (default 4.5, so an average
    of several judge samples such as 4.67 counts). Replies tied at rank 0 all count as best.
    The result is micro-averaged over replies; NaN when no reply reached the threshold.

    States: ``n_best`` (top-scored replies with rank 0), ``n_top`` (top-scored replies),
    ``n_prompts``, ``n_skipped``.
    """

    def __init__(self, threshold: float = 4.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = float(threshold)
        self._add_sum_state("n_best")
        self._add_sum_state("n_top")

    def _group(self, scores: Tensor, ranks: Tensor) -> dict[str, float] | None:
        top = scores >= self.threshold
        return {"n_top": float(top.sum()), "n_best": float((top & (ranks == 0)).sum())}

    def compute(self) -> Tensor:
        return self._ratio(self.n_best, self.n_top)


class _PerPromptCorrelation(_PromptGroupMetric):
    """Mean over prompts of a rank correlation between judge scores and human goodness (-rank).

    A prompt where either side is constant (all judge scores equal, or all human ranks equal)
    has no defined correlation and is skipped (counted in ``n_skipped``).

    States: ``corr_sum``, ``n_prompts``, ``n_skipped``.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_sum_state("corr_sum")

    @staticmethod
    def _corr(x: Tensor, y: Tensor) -> float:
        raise NotImplementedError

    def _group(self, scores: Tensor, ranks: Tensor) -> dict[str, float] | None:
        c = self._corr(scores, -ranks)
        return None if math.isnan(c) else {"corr_sum": c}

    def compute(self) -> Tensor:
        return self._ratio(self.corr_sum, self.n_prompts)


class Spearman(_PerPromptCorrelation):
    """Spearman's rho per prompt, averaged over prompts.

    Ties (in scores or ranks) get average ranks and rho is the Pearson correlation of those
    ranks, as in ``scipy.stats.spearmanr``. Constant prompts are skipped (``n_skipped``).
    """

    _corr = staticmethod(spearman_rho)


class KendallTau(_PerPromptCorrelation):
    """Kendall's tau-b per prompt, averaged over prompts.

    tau-b corrects for ties on either side, as ``scipy.stats.kendalltau`` (default variant 'b').
    Constant prompts are skipped (``n_skipped``).
    """

    _corr = staticmethod(kendall_tau_b)


# ---------------------------------------------------------------------------------------------
# All five at once.


class RewardMetrics(MetricCollection):
    """The five reward-modelling figures in one collection.

    ``update(scores, ranks)`` feeds every metric; ``compute()`` returns a dict with keys
    ``pairwise_accuracy``, ``exact_match``, ``five_best``, ``spearman``, ``kendall_tau`` (float64
    tensors) and ``n_prompts``, ``n_pairs`` (int64 tensors, from the pairwise-accuracy metric:
    prompts with at least one pair of different human ranks, and such pairs).

    Compute groups are off on purpose: several metrics have same-named states whose values can
    coincide on a first batch (e.g. Spearman and Kendall on a perfect order), which would make
    torchmetrics share their states wrongly.
    """

    def __init__(self, five_threshold: float = 4.5, prefix: str | None = None) -> None:
        super().__init__(
            {
                "pairwise_accuracy": PairwiseAccuracy(),
                "exact_match": ExactMatch(),
                "five_best": FiveBest(threshold=five_threshold),
                "spearman": Spearman(),
                "kendall_tau": KendallTau(),
            },
            prefix=prefix,
            compute_groups=False,
        )

    def compute(self) -> dict[str, Tensor]:
        out = super().compute()
        pairwise = self["pairwise_accuracy"]
        key = (self.prefix or "") + "{}"
        out[key.format("n_prompts")] = pairwise.n_prompts.clone()
        out[key.format("n_pairs")] = pairwise.n_pairs.clone()
        return out
