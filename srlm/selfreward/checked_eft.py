"""A second EFT source: judgements whose scores come from verified instruction compliance.

    python main.py build-eft-checked --prompts seed:ift_constraints.jsonl --model runs/learn/sft \
        --output runs/eft/eft_checked.jsonl --samples 4

The model (``--model``: the SFT baseline, or any model ``evaluate`` accepts) answers each
constraint-bearing training prompt ``samples`` times. IFEval's checkers (``srlm.metrics.ifeval``)
decide which of the prompt's verifiable instructions each answer follows, and the judgement is
written from that verdict, never by the model:

    The question sets 2 checkable requirements.
    1. Your entire response should be in English, and in all lowercase letters. No capital letters are allowed. Met.
    2. Your response should contain 3 paragraphs ... Not met.
    The response is complete.
    Score: 2

Score rule (the additive rubric's 0..5 range): every requirement met and the answer finished: 5;
every requirement met but the answer cut at ``max_new_tokens``: 3; some met: 2; none met: 1. The
prompt file's own reference answer (``response``, when present and compliant) is added as a 5, so
every prompt contributes a compliant example next to the model's mostly non-compliant ones. The set
is then balanced across scores (``eft_records.balance``).

The prompts must be the project's own constraint prompts, never IFEval's (which measure the result).
Keep this file apart from the OpenAssistant-built EFT in config (``eft_files`` lists each) so each
source's effect can be measured.

Files: ``<output>`` (EFT jsonl ``{id, question, answer, judgement, score, source}``, written
atomically at the end), ``<output>.samples.jsonl`` (every answer with its verdict, appended per
engine batch: a killed run rerun with the same arguments answers only the prompts that are
missing, with the same seeds), ``<output>.stats.json`` (counts and score histograms).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from srlm.data.chat import encode_prompt
from srlm.data.records import iter_jsonl, resolve_path, write_json, write_jsonl
from srlm.models.backbone import DEFAULT_MODEL
from srlm.selfreward.build_eft import SAMPLES_SUFFIX, STATS_SUFFIX
from srlm.selfreward.eft_records import MAX_SCORE, default_cap, histogram
from srlm.selfreward.eft_records import balance as balance_scores
from srlm.selfreward.config import CANDIDATE_SAMPLING

SOURCE = "checked"


def checked_score(follows: Sequence[Optional[bool]], finished: bool) -> Optional[int]:
    """The score a compliance verdict earns (see the module docstring); None when no checker ran."""
    ran = [f for f in follows if f is not None]
    if not ran:
        return None
    if all(ran):
        return MAX_SCORE if finished else 3
    return 2 if any(ran) else 1


def describe(item: dict) -> list[str]:
    """The checkers' own wording of each instruction of an IFEval-format item."""
    from srlm.metrics.ifeval import build_checker

    out = []
    for index, instruction_id in enumerate(item["instruction_id_list"]):
        checker = build_checker(instruction_id, item["kwargs"][index], item["prompt"], index)
        args = checker.get_instruction_args() or {}
        out.append(" ".join(checker.build_description(**args).split()))
    return out


def checked_judgement(descriptions: Sequence[str], follows: Sequence[Optional[bool]], finished: bool,
                      score: int) -> str:
    """The judgement text for one verdict, ending in the canonical ``Score: N`` line."""
    n = len(descriptions)
    lines = [f"The question sets {n} checkable requirement{'s' if n != 1 else ''}."]
    for number, (text, ok) in enumerate(zip(descriptions, follows), 1):
        verdict = "Met." if ok else ("Not met." if ok is not None else "Not checked.")
        lines.append(f"{number}. {text.rstrip('.')}. {verdict}")
    lines.append("The response is complete." if finished else "The response stops before it is finished.")
    lines.append(f"Score: {score}")
    return "\n".join(lines)


