"""The EFT records of a judge's samples: usable targets, the set that agrees with the humans, balancing.

A judge sample is *usable* when its own text ends in a ``Score: N`` that ``parse_score`` reads (the
last score label decides), N is a whole number 0..5 (``4.5`` is not a target to teach), and it has a
justification before the score line that states no other score (``usable_score``); the target
judgement is that justification ended with a canonical ``Score: N`` line (``trim_judgement``).
``select_agreeing`` keeps, per prompt, the largest set of replies whose scores fall strictly as the
human rank falls; ``balance`` caps every score bin. ``build_eft`` and ``checked_eft`` use them.

Balancing rule (``max_per_score`` None): every integer score bin is capped at
``max(2 * smallest non-empty bin, ceil(kept / 6))``. Twice the rarest score bounds how far any
score may dominate; the floor (a uniform share of the kept set over the six scores) keeps one
rare score (a single 0, say) from cutting the whole set down to a handful of records. Which
records of an over-full bin stay is a seeded sample (``seed``), the same on every run.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from fractions import Fraction
from typing import Optional, Sequence

from srlm.inference.scoring import SCORE_LABEL, parse_score, score_bin

MAX_SCORE = 5


# -- choosing the judgements that agree with the humans ---------------------------------------------
def select_agreeing(replies: Sequence[tuple[int, Sequence[Optional[float]]]]) -> list[tuple[int, int]]:
    """The largest set of replies, one sample each, whose scores agree with the human ranking.

    ``replies[i] = (human rank, sampled scores)``, a score None where the sample is unusable.
    Returns ``(reply index, sample index)`` pairs, ordered by human rank then reply index, such
    that for any two chosen replies with ranks ``a < b`` (``a`` better) the chosen score of ``a``
    is strictly higher than that of ``b``; replies of equal rank are not ordered against each
    other. Among the largest such sets, the one whose chosen scores lie closest (summed absolute
    distance) to each reply's mean usable score is taken; a reply's sample is the one closest to
    its mean, the first on a tie; remaining ties go to the first solution found, trying higher
    scores first. Returns [] when no set holds two replies of different human rank (no agreement).

    A longest-chain dynamic programme over the human rank groups, best first: the state is the
    strict upper bound the next group's scores must stay under (the lowest score chosen so far)
    and whether one or two-plus groups were used; from a group it keeps every reply with a sample
    in ``[low, bound)``, for each candidate ``low``.
    """
    means: dict[int, Fraction] = {}
    values: set[float] = set()
    for i, (_, scores) in enumerate(replies):
        usable = [Fraction(s) for s in scores if s is not None]
        if usable:
            means[i] = sum(usable) / len(usable)
            values.update(s for s in scores if s is not None)
    lows = sorted(values, reverse=True)  # higher thresholds tried first
    groups: dict[int, list[int]] = {}
    for i, (rank, _) in enumerate(replies):
        groups.setdefault(rank, []).append(i)

    def pick(i: int, low: float, bound: float) -> Optional[tuple[int, Fraction, float]]:
        """(sample index, distance to mean, score) of reply i's best sample in [low, bound)."""
        best = None
        for k, s in enumerate(replies[i][1]):
            if s is None or not low <= s < bound:
                continue
            d = abs(Fraction(s) - means[i])
            if best is None or d < best[1]:
                best = (k, d, s)
        return best

    # state (bound, groups used capped at 2) -> ((kept, -distance), picks)
    inf = math.inf
    states: dict[tuple[float, int], tuple[tuple[int, Fraction], list[tuple[int, int]]]] = {
        (inf, 0): ((0, Fraction(0)), [])}
    for rank in sorted(groups):
        members = [i for i in groups[rank] if i in means]
        nxt = dict(states)  # leaving the group out keeps every state as it is
        for (bound, used), (value, picks) in states.items():
            for low in lows:
                if low >= bound:
                    continue
                chosen = [(i, p) for i in members if (p := pick(i, low, bound)) is not None]
                if not chosen:
                    continue
                key = (min(p[2] for _, p in chosen), min(used + 1, 2))
                new_value = (value[0] + len(chosen), value[1] - sum(p[1] for _, p in chosen))
                if key not in nxt or new_value > nxt[key][0]:
                    nxt[key] = (new_value, picks + [(i, p[0]) for i, p in chosen])
        states = nxt
    best = None
    for (bound, used), (value, picks) in states.items():
        if used >= 2 and (best is None or value > best[0]):
            best = (value, picks)
    return best[1] if best is not None else []


