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

The selection (``select_agreeing``), the usable-sample rule and the balancing rule (``balance``) live in
``srlm.selfreward.eft_records``.

Files: ``<output>`` (EFT, written atomically at the end), ``<output>.samples.jsonl`` (every judge
sample, one row per reply ``{id, prompt_id, reply_index, reply_rank, score, scores, outputs}``,
appended per engine batch: a killed run rerun with the same arguments judges only the replies
that are missing, in the same fixed batches with the same seeds, so it ends with the same files)
and ``<output>.stats.json`` (counts, unparsed rate, histograms before and after balancing, and the
judge's reward-modelling metrics on these prompts from its mean scores).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

from srlm.data.records import JsonlAppender, RankedPrompt, iter_jsonl, write_json, write_jsonl
from srlm.models.backbone import DEFAULT_MODEL
from srlm.selfreward.eft_records import (MAX_SCORE, default_cap, histogram, select_agreeing, trim_judgement,
                                         usable_score)
from srlm.selfreward.eft_records import balance as balance_scores

SAMPLES_SUFFIX, STATS_SUFFIX = ".samples.jsonl", ".stats.json"


# -- the command ------------------------------------------------------------------------------------
def _reply_id(prompt: RankedPrompt, index: int) -> str:
    return f"{prompt.id}-r{index}"


def build_eft_with(engine, tokenizer, ranked: Sequence[RankedPrompt], output: str, *, samples: int = 4,
                   sampling=None, template="judge_additive", balance: bool = True,
                   max_per_score: Optional[int] = None, seed: int = 0, model: Optional[str] = None,
                   adapter: Optional[str] = None, ranked_file: Optional[str] = None,
                   show_progress: bool = True) -> dict:
    """``build_eft`` with an already loaded engine; returns the stats (also written to ``<output>.stats.json``)."""
    from srlm.metrics.reward_scores import reward_metrics_from_scores
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
    final = balance_scores(kept, cap, seed) if balance and kept else list(kept)
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
    from srlm.inference.loading import loaded_engine, resolve_model
    from srlm.data.oasst import read_ranked
    from srlm.inference.engine import Sampling

    prompts = read_ranked(ranked, max_prompts)
    base, adapter = resolve_model(model, adapter)
    with loaded_engine(base, adapter, batch_size=batch_size, seed=seed) as (engine, tokenizer):
        return build_eft_with(engine, tokenizer, prompts, output, samples=samples,
                              sampling=Sampling(temperature, top_p, max_new_tokens), template=judge_template,
                              balance=balance, max_per_score=max_per_score, seed=seed, model=base, adapter=adapter,
                              ranked_file=str(ranked))
