"""Tests for srlm.metrics.reward: hand-computed cases, scipy agreement, and state merging."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from srlm.metrics import (
    ExactMatch,
    FiveBest,
    KendallTau,
    PairwiseAccuracy,
    RewardMetrics,
    Spearman,
)

NAN = float("nan")


def _value(metric_cls, scores, ranks, **kwargs) -> float:
    m = metric_cls(**kwargs)
    m.update(scores, ranks)
    return float(m.compute())


# ---------------------------------------------------------------------------------------------
# Hand-computed cases.


def test_perfect_order() -> None:
    scores, ranks = [[5.0, 3.0, 1.0], [4.0, 2.0]], [[0, 1, 2], [0, 1]]
    out = RewardMetrics()
    out.update(scores, ranks)
    r = out.compute()
    assert float(r["pairwise_accuracy"]) == 1.0
    assert float(r["exact_match"]) == 1.0
    assert float(r["five_best"]) == 1.0
    assert float(r["spearman"]) == pytest.approx(1.0)
    assert float(r["kendall_tau"]) == pytest.approx(1.0)
    assert int(r["n_prompts"]) == 2 and int(r["n_pairs"]) == 4
    assert r["pairwise_accuracy"].dtype == torch.float64


def test_reversed_order() -> None:
    scores, ranks = [[1.0, 3.0, 5.0], [2.0, 4.0]], [[0, 1, 2], [0, 1]]
    assert _value(PairwiseAccuracy, scores, ranks) == 0.0
    assert _value(ExactMatch, scores, ranks) == 0.0
    assert _value(FiveBest, scores, ranks) == 0.0  # the one 5 went to a rank-2 reply
    assert _value(Spearman, scores, ranks) == pytest.approx(-1.0)
    assert _value(KendallTau, scores, ranks) == pytest.approx(-1.0)


def test_model_tie() -> None:
    # Pairs (0,1) tie -> 0.5, (0,2) agree -> 1, (1,2) agree -> 1: (0.5 + 2) / 3.
    scores, ranks = [[4.0, 4.0, 1.0]], [[0, 1, 2]]
    assert _value(PairwiseAccuracy, scores, ranks) == pytest.approx(2.5 / 3)
    assert _value(ExactMatch, scores, ranks) == 0.0  # a tie across human ranks is no match
    # Spearman: score ranks [2.5, 2.5, 1] vs goodness ranks [3, 2, 1] -> sqrt(3)/2.
    assert _value(Spearman, scores, ranks) == pytest.approx(math.sqrt(3) / 2)
    # tau-b: con - dis = 2, untied pairs 2 (scores) and 3 (ranks) -> 2 / sqrt(6).
    assert _value(KendallTau, scores, ranks) == pytest.approx(2 / math.sqrt(6))


def test_human_tie_pairs_are_not_counted() -> None:
    # Humans tie replies 1 and 2; only pairs (0,1) and (0,2) count, both agree.
    scores, ranks = [[5.0, 2.0, 3.0]], [[0, 1, 1]]
    m = PairwiseAccuracy()
    m.update(scores, ranks)
    assert float(m.compute()) == 1.0 and int(m.n_pairs) == 2
    assert _value(ExactMatch, scores, ranks) == 1.0  # human-tied pair may be ordered either way


def test_mixed_pairs_micro_average() -> None:
    # Prompt A: 3 pairs, all right. Prompt B: 1 pair, wrong. Micro: 3/4 (macro would be 1/2).
    scores, ranks = [[3.0, 2.0, 1.0], [1.0, 2.0]], [[0, 1, 2], [0, 1]]
    assert _value(PairwiseAccuracy, scores, ranks) == pytest.approx(0.75)
    assert _value(ExactMatch, scores, ranks) == pytest.approx(0.5)
    assert _value(Spearman, scores, ranks) == pytest.approx(0.0)  # (1 + -1) / 2


def test_nan_scores_are_dropped() -> None:
    # Prompt A: the NaN reply goes; [5, 2] vs ranks [1, 2] -> all right.
    # Prompt B: left with one reply -> skipped everywhere.
    scores, ranks = [[NAN, 5.0, 2.0], [NAN, 3.0]], [[0, 1, 2], [0, 1]]
    m = PairwiseAccuracy()
    m.update(scores, ranks)
    assert float(m.compute()) == 1.0
    assert int(m.n_pairs) == 1 and int(m.n_prompts) == 1 and int(m.n_skipped) == 1
    assert _value(ExactMatch, scores, ranks) == 1.0
    # The 5 went to a rank-1 reply (the rank-0 reply had no score).
    assert _value(FiveBest, scores, ranks) == 0.0
    sp = Spearman()
    sp.update(scores, ranks)
    assert float(sp.compute()) == pytest.approx(1.0)
    assert int(sp.n_prompts) == 1 and int(sp.n_skipped) == 1


def test_five_best_threshold_and_counts() -> None:
    scores = [[5.0, 4.67, 3.0], [4.4, 5.0], [5.0, 5.0, 1.0]]
    ranks = [[0, 1, 2], [0, 1], [1, 0, 2]]
    # Top-scored replies (>= 4.5): 5.0 r0, 4.67 r1, 5.0 r1, 5.0 r1, 5.0 r0 -> 2 / 5.
    m = FiveBest()
    m.update(scores, ranks)
    assert float(m.compute()) == pytest.approx(2 / 5)
    assert float(m.n_top) == 5 and float(m.n_best) == 2
    # A threshold of 5 leaves out the 4.67 (rank 1): 2 / 4.
    assert _value(FiveBest, scores, ranks, threshold=5.0) == pytest.approx(2 / 4)


def test_five_best_nan_without_any_five() -> None:
    assert math.isnan(_value(FiveBest, [[3.0, 2.0]], [[0, 1]]))


def test_constant_prompts_skipped_in_correlations() -> None:
    # Prompt A: constant scores; prompt B: constant ranks; prompt C: perfect.
    scores = [[3.0, 3.0, 3.0], [1.0, 2.0], [2.0, 1.0]]
    ranks = [[0, 1, 2], [0, 0], [0, 1]]
    for cls in (Spearman, KendallTau):
        m = cls()
        m.update(scores, ranks)
        assert float(m.compute()) == pytest.approx(1.0)
        assert int(m.n_prompts) == 1 and int(m.n_skipped) == 2
    # Pairwise: A gives 3 ties = 1.5 / 3, B no pairs (skipped), C 1 / 1 -> 2.5 / 4.
    m = PairwiseAccuracy()
    m.update(scores, ranks)
    assert float(m.compute()) == pytest.approx(2.5 / 4)
    assert int(m.n_skipped) == 1


def test_empty_compute_is_nan() -> None:
    m = Spearman()
    m.update([[NAN, NAN]], [[0, 1]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(float(m.compute()))


def test_input_checks() -> None:
    m = PairwiseAccuracy()
    with pytest.raises(ValueError):
        m.update([[1.0, 2.0]], [[0, 1], [0, 1]])
    with pytest.raises(ValueError):
        m.update([[1.0, 2.0]], [[0, 1, 2]])
    with pytest.raises(TypeError):
        m.update(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))


def test_tensor_inputs_and_2d_batches() -> None:
    scores = torch.tensor([[5.0, 3.0, 1.0], [1.0, 3.0, 5.0]], dtype=torch.float32)
    ranks = torch.tensor([[0, 1, 2], [0, 1, 2]])
    assert _value(PairwiseAccuracy, scores, ranks) == pytest.approx(0.5)
    assert _value(Spearman, list(scores), list(ranks)) == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------
# Random cases against scipy, averaged per prompt.


def _random_groups(seed: int, n_groups: int = 200):
    rng = np.random.default_rng(seed)
    scores, ranks = [], []
    for _ in range(n_groups):
        n = int(rng.integers(2, 8))
        # Integer judge scores 1..5 (many ties) or continuous averages; human ranks with ties.
        s = rng.integers(1, 6, size=n).astype(float) if rng.random() < 0.5 else rng.normal(size=n)
        if rng.random() < 0.2:
            s[rng.integers(0, n)] = np.nan
        r = rng.permutation(n) if rng.random() < 0.7 else rng.integers(0, 3, size=n)
        scores.append(s.tolist())
        ranks.append(r.tolist())
    return scores, ranks


def _scipy_mean(fn, scores, ranks) -> tuple[float, int]:
    vals = []
    for s, r in zip(scores, ranks):
        s, r = np.asarray(s, dtype=float), -np.asarray(r, dtype=float)
        keep = ~np.isnan(s)
        s, r = s[keep], r[keep]
        if len(s) < 2 or np.all(s == s[0]) or np.all(r == r[0]):
            continue
        vals.append(fn(s, r))
    return float(np.mean(vals)), len(vals)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scipy(seed: int) -> None:
    scores, ranks = _random_groups(seed)
    ref_sp, n_sp = _scipy_mean(lambda a, b: stats.spearmanr(a, b).statistic, scores, ranks)
    ref_kt, n_kt = _scipy_mean(lambda a, b: stats.kendalltau(a, b, variant="b").statistic, scores, ranks)
    sp, kt = Spearman(), KendallTau()
    sp.update(scores, ranks)
    kt.update(scores, ranks)
    assert abs(float(sp.compute()) - ref_sp) < 1e-9
    assert abs(float(kt.compute()) - ref_kt) < 1e-9
    assert int(sp.n_prompts) == n_sp and int(kt.n_prompts) == n_kt
    assert int(sp.n_prompts) + int(sp.n_skipped) == len(scores)


def test_pairwise_matches_brute_force() -> None:
    scores, ranks = _random_groups(7)
    total = agree = 0.0
    for s, r in zip(scores, ranks):
        kept = [(a, b) for a, b in zip(s, r) if not math.isnan(a)]
        if len(kept) < 2:
            continue
        for i in range(len(kept)):
            for j in range(i + 1, len(kept)):
                (si, ri), (sj, rj) = kept[i], kept[j]
                if ri == rj:
                    continue
                total += 1
                better_i = ri < rj
                agree += 0.5 if si == sj else float((si > sj) == better_i)
    assert _value(PairwiseAccuracy, scores, ranks) == pytest.approx(agree / total, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Merging states, as DDP does with dist_reduce_fx="sum".


def _results(metric) -> dict[str, float]:
    out = metric.compute()
    return {k: float(v) for k, v in out.items()}


def test_merge_two_ranks_equals_one() -> None:
    scores, ranks = _random_groups(3, n_groups=101)
    full = RewardMetrics()
    full.update(scores, ranks)

    a, b = RewardMetrics(), RewardMetrics()
    a.update(scores[:50], ranks[:50])
    b.update(scores[50:], ranks[50:])
    for name in a.keys():
        a[name].merge_state(b[name])
    merged, expected = _results(a), _results(full)
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        assert merged[key] == pytest.approx(value, abs=1e-12), key


def test_summed_states_equal_one_instance() -> None:
    # Simulate the all-reduce by hand: every state is a scalar sum.
    scores, ranks = _random_groups(4, n_groups=60)
    for cls in (PairwiseAccuracy, ExactMatch, FiveBest, Spearman, KendallTau):
        full, a, b = cls(), cls(), cls()
        full.update(scores, ranks)
        a.update(scores[:25], ranks[:25])
        b.update(scores[25:], ranks[25:])
        for name in a._defaults:
            state_a, state_b = getattr(a, name), getattr(b, name)
            assert state_a.dim() == 0  # fixed-size states only
            setattr(a, name, state_a + state_b)
        assert float(a.compute()) == pytest.approx(float(full.compute()), abs=1e-12), cls.__name__


def test_reset_and_prefix() -> None:
    m = RewardMetrics(prefix="rm/")
    m.update([[5.0, 1.0]], [[0, 1]])
    out = m.compute()
    assert set(out) == {
        "rm/pairwise_accuracy",
        "rm/exact_match",
        "rm/five_best",
        "rm/spearman",
        "rm/kendall_tau",
        "rm/n_prompts",
        "rm/n_pairs",
    }
    m.reset()
    m.update([[1.0, 5.0]], [[0, 1]])
    assert float(m.compute()["rm/pairwise_accuracy"]) == 0.0
