"""Preference pairs (and the positive-examples variant) from judged candidates.

Each candidate is ``{"prompt_id", "prompt", "candidate_id", "response", "score"}`` where
``score`` is the mean judge score, or None when no judgement could be parsed.

Per prompt, as in the paper: chosen = the highest-scoring candidate, rejected = the lowest.
- Unscored candidates (None or NaN) are left out entirely: never chosen, never rejected.
- A prompt needs at least two scored candidates (else ``dropped_too_few_scored``).
- If best - worst <= ``min_margin`` the prompt is dropped (``dropped_tie``); with the default
  0.0 this drops exactly the prompts whose scores are all equal.
- Equal best (or equal worst) scores are broken by the lowest ``candidate_id`` in natural order
  (``c2`` before ``c10``), so the output does not depend on the input order.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Optional


def _scored(score: Any) -> Optional[float]:
    if score is None:
        return None
    score = float(score)
    return None if math.isnan(score) else score


def _natural_key(candidate_id: Any) -> tuple:
    """Sort key that orders embedded numbers numerically: ``p1-c2`` < ``p1-c10``."""
    parts = re.split(r"(\d+)", str(candidate_id))
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts if p)


def build_pairs(candidates: Iterable[dict], *, min_margin: float = 0.0) -> tuple[list[dict], dict]:
    """(pairs, stats). Pairs come in order of each prompt's first candidate.

    A pair: ``{"id", "prompt", "chosen", "rejected", "chosen_id", "rejected_id", "score_chosen",
    "score_rejected"}``. Stats: ``prompts, pairs, dropped_tie, dropped_too_few_scored,
    unscored_candidates``.
    """
    if min_margin < 0:
        raise ValueError(f"min_margin must be >= 0, got {min_margin}")
    groups: dict[Any, list[dict]] = {}
    for c in candidates:
        groups.setdefault(c["prompt_id"], []).append(c)
    stats = {"prompts": len(groups), "pairs": 0, "dropped_tie": 0, "dropped_too_few_scored": 0,
             "unscored_candidates": 0}
    pairs = []
    for prompt_id, group in groups.items():
        scored = [(s, c) for c in group if (s := _scored(c.get("score"))) is not None]
        stats["unscored_candidates"] += len(group) - len(scored)
        if len(scored) < 2:
            stats["dropped_too_few_scored"] += 1
            continue
        # Sorting by id first makes min/max (which keep the first of equals) pick the lowest id.
        scored.sort(key=lambda sc: _natural_key(sc[1]["candidate_id"]))
        best_score, best = max(scored, key=lambda sc: sc[0])
        worst_score, worst = min(scored, key=lambda sc: sc[0])
        if best_score - worst_score <= min_margin:
            stats["dropped_tie"] += 1
            continue
        pairs.append({"id": prompt_id, "prompt": best["prompt"], "chosen": best["response"],
                      "rejected": worst["response"], "chosen_id": best["candidate_id"],
                      "rejected_id": worst["candidate_id"], "score_chosen": best_score,
                      "score_rejected": worst_score})
    stats["pairs"] = len(pairs)
    return pairs, stats


def positive_examples(candidates: Iterable[dict], *, min_score: float = 4.5) -> list[dict]:
    """SFT examples ``{"id", "prompt", "response"}`` from responses scoring >= ``min_score``.

    The paper's "positive examples only" variant adds the score-5 responses to the SFT data. Scores
    here are means over several judge samples, so the default 4.5 keeps responses whose samples were
    mostly 5s; pass 5.0 for the strict version. ``id`` is the candidate id; unscored responses are
    never used.
    """
    out = []
    for c in candidates:
        s = _scored(c.get("score"))
        if s is not None and s >= min_score:
            out.append({"id": c["candidate_id"], "prompt": c["prompt"], "response": c["response"]})
    return out