# -- balancing --------------------------------------------------------------------------------------
def histogram(records: Sequence[dict], max_score: int = MAX_SCORE) -> dict[str, int]:
    """``{"0": n0, ..., "5": n5}`` of the records' integer score bins."""
    counts = Counter(score_bin(r["score"]) for r in records)
    return {str(b): counts.get(b, 0) for b in range(max_score + 1)}


def default_cap(records: Sequence[dict], max_score: int = MAX_SCORE) -> Optional[int]:
    """``max(2 * smallest non-empty bin, ceil(len / (max_score + 1)))``; None when there are no records."""
    counts = [n for n in Counter(score_bin(r["score"]) for r in records).values() if n]
    if not counts:
        return None
    return max(2 * min(counts), math.ceil(len(records) / (max_score + 1)))


def balance(records: Sequence[dict], max_per_score: Optional[int] = None, seed: int = 0,
            max_score: int = MAX_SCORE) -> list[dict]:
    """At most ``max_per_score`` records per integer score bin (None: ``default_cap``), in input order.

    The records an over-full bin keeps are a sample seeded by ``(seed, bin)``: the same input and
    seed always keep the same records.
    """
    if max_per_score is None:
        max_per_score = default_cap(records, max_score)
        if max_per_score is None:
            return []
    if max_per_score < 0:
        raise ValueError(f"max_per_score must be >= 0, got {max_per_score}")
    bins: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        bins.setdefault(score_bin(r["score"]), []).append(i)
    keep: set[int] = set()
    for b, members in bins.items():
        if len(members) <= max_per_score:
            keep.update(members)
        else:
            keep.update(random.Random(f"{seed}-{b}").sample(members, max_per_score))
    return [r for i, r in enumerate(records) if i in keep]


# -- judgement text ---------------------------------------------------------------------------------
# Cut after the justification: trailing markdown, an opening quote, a "Final"/"Overall"/"Total" before the label.
_JUNK = r"[\s*_#>:(\[\-\u2013\u2014\"'\u201c\u2018`]*"
_TAIL = re.compile(rf"{_JUNK}(?:\b(?:(?:the|my)\s+)?(?:final|overall|total)\b)?{_JUNK}$", re.IGNORECASE)


def justification(text: str) -> str:
    """The judge's text before its last score label, without a dangling "Final"/markdown; '' if none."""
    labels = list(SCORE_LABEL.finditer(text or ""))
    body = text[:labels[-1].start()] if labels else (text or "")
    return _TAIL.sub("", body).strip()


def trim_judgement(text: str, score: int) -> str:
    """The judge's justification ending in a canonical ``Score: N`` line."""
    body = justification(text)
    return f"{body}\nScore: {score}" if body else f"Score: {score}"


def usable_score(text: str, max_score: int = MAX_SCORE) -> tuple[Optional[int], Optional[str]]:
    """(whole-number score, None) for a usable EFT target, else (None, why).

    why: ``unparsed`` (``parse_score`` reads nothing), ``non_integer`` (4.5), ``no_justification``
    (nothing before the score line), ``several_scores`` (the justification states another score).
    """
    score = parse_score(text, max_score=max_score)
    if score is None:
        return None, "unparsed"
    if score != int(score):
        return None, "non_integer"
    body = justification(text)
    if not body:
        return None, "no_justification"
    if SCORE_LABEL.search(body):  # "Score: 100, Score: 10, ... Score: 4": the last label parses, but it is no target
        return None, "several_scores"
    return int(score), None
