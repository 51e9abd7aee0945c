"""Meta-judging (Wu et al. 2024, Meta-Rewarding): the model judges its own judgements, which trains the judge.

With ``self_reward.meta_judge`` on (and the generative judge, which writes k judgements of each
candidate), every candidate whose k judgements disagree (two or more different parsed scores) is
meta-judged: M_t compares each two of its judgements of that candidate with the meta-judge template
(bundled ``meta_judge``: the judge's rubric, the question, the answer, evaluation A and evaluation
B), in both orders, reading the verdict from the probabilities of ``A`` and ``B`` after a forced
``Verdict:`` cue. A judgement's preference is the sum of its log-odds over the other in the two
orders (log p(A) - log p(B) where it is A, log p(B) - log p(A) where it is B): a position bias adds
the same amount to A in both orders and cancels. It wins when that sum is above zero; exactly zero
is a tie, counted and never guessed. Comparisons whose two orders disagree on their own (the bias
outweighs the preference: the 135M model's usual case, which gave no pairs at all when a win needed
both orders) are counted as ``order_flips``. Judgements are ranked by wins; the
one with most wins against the one with fewest becomes a judge preference pair

    {"id", "prompt": <the judge prompt of that candidate>, "chosen": <better judgement>,
     "rejected": <worse judgement>, "candidate_id", "wins": [...], "kind": "judge"}

A candidate whose best or worst place is shared (equal wins) gives no pair (``no_clear_order``).
The judge pairs are capped at ``meta_judge_share`` of the DPO round (``cap_judge_pairs``: at most
share / (1 - share) judge pairs per actor pair, a seeded choice, and at least one when there are actor
pairs and the share is above 0) and trained in the same round as the actor pairs. Judgements without a parsable score are never meta-judged (``unparsed``).

The step is deterministic (no sampling): a run killed during it recomputes it to the same file,
which is written atomically.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Optional, Sequence

from srlm.data.chat import encode_prompt
from srlm.prompts import PromptTemplate
from srlm.inference.judge import choice_token_ids
from srlm.inference.scoring import parse_score

CUE = "Verdict:"
JUDGE_PAIRS = "judge_pairs.jsonl"
META_FIELDS = ("rubric", "question", "response", "judgement_a", "judgement_b")


def rubric_of(judge_template: PromptTemplate) -> str:
    """The judge template's instructions: its text before the question."""
    return judge_template.text.split("{question}", 1)[0].split("<question>", 1)[0].strip()


def disagreeing(judgement: dict, max_score: int = 5) -> list[int]:
    """Indices of the parsed judgements of a candidate when at least two scores differ, else []."""
    outputs = judgement.get("outputs") or []
    parsed = [(i, parse_score(text, max_score=max_score)) for i, text in enumerate(outputs)]
    parsed = [(i, s) for i, s in parsed if s is not None]
    return [i for i, _ in parsed] if len({s for _, s in parsed}) > 1 else []


def outcome(straight: float, swapped: float) -> Optional[int]:
    """0 if judgement 0 wins, 1 if judgement 1 wins, None for a tie, from log p(A) - log p(B) in each order
    (judgement 0 shown as A, then as B): judgement 0's preference is ``straight - swapped``."""
    preference = straight - swapped
    return 0 if preference > 0 else 1 if preference < 0 else None


def rank(n: int, results: dict[tuple[int, int], Optional[int]]) -> Optional[tuple[int, int, list[int]]]:
    """(best, worst, wins) over ``n`` judgements from pairwise results {(i, j): winner or None}; None when the
    best or the worst place is shared."""
    wins = [0] * n
    for (i, j), winner in results.items():
        if winner is not None:
            wins[(i, j)[winner]] += 1
    order = sorted(range(n), key=lambda k: -wins[k])
    best, worst = order[0], order[-1]
    if wins.count(wins[best]) > 1 or wins.count(wins[worst]) > 1:
        return None
    return best, worst, wins