def build_checked_eft_with(engine, tokenizer, items: Sequence[dict], output: str, *, samples: int = 4,
                           sampling=None, references: Optional[dict] = None, balance: bool = True,
                           max_per_score: Optional[int] = None, seed: int = 0, show_progress: bool = True,
                           **record) -> dict:
    """``build_checked_eft`` with a loaded engine; ``references`` maps an item key to its reference answer."""
    from srlm.metrics.ifeval import check_response, setup_checkers
    from srlm.selfreward.steps import ShardedWriter

    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not items:
        raise ValueError("no constraint prompts to answer")
    setup_checkers()
    sampling = sampling or CANDIDATE_SAMPLING
    output = Path(output)
    samples_path, stats_path = Path(f"{output}{SAMPLES_SUFFIX}"), Path(f"{output}{STATS_SUFFIX}")
    keys = [str(item["key"]) for item in items]
    rows: dict[str, dict] = {}
    if samples_path.exists():
        for line, row in iter_jsonl(samples_path):
            if row.get("key") in keys:
                if len(row.get("answers", [])) != samples:
                    raise ValueError(f"{samples_path}:{line}: answered {len(row.get('answers', []))} times, not "
                                     f"{samples}: use another --output or delete the file")
                rows[row["key"]] = row
    with ShardedWriter(samples_path, "answering constraint prompts", len(items), show_progress, key="key") as out:
        def on_batch(indices, groups):
            new = []
            for i, group in zip(indices, groups):
                if keys[i] in rows:
                    continue
                answers = []
                for sample in group:
                    text = tokenizer.decode(sample.token_ids, skip_special_tokens=True)
                    verdict = check_response(items[i], text)
                    answers.append({"text": text, "finished": sample.finished,
                                    "follows": verdict["follow_instruction_list"]})
                rows[keys[i]] = row = {"key": keys[i], "answers": answers}
                new.append(row)
            out.write(new)

        if len(rows) < len(items):
            engine.generate([encode_prompt(tokenizer, item["prompt"]) for item in items], samples, sampling,
                            on_batch=on_batch, skip=lambda chunk: all(keys[i] in rows for i in chunk), seed=seed)

    kept, unchecked, seen, duplicates, refs = [], 0, set(), 0, 0
    for item, key in zip(items, keys):
        descriptions = describe(item)
        answers = list(rows[key]["answers"])
        reference = (references or {}).get(key)
        if reference:
            verdict = check_response(item, reference)["follow_instruction_list"]
            answers.append({"text": reference, "finished": True, "follows": verdict, "reference": True})
        for number, answer in enumerate(answers):
            text = answer["text"].strip()
            score = checked_score(answer["follows"], answer["finished"])
            if score is None or not text:
                unchecked += 1
                continue
            if (key, text) in seen:  # two identical samples would teach the same judgement twice
                duplicates += 1
                continue
            seen.add((key, text))
            refs += bool(answer.get("reference"))
            kept.append({"id": f"{key}-{'ref' if answer.get('reference') else number}", "question": item["prompt"],
                         "answer": answer["text"], "score": score, "source": SOURCE,
                         "judgement": checked_judgement(descriptions, answer["follows"], answer["finished"], score)})
    cap = (max_per_score if max_per_score is not None else default_cap(kept)) if balance else None
    final = balance_scores(kept, cap, seed) if balance and kept else list(kept)
    written = write_jsonl(output, final)
    stats = {**record, "output": str(output), "samples": samples, "temperature": sampling.temperature,
             "top_p": sampling.top_p, "max_new_tokens": sampling.max_new_tokens, "seed": seed,
             "prompts": len(items), "answers": len(items) * samples, "references": refs,
             "unchecked": unchecked, "duplicates": duplicates, "kept": len(kept), "written": written,
             "balance": balance, "max_per_score": cap,
             "histogram_before": histogram(kept), "histogram_after": histogram(final)}
    write_json(stats_path, stats)
    print(f"checked EFT: {written} records ({refs} reference answers) from {len(items)} prompts; "
          f"before {stats['histogram_before']} after {stats['histogram_after']} -> {output}")
    return stats


def build_checked_eft(prompts: str, output: str, model: str = DEFAULT_MODEL, adapter: Optional[str] = None,
                      samples: int = 4, temperature: float = CANDIDATE_SAMPLING.temperature,
                      top_p: float = CANDIDATE_SAMPLING.top_p, max_new_tokens: int = CANDIDATE_SAMPLING.max_new_tokens,
                      with_references: bool = True, balance: bool = True, max_per_score: Optional[int] = None,
                      max_prompts: Optional[int] = None, batch_size: int = 16, seed: int = 0) -> dict:
    """Build EFT judge-training data whose scores come from IFEval's checkers on the model's own answers.

    Writes ``output`` (EFT jsonl), ``output.samples.jsonl`` (every answer and verdict; a rerun
    resumes from it) and ``output.stats.json``. See the module docstring for the score rule.

    Args:
        prompts: constraint prompts in IFEval's format (``{key or id, prompt, instruction_id_list, kwargs}``,
            optionally ``response``: a reference answer); the project's own, never IFEval's.
        output: the EFT file to write.
        model: the model that answers: base model (hub id, folder, or embedded:...), or an srlm model folder.
        adapter: an srlm adapter folder on top of the base.
        samples: answers per prompt.
        temperature: answer sampling temperature.
        top_p: answer nucleus sampling mass.
        max_new_tokens: longest answer in tokens (a cut answer scores at most 3).
        with_references: add each prompt's reference answer (``response``), checked like the others.
        balance: cap every score bin (see max_per_score).
        max_per_score: records per score at most; None: max(2 x smallest non-empty bin, ceil(kept / 6)).
        max_prompts: answer only the first this many prompts.
        batch_size: prompts per generation batch (each with ``samples`` rows).
        seed: sampling and balancing seed.
    """
    from srlm.metrics.ifeval import load_ifeval
    from srlm.inference.loading import loaded_engine, resolve_model
    from srlm.inference.engine import Sampling

    items = load_ifeval(prompts, max_prompts)
    references = {}
    if with_references:
        for _, obj in iter_jsonl(resolve_path(prompts)):
            key = obj.get("key", obj.get("id"))
            if isinstance(obj.get("response"), str) and obj["response"].strip():
                references[str(key)] = obj["response"]
    base, adapter = resolve_model(model, adapter)
    with loaded_engine(base, adapter, batch_size=batch_size, seed=seed) as (engine, tokenizer):
        return build_checked_eft_with(engine, tokenizer, items, output, samples=samples,
                                      sampling=Sampling(temperature, top_p, max_new_tokens), references=references,
                                      balance=balance, max_per_score=max_per_score, seed=seed, model=base,
                                      adapter=adapter, prompts_file=str(prompts))
