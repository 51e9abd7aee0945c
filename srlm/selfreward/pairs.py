"""Preference pairs (and the positive-examples variant) from judged candidates.

Each candidate is ``{"prompt_id", "prompt", "candidate_id", "response", "score", "finished"?}`` where
``score`` is the mean judge score, or None when no judgement could be parsed, and ``finished`` is
False for a response cut at ``max_new_tokens`` (missing: finished).

Per prompt, as in the paper: chosen = the highest-scoring response, rejected = the lowest.
- Unscored candidates (None or NaN) are left out entirely: never chosen, never rejected.
- A prompt needs at least two scored candidates (else ``dropped_too_few_scored``).
- Candidates with the same text (after strip) are one response, scored by the mean of their scores:
  a pair never has chosen == rejected. A prompt with fewer than two distinct scored texts is
  dropped (``dropped_identical``).
- A response cut at ``max_new_tokens`` is never chosen (DPO would teach stopping mid-sentence) unless
  ``allow_unfinished_chosen``; it may be rejected (a cut, rambling answer is a fair loser), and its pair
  then says ``"rejected_finished": false`` so that training appends no end-of-turn token to it.
  ``unfinished_not_chosen`` counts the prompts whose best-scored response was cut and so passed over;
  those where no finished response beats another by the margin are dropped (``dropped_unfinished``).
- If best - worst <= ``min_margin`` the prompt is dropped (``dropped_tie``); with the default
  0.0 this drops exactly the prompts whose scores are all equal.
- Equal best (or equal worst) scores are broken by the lowest ``candidate_id`` in natural order
  (``c2`` before ``c10``), so the output does not depend on the input order.
- Length control (``length_control``, Meta-Rewarding's rule): among the choosable responses scoring
  within ``length_control`` of the best, the shortest (in characters) is chosen; it must still beat
  the rejected one by more than ``min_margin``. ``length_controlled`` counts the pairs where this
  picked another response than the best-scored one. Every run records the mean chosen and rejected
  lengths in characters and their ratio (``length_ratio`` = mean chosen / mean rejected).
- Anchored rejection (``anchored``, Temporal Self-Rewarding): candidates marked ``"anchor": true``
  (an earlier model's samples for the same prompt, judged by the same judge) are the only ones that
  can be rejected, and never chosen; the others are the only ones that can be chosen.
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


def _finished(candidate: dict) -> bool:
    return candidate.get("finished", True) is not False


def _distinct(scored: list[tuple[float, dict]]) -> list[tuple[float, dict]]:
    """One (mean score, representative) per distinct text, in the order of each text's lowest id.

    ``scored`` is sorted by id; the representative is the text's lowest-id finished copy, if any.
    """
    texts: dict[str, list[tuple[float, dict]]] = {}
    for s, c in scored:
        texts.setdefault(c["response"].strip(), []).append((s, c))
    out = []
    for copies in texts.values():
        finished = [c for _, c in copies if _finished(c)]
        out.append((sum(s for s, _ in copies) / len(copies), finished[0] if finished else copies[0][1]))
    return out


def build_pairs(candidates: Iterable[dict], *, min_margin: float = 0.0, allow_unfinished_chosen: bool = False,
                length_control: Optional[float] = None, anchored: bool = False) -> tuple[list[dict], dict]:
    """(pairs, stats). Pairs come in order of each prompt's first candidate.

    A pair: ``{"id", "prompt", "chosen", "rejected", "chosen_id", "rejected_id", "score_chosen",
    "score_rejected"}``, plus ``"chosen_finished": false`` / ``"rejected_finished": false`` when that
    response was cut at ``max_new_tokens``. Stats: ``prompts, pairs, dropped_tie, dropped_too_few_scored,
    dropped_identical, dropped_unfinished, unscored_candidates, unfinished_not_chosen, length_controlled,
    chosen_chars, rejected_chars, length_ratio``.
    """
    if min_margin < 0:
        raise ValueError(f"min_margin must be >= 0, got {min_margin}")
    if length_control is not None and length_control < 0:
        raise ValueError(f"length_control must be >= 0, got {length_control}")
    groups: dict[Any, list[dict]] = {}
    for c in candidates:
        groups.setdefault(c["prompt_id"], []).append(c)
    stats = {"prompts": len(groups), "pairs": 0, "dropped_tie": 0, "dropped_too_few_scored": 0,
             "dropped_identical": 0, "dropped_unfinished": 0, "unscored_candidates": 0, "unfinished_not_chosen": 0,
             "length_controlled": 0}
    pairs = []
    for prompt_id, group in groups.items():
        scored = [(s, c) for c in group if (s := _scored(c.get("score"))) is not None]
        stats["unscored_candidates"] += len(group) - len(scored)
        if len(scored) < 2:
            stats["dropped_too_few_scored"] += 1
            continue
        # Sorting by id first makes min/max (which keep the first of equals) pick the lowest id.
        scored.sort(key=lambda sc: _natural_key(sc[1]["candidate_id"]))
        texts = _distinct(scored)
        if len(texts) < 2:
            stats["dropped_identical"] += 1
            continue
        choosable = [sc for sc in texts if (allow_unfinished_chosen or _finished(sc[1]))
                     and not (anchored and sc[1].get("anchor"))]
        top = max(texts, key=lambda sc: sc[0])[1]
        passed_over = not (allow_unfinished_chosen or _finished(top))  # the best-scored text was cut
        stats["unfinished_not_chosen"] += passed_over
        if not choosable:
            stats["dropped_unfinished"] += 1
            continue
        best_score, best = max(choosable, key=lambda sc: sc[0])
        if length_control is not None:  # the shortest of the near-best (min keeps the lowest id of equals)
            short_score, short = min((sc for sc in choosable if sc[0] >= best_score - length_control),
                                     key=lambda sc: len(sc[1]["response"].strip()))
            stats["length_controlled"] += short is not best
            best_score, best = short_score, short
        rejectable = [sc for sc in texts if sc[1] is not best and (not anchored or sc[1].get("anchor"))]
        if not rejectable:
            stats["dropped_too_few_scored"] += 1
            continue
        worst_score, worst = min(rejectable, key=lambda sc: sc[0])
        if best_score - worst_score <= min_margin:
            stats["dropped_unfinished" if passed_over else "dropped_tie"] += 1
            continue
        pair = {"id": prompt_id, "prompt": best["prompt"], "chosen": best["response"], "rejected": worst["response"],
                "chosen_id": best["candidate_id"], "rejected_id": worst["candidate_id"], "score_chosen": best_score,
                "score_rejected": worst_score}
        for side, c in (("chosen", best), ("rejected", worst)):
            if not _finished(c):
                pair[f"{side}_finished"] = False
        pairs.append(pair)
    stats["pairs"] = len(pairs)
    chosen = [len(p["chosen"].strip()) for p in pairs]
    rejected = [len(p["rejected"].strip()) for p in pairs]
    stats["chosen_chars"] = round(sum(chosen) / len(chosen), 1) if pairs else None
    stats["rejected_chars"] = round(sum(rejected) / len(rejected), 1) if pairs else None
    stats["length_ratio"] = round(sum(chosen) / sum(rejected), 3) if pairs and sum(rejected) else None
    return pairs, stats


def positive_examples(candidates: Iterable[dict], *, min_score: float = 4.5) -> list[dict]:
    """SFT examples ``{"id", "prompt", "response"}`` from responses scoring >= ``min_score``.

    The paper's "positive examples only" variant adds the score-5 responses to the SFT data. Scores
    here are means over several judge samples, so the default 4.5 keeps responses whose samples were
    mostly 5s; pass 5.0 for the strict version. ``id`` is the candidate id; unscored responses, and
    responses cut at ``max_new_tokens`` (``finished`` false: SFT would teach stopping there), are never used.
    """
    out = []
    for c in candidates:
        s = _scored(c.get("score"))
        if s is not None and s >= min_score and _finished(c):
            out.append({"id": c["candidate_id"], "prompt": c["prompt"], "response": c["response"]})
    return out
