"""The paper's EFT seed: the SFT baseline judges human-ranked replies; judgements that agree are kept.

    python main.py split-ranked --input ../shared/data/oasst1-en-sample.jsonl \
        --train_output runs/eft/oasst_train_ranked.jsonl --eval_output runs/eft/oasst_eval_ranked.jsonl
    python main.py build-eft --ranked runs/eft/oasst_train_ranked.jsonl --output runs/eft/eft_oasst.jsonl \
        --model runs/loop/m1 --samples 4

How (Yuan et al. 2024, "Data"): the SFT baseline (``--model``: hub id, folder, ``embedded:...``, or
an srlm model/run folder) judges every reply of every ranked prompt ``samples`` times with the
generative judge (the additive rubric, ``judge_template``). A judge sample is *usable* when its own
text ends in a ``Score: N`` that ``parse_score`` reads (the last score label decides), N is a whole
number 0..5 (the rubric asks for one: ``4.5`` is not a target to teach), and it has a
justification before the score line that states no other score (``parse_score`` lets the last of
several labels decide, but "Score: 10, Score: 3, Score: 4" is no example to train a judge on). Per prompt, ``select_agreeing`` keeps the largest set of
replies, one usable sample each, whose scores strictly decrease as the human rank goes down (rank
0 = best gets the highest score); replies the humans tied are not ordered against each other. A
prompt with no ordered pair among its kept replies contributes nothing. The kept set is then
balanced across scores (``balance``), and written as EFT records

    {"id", "question", "answer", "judgement", "score", "prompt_id", "reply_rank"}

where ``judgement`` is the judge's own text cut at the last score label and ended with a
canonical ``Score: N`` line, so the SFT DataModule loads it as EFT (``eft_files``) and the trained
judge learns the very format the parser and the logit judge's ``Score:`` cue expect.

Balancing rule (``max_per_score`` None): every integer score bin is capped at
``max(2 * smallest non-empty bin, ceil(kept / 6))``. Twice the rarest score bounds how far any
score may dominate; the floor (a uniform share of the kept set over the six scores) keeps one
rare score (a single 0, say) from cutting the whole set down to a handful of records. Which
records of an over-full bin stay is a seeded sample (``seed``), the same on every run.

Files: ``<output>`` (EFT, written atomically at the end), ``<output>.samples.jsonl`` (every judge
sample, one row per reply ``{id, prompt_id, reply_index, reply_rank, score, scores, outputs}``,
appended per engine batch: a killed run rerun with the same arguments judges only the replies
that are missing, in the same fixed batches with the same seeds, so it ends with the same files)
and ``<output>.stats.json`` (counts, unparsed rate, histograms before and after balancing, and the
judge's reward-modelling metrics on these prompts from its mean scores).
"""

from __future__ import annotations

import math
import random
import re
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence

from srlm.data.records import JsonlAppender, RankedPrompt, iter_jsonl, write_json, write_jsonl
from srlm.models.backbone import DEFAULT_MODEL
from srlm.inference.scoring import _LABEL, parse_score, score_bin

MAX_SCORE = 5
SAMPLES_SUFFIX, STATS_SUFFIX = ".samples.jsonl", ".stats.json"


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


_balance = balance  # build_eft's argument ``balance`` shadows the function inside it


# -- judgement text ---------------------------------------------------------------------------------
# Cut after the justification: trailing markdown, an opening quote, a "Final"/"Overall"/"Total" before the label.
_JUNK = r"[\s*_#>:(\[\-\u2013\u2014\"'\u201c\u2018`]*"
_TAIL = re.compile(rf"{_JUNK}(?:\b(?:(?:the|my)\s+)?(?:final|overall|total)\b)?{_JUNK}$", re.IGNORECASE)


def justification(text: str) -> str:
    """The judge's text before its last score label, without a dangling "Final"/markdown; '' if none."""
    labels = list(_LABEL.finditer(text or ""))
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
    if _LABEL.search(body):  # "Score: 100, Score: 10, ... Score: 4": the last label parses, but it is no target
        return None, "several_scores"
    return int(score), None


# -- the command ------------------------------------------------------------------------------------
def _reply_id(prompt: RankedPrompt, index: int) -> str:
    return f"{prompt.id}-r{index}"