def cap_judge_pairs(judge_pairs: list[dict], actor_pairs: int, share: float, seed: int) -> list[dict]:
    """At most ``share`` of the round's pairs are judge pairs (at least one when the round has actor pairs and
    ``share`` > 0): a seeded choice of them, in their order."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"meta_judge_share must be in [0, 1), got {share}")
    limit = math.floor(share / (1.0 - share) * actor_pairs + 1e-9)
    if share > 0 and actor_pairs > 0:
        limit = max(limit, 1)  # a small round would otherwise never train the judge (1 actor pair at share 0.25)
    if len(judge_pairs) <= limit:
        return list(judge_pairs)
    keep = set(random.Random(seed).sample(range(len(judge_pairs)), limit))
    return [p for i, p in enumerate(judge_pairs) if i in keep]


def meta_judge(engine, tokenizer, template: PromptTemplate, judge_template: PromptTemplate,
               candidates: Sequence[dict], judgements: Sequence[dict], max_score: int = 5) -> tuple[list[dict], dict]:
    """Judge pairs from the candidates' disagreeing judgements, and counts. See the module docstring."""
    by_id = {c["id"]: c for c in candidates}
    rubric = rubric_of(judge_template)
    cue_ids, (id_a, id_b) = choice_token_ids(tokenizer, CUE)
    jobs, prompts = [], []  # (candidate id, i, j, order) per meta-judge prompt
    counts = {"judged_candidates": 0, "disagreeing": 0, "unparsed": 0, "comparisons": 0, "ties": 0, "order_flips": 0,
              "no_clear_order": 0, "judge_pairs": 0}
    chosen_sets: dict[str, list[int]] = {}
    for j in judgements:
        outputs = j.get("outputs") or []
        if j["id"] not in by_id or not outputs:
            continue
        counts["judged_candidates"] += 1
        counts["unparsed"] += sum(parse_score(t, max_score=max_score) is None for t in outputs)
        picked = disagreeing(j, max_score)
        if not picked:
            continue
        counts["disagreeing"] += 1
        chosen_sets[j["id"]] = picked
        cand = by_id[j["id"]]
        for a, b in itertools.combinations(range(len(picked)), 2):
            for first, second in ((a, b), (b, a)):
                text = template.fill(rubric=rubric, question=cand["prompt"], response=cand["response"],
                                     judgement_a=outputs[picked[first]].strip(),
                                     judgement_b=outputs[picked[second]].strip())
                jobs.append((j["id"], a, b, (first, second) == (a, b)))
                prompts.append(encode_prompt(tokenizer, text) + cue_ids)
    log_odds = [float(row[id_a]) - float(row[id_b]) for row in (engine.next_token_logprobs(prompts) if prompts else [])]
    per_pair: dict[tuple[str, int, int], list[float]] = {}
    for (cid, a, b, straight), value in zip(jobs, log_odds):
        # (straight order, swapped order) log-odds of A over B, judgement a shown first in the straight one
        per_pair.setdefault((cid, a, b), [0.0, 0.0])[0 if straight else 1] = value
    results: dict[str, dict[tuple[int, int], Optional[int]]] = {}
    for (cid, a, b), (straight, swapped) in per_pair.items():
        winner = outcome(straight, swapped)
        counts["comparisons"] += 1
        counts["ties"] += winner is None
        counts["order_flips"] += (straight > 0) == (swapped > 0)  # both orders favour the same position
        results.setdefault(cid, {})[(a, b)] = winner
    pairs = []
    for j in judgements:
        cid = j["id"]
        if cid not in chosen_sets:
            continue
        picked = chosen_sets[cid]
        ranked = rank(len(picked), results.get(cid, {}))
        if ranked is None:
            counts["no_clear_order"] += 1
            continue
        best, worst, wins = ranked
        cand, outputs = by_id[cid], j["outputs"]
        pairs.append({"id": f"{cid}-meta", "prompt": judge_template.fill(question=cand["prompt"], response=cand["response"]),
                      "chosen": outputs[picked[best]].strip(), "rejected": outputs[picked[worst]].strip(),
                      "candidate_id": cid, "wins": wins, "kind": "judge"})
    pairs = [p for p in pairs if p["chosen"] != p["rejected"]]
    counts["judge_pairs"] = len(pairs)
    return pairs, counts