def build_eft_with(engine, tokenizer, ranked: Sequence[RankedPrompt], output: str, *, samples: int = 4,
                   sampling=None, template="judge_additive", balance: bool = True,
                   max_per_score: Optional[int] = None, seed: int = 0, model: Optional[str] = None,
                   adapter: Optional[str] = None, ranked_file: Optional[str] = None,
                   show_progress: bool = True) -> dict:
    """``build_eft`` with an already loaded engine; returns the stats (also written to ``<output>.stats.json``)."""
    from srlm.evaluation.reward import reward_metrics_from_scores
    from srlm.prompts import load_template
    from srlm.inference.engine import Sampling
    from srlm.inference.judge import GenerativeJudge
    from srlm.selfreward.steps import Progress

    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not ranked:
        raise ValueError("no ranked prompts to judge")
    sampling = sampling or Sampling(0.7, 0.9, 160)
    if isinstance(template, str):
        template = load_template(template, "question", "response")
    judge = GenerativeJudge(engine, tokenizer, template, samples, sampling, MAX_SCORE)
    output = Path(output)
    samples_path, stats_path = Path(f"{output}{SAMPLES_SUFFIX}"), Path(f"{output}{STATS_SUFFIX}")

    items = [(p, i) for p in ranked for i in range(len(p.replies))]
    ids = [_reply_id(p, i) for p, i in items]
    if len(set(ids)) != len(ids):
        raise ValueError("ranked prompts with duplicate ids: every prompt id must be unique")
    wanted = set(ids)
    rows: dict[str, dict] = {}
    if samples_path.exists():
        for line, row in iter_jsonl(samples_path):
            if row.get("id") not in wanted:
                continue
            if len(row.get("scores", [])) != samples:
                raise ValueError(f"{samples_path}:{line}: judged with {len(row.get('scores', []))} samples per reply, "
                                 f"not {samples}: use another --output or delete the file")
            rows[row["id"]] = row
    bar = Progress("judging replies", len(items), len(rows), show_progress)
    start = time.time()
    with JsonlAppender(samples_path) as out:
        def on_batch(indices, results):
            new = []
            for i, res in zip(indices, results):
                if ids[i] in rows:
                    continue
                prompt, index = items[i]
                row = {"id": ids[i], "prompt_id": prompt.id, "reply_index": index,
                       "reply_rank": prompt.replies[index].rank, "score": res.score, "scores": res.scores,
                       "outputs": res.outputs}
                new.append(row)
                rows[ids[i]] = row
            out.write_many(new)
            bar.update(len(new))

        if len(rows) < len(items):
            judge.score([(p.prompt, p.replies[i].text) for p, i in items], on_batch=on_batch,
                        skip=lambda chunk: all(ids[i] in rows for i in chunk), seed=seed)
    bar.close()
    judge_seconds = time.time() - start

    # choose, per prompt, the judgements that agree with the human ranking
    why: Counter[str] = Counter()
    sample_scores: list[dict] = []
    kept: list[dict] = []
    prompts_used = unusable_replies = 0
    for prompt in ranked:
        per_reply = []
        for index, reply in enumerate(prompt.replies):
            row = rows[_reply_id(prompt, index)]
            usable = []
            for text in row["outputs"]:
                score, reason = usable_score(text)
                why[reason or "usable"] += 1
                usable.append(score)
                if score is not None:
                    sample_scores.append({"score": score})
            unusable_replies += all(s is None for s in usable)
            per_reply.append((reply.rank, usable))
        chosen = select_agreeing(per_reply)
        prompts_used += bool(chosen)
        for index, k in chosen:
            row = rows[_reply_id(prompt, index)]
            score = per_reply[index][1][k]
            kept.append({"id": _reply_id(prompt, index), "question": prompt.prompt,
                         "answer": prompt.replies[index].text, "judgement": trim_judgement(row["outputs"][k], score),
                         "score": score, "prompt_id": prompt.id, "reply_rank": prompt.replies[index].rank})
    cap = (max_per_score if max_per_score is not None else default_cap(kept)) if balance else None
    final = _balance(kept, cap, seed) if balance and kept else list(kept)
    written = write_jsonl(output, final)

    n_samples = len(items) * samples
    scores_rows = [{"prompt_id": rows[ids[j]]["prompt_id"], "human_rank": rows[ids[j]]["reply_rank"],
                    "model_score": rows[ids[j]]["score"]} for j in range(len(items))]
    stats = {
        "model": model, "adapter": adapter, "ranked": ranked_file, "output": str(output),
        "samples": samples, "temperature": sampling.temperature, "top_p": sampling.top_p,
        "max_new_tokens": sampling.max_new_tokens, "seed": seed,
        "prompts": len(ranked), "replies_judged": len(items), "judge_samples": n_samples,
        "unparsed_samples": why["unparsed"], "unparsed_rate": round(why["unparsed"] / n_samples, 4),
        "non_integer_samples": why["non_integer"], "no_justification_samples": why["no_justification"],
        "several_scores_samples": why["several_scores"],
        "usable_samples": why["usable"], "replies_without_usable_sample": unusable_replies,
        "prompts_used": prompts_used, "kept": len(kept), "written": written,
        "balance": balance, "max_per_score": cap,
        "histogram_samples": histogram(sample_scores), "histogram_before": histogram(kept),
        "histogram_after": histogram(final),
        "judge_seconds_this_run": round(judge_seconds, 1),
        # the baseline as a reward model on these prompts, from each reply's mean parsed score
        "reward_metrics": reward_metrics_from_scores(scores_rows),
    }
    write_json(stats_path, stats)
    print(f"EFT: {written} records from {len(kept)} agreeing judgements on {prompts_used} of {len(ranked)} prompts; "
          f"{why['unparsed']} of {n_samples} samples unparsed; before {stats['histogram_before']} "
          f"after {stats['histogram_after']} -> {output}")
    return stats


def build_eft(ranked: str, output: str, model: str = DEFAULT_MODEL, adapter: Optional[str] = None, samples: int = 4,
              temperature: float = 0.7, top_p: float = 0.9, max_new_tokens: int = 160,
              judge_template: str = "judge_additive", balance: bool = True, max_per_score: Optional[int] = None,
              max_prompts: Optional[int] = None, batch_size: int = 8, seed: int = 0) -> dict:
    """Build EFT judge-training data: the SFT baseline's judgements of human-ranked replies that agree with the humans.

    Writes ``output`` (EFT jsonl ``{id, question, answer, judgement, score, prompt_id, reply_rank}``,
    atomically), ``output.samples.jsonl`` (every judge sample; a rerun resumes from it) and
    ``output.stats.json``. See the module docstring for the selection and balancing rules.

    Args:
        ranked: ranked prompts jsonl (``{"id", "prompt", "replies": [{"text", "rank"}]}``), or an
            OpenAssistant message export (converted on the fly). Use the train side of ``split-ranked``.
        output: the EFT file to write.
        model: the SFT baseline: base model (hub id, folder, or embedded:...), or an srlm model folder
            (an exported adapter, or a run's m1/ folder holding one in model/).
        adapter: an srlm adapter folder on top of the base.
        samples: judge samples per reply.
        temperature: judge sampling temperature.
        top_p: judge nucleus sampling mass.
        max_new_tokens: longest judgement in tokens.
        judge_template: judge template (bundled name or path) with {question} and {response}.
        balance: cap every score bin (see max_per_score).
        max_per_score: records per integer score at most; None: max(2 x smallest non-empty bin, ceil(kept / 6)).
        max_prompts: judge only the first this many ranked prompts.
        batch_size: judge prompts per forward (each with ``samples`` rows).
        seed: judge sampling seed and balancing seed.
    """
    from srlm.inference.loading import load_engine, release, resolve_model
    from srlm.evaluation.reward import load_ranked
    from srlm.inference.engine import Sampling

    prompts = load_ranked(ranked, max_prompts)
    base, adapter = resolve_model(model, adapter)
    engine, tokenizer = load_engine(base, adapter, batch_size=batch_size, seed=seed)
    try:
        return build_eft_with(engine, tokenizer, prompts, output, samples=samples,
                              sampling=Sampling(temperature, top_p, max_new_tokens), template=judge_template,
                              balance=balance, max_per_score=max_per_score, seed=seed, model=base, adapter=adapter,
                              ranked_file=str(ranked))
    finally:
        release(engine)
