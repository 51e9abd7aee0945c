"""Instruction following, head to head: which of two models answers the same prompts better.

A judge model compares the two answers to each prompt with a pairwise template (bundled
``pairwise``: placeholders ``{question}``, ``{response_a}``, ``{response_b}``; the judge ends with
``Verdict: A``, ``Verdict: B`` or ``Verdict: tie``). Judges favour a position, so every pair is
judged in both orders, and a model wins a prompt only when it wins in both; any disagreement
between the orders (a flip, or a win against a tie) counts as a tie, as does an unparsable verdict.

Two judge modes:
- ``generative``: the judge writes its comparison (greedy by default); the verdict is parsed from
  the generated text only, never from the echoed prompt;
- ``logit``: the ``Verdict:`` cue is forced and the probabilities of the next tokens ``A`` and
  ``B`` are compared (a tie only when they are equal, which order flips make common enough).

    python main.py head-to-head --model_a runs/loop/iter_1 --model_b runs/loop/m1 --output_dir runs/loop/h2h
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence, Union

from srlm.data.chat import encode_prompt
from srlm.data.records import resolve_path
from srlm.data.records import iter_jsonl, write_json, write_jsonl
from srlm.inference.loading import (BACKEND, GPU_MEMORY_UTILIZATION, TENSOR_PARALLEL_SIZE, loaded_engine,
                                   resolve_model)
from srlm.models.backbone import DEFAULT_MODEL
from srlm.prompts import PromptTemplate, load_template
from srlm.inference.engine import Engine, Sampling
from srlm.inference.judge import choice_token_ids

VERDICTS = ("A", "B", "tie")
# "Verdict" as a label (":", "=", "is" or a dash), then the choice. A and B are upper-case only, so
# that "Verdict: a tie" is not read as A; markdown emphasis and "Answer A" are allowed.
_VERDICT = re.compile(r"\b(?i:verdict)\b[*_]*\s*(?:[:=]|\b(?i:is)\b|-)[*_\s]*"
                      r"(?:(?i:answer|response)\s+)?(?P<v>(?i:tie)|A|B)(?!\w)")


def parse_verdict(judge_output: str) -> Optional[str]:
    """``"A"``, ``"B"`` or ``"tie"`` from the judge's own text (the last labelled verdict), else None."""
    found = list(_VERDICT.finditer(judge_output or ""))
    if not found:
        return None
    v = found[-1].group("v")
    return "tie" if v.lower() == "tie" else v


def verdict_outcome(first: Optional[str], second: Optional[str]) -> str:
    """Outcome for model A (``win``/``tie``/``loss``) from the positional verdicts of both orders.

    ``first``: the verdict with A's answer shown as answer A; ``second``: with B's answer shown as
    answer A (so there ``"A"`` means model B). None (unparsed) reads as a tie.
    """
    one = {"A": "win", "B": "loss"}.get(first or "", "tie")
    two = {"A": "loss", "B": "win"}.get(second or "", "tie")
    return one if one == two else "tie"


def aggregate_verdicts(first_order: Sequence[Optional[str]], second_order: Sequence[Optional[str]]) -> dict:
    """Win/tie/loss percentages for model A over prompts (see ``verdict_outcome``), with counts.

    Keys: ``win``, ``tie``, ``loss`` (percent, None when n = 0), ``n``, ``wins``, ``ties``, ``losses``,
    ``inconsistent`` (prompts whose two orders disagree), ``unparsed`` (verdicts that were None).
    """
    if len(first_order) != len(second_order):
        raise ValueError(f"{len(first_order)} first-order verdicts but {len(second_order)} second-order ones")
    for v in list(first_order) + list(second_order):
        if v is not None and v not in VERDICTS:
            raise ValueError(f"verdict {v!r}: expected one of {VERDICTS} or None")
    outcomes = [verdict_outcome(a, b) for a, b in zip(first_order, second_order)]
    n = len(outcomes)
    counts = {k: outcomes.count(k) for k in ("win", "tie", "loss")}
    swap = {"A": "B", "B": "A"}
    out: dict = {k: (round(100.0 * c / n, 2) if n else None) for k, c in counts.items()}
    out.update(n=n, wins=counts["win"], ties=counts["tie"], losses=counts["loss"],
               inconsistent=sum((a or "tie") != swap.get(b or "tie", "tie") for a, b in zip(first_order, second_order)),
               unparsed=sum(v is None for v in list(first_order) + list(second_order)))
    return out


def generate_responses(engine: Engine, tokenizer, prompts: Sequence[str], sampling: Optional[Sampling] = None) -> list[str]:
    """One answer per prompt (greedy unless ``sampling`` says otherwise), decoded from generated tokens only."""
    sampling = sampling or Sampling(temperature=0.0, top_p=1.0, max_new_tokens=256)
    samples = engine.generate([encode_prompt(tokenizer, p) for p in prompts], 1, sampling)
    return [tokenizer.decode(group[0].token_ids, skip_special_tokens=True).strip() for group in samples]


def _judge_logit(engine: Engine, tokenizer, prompt_ids: list[list[int]], cue: str) -> tuple[list[str], list[dict]]:
    cue_ids, (id_a, id_b) = choice_token_ids(tokenizer, cue)
    logprobs = engine.next_token_logprobs([p + cue_ids for p in prompt_ids])
    verdicts, extra = [], []
    for row in logprobs:
        lp_a, lp_b = float(row[id_a]), float(row[id_b])
        verdicts.append("A" if lp_a > lp_b else "B" if lp_b > lp_a else "tie")
        extra.append({"logp_A": round(lp_a, 4), "logp_B": round(lp_b, 4)})
    return verdicts, extra


def _judge_generative(engine: Engine, tokenizer, prompt_ids: list[list[int]],
                      sampling: Sampling) -> tuple[list[Optional[str]], list[dict]]:
    groups = engine.generate(prompt_ids, 1, sampling)
    texts = [tokenizer.decode(g[0].token_ids, skip_special_tokens=True) for g in groups]
    return [parse_verdict(t) for t in texts], [{"output": t} for t in texts]


def head_to_head(prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str], engine: Engine,
                 tokenizer, template: Union[str, PromptTemplate] = "pairwise", mode: str = "logit",
                 sampling: Optional[Sampling] = None, output: Optional[Union[str, Path]] = None,
                 ids: Optional[Sequence] = None, cue: str = "Verdict:") -> dict:
    """Judge A's against B's answer to each prompt in both orders; win/tie/loss percentages for A.

    All 2n judge prompts go to the engine in one call (the template's shared prefix is computed
    once). ``output``, when given, receives one jsonl row per prompt with both positional verdicts
    and the outcome for A. ``sampling`` (generative mode) defaults to greedy, 160 new tokens.
    """
    if not len(prompts) == len(responses_a) == len(responses_b):
        raise ValueError(f"{len(prompts)} prompts, {len(responses_a)} A responses, {len(responses_b)} B responses")
    if mode not in ("logit", "generative"):
        raise ValueError(f"mode '{mode}': expected generative or logit")
    if isinstance(template, str):
        template = load_template(template, "question", "response_a", "response_b")
    template.require("question", "response_a", "response_b")
    n = len(prompts)
    texts = [template.fill(question=q, response_a=a, response_b=b) for q, a, b in zip(prompts, responses_a, responses_b)]
    texts += [template.fill(question=q, response_a=b, response_b=a) for q, a, b in zip(prompts, responses_a, responses_b)]
    prompt_ids = [encode_prompt(tokenizer, t) for t in texts]
    if not prompt_ids:
        verdicts, extra = [], []
    elif mode == "logit":
        verdicts, extra = _judge_logit(engine, tokenizer, prompt_ids, cue)
    else:
        verdicts, extra = _judge_generative(engine, tokenizer, prompt_ids,
                                            sampling or Sampling(temperature=0.0, top_p=1.0, max_new_tokens=160))
    first, second = verdicts[:n], verdicts[n:]
    summary = aggregate_verdicts(first, second)
    summary["mode"] = mode
    if output is not None:
        rows = []
        for i in range(n):
            rows.append({"id": ids[i] if ids is not None else i, "prompt": prompts[i], "response_a": responses_a[i],
                         "response_b": responses_b[i], "first": first[i], "second": second[i],
                         "outcome": verdict_outcome(first[i], second[i]),
                         "first_judge": extra[i], "second_judge": extra[n + i]})
        write_jsonl(output, rows)
    return summary


def load_prompts(prompts_file: str, max_prompts: Optional[int] = None) -> tuple[list, list[str]]:
    """``(ids, prompts)`` from any jsonl with a ``prompt`` field (IFT, prompts, ranked records) or an oasst export."""
    path = resolve_path(prompts_file)
    ids, prompts = [], []
    for number, obj in iter_jsonl(path):
        if "message_id" in obj:  # an OpenAssistant export: take its first-turn ranked prompts
            from srlm.data.oasst import read_ranked

            ranked = read_ranked(prompts_file, max_prompts)
            return [r.id for r in ranked], [r.prompt for r in ranked]
        if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise ValueError(f"{path}:{number}: expected a non-empty 'prompt' field")
        ids.append(obj.get("id", number))
        prompts.append(obj["prompt"])
        if max_prompts is not None and len(prompts) >= max_prompts:
            break
    return ids, prompts


def compare(model_a: str, adapter_a: Optional[str] = None, model_b: str = DEFAULT_MODEL, adapter_b: Optional[str] = None,
            prompts_file: str = "seed:eft_eval.jsonl", output_dir: str = "runs/h2h", judge_model: str = DEFAULT_MODEL,
            judge_adapter: Optional[str] = None, judge_mode: str = "logit", max_prompts: Optional[int] = 32,
            max_new_tokens: int = 128, batch_size: int = 8, template: str = "pairwise", seed: int = 0,
            backend: str = BACKEND, tensor_parallel_size: int = TENSOR_PARALLEL_SIZE,
            gpu_memory_utilization: Optional[float] = GPU_MEMORY_UTILIZATION) -> dict:
    """Head-to-head instruction following: model A against model B, judged in both orders.

    Each model answers the prompts greedily; the judge model compares every pair of answers twice
    (A shown first, then B shown first), and a win needs both orders to agree. Writes
    ``output_dir/responses.jsonl``, ``output_dir/h2h_verdicts.jsonl`` (one row per prompt) and
    ``output_dir/h2h_summary.json`` (win/tie/loss percentages for A, counts).

    Args:
        model_a: model A: base model, or an srlm model folder (exported adapter, or a run's m1/ or iter_t/).
        adapter_a: an srlm adapter folder on top of model A's base.
        model_b: model B, as model_a.
        adapter_b: an srlm adapter folder on top of model B's base.
        prompts_file: jsonl with a "prompt" field per line (held-out prompts), or an OpenAssistant export.
        output_dir: folder for the responses, verdicts and summary.
        judge_model: the judge (ideally stronger than both), as model_a.
        judge_adapter: an srlm adapter folder on top of the judge's base.
        judge_mode: logit (compare the probabilities of "A" and "B" after "Verdict:") or generative.
        max_prompts: compare on the first this many prompts.
        max_new_tokens: longest answer (and, generative, longest judgement) in tokens.
        batch_size: prompts per forward.
        template: pairwise judge template (bundled name or path) with {question}, {response_a}, {response_b}.
        seed: engine seed.
        backend: native (srlm's engine) or vllm.
        tensor_parallel_size: vLLM: GPUs one model is split over.
        gpu_memory_utilization: vLLM: share of device memory reserved (CPU: of system RAM; None: 0.9 GPU, 0.15 CPU).
    """
    serving = {"backend": backend, "tensor_parallel_size": tensor_parallel_size,
               "gpu_memory_utilization": gpu_memory_utilization}
    ids, prompts = load_prompts(prompts_file, max_prompts)
    out = Path(output_dir)
    greedy = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)
    answers = []
    for model, adapter in ((model_a, adapter_a), (model_b, adapter_b)):
        with loaded_engine(model, adapter, batch_size=batch_size, seed=seed, **serving) as (engine, tok):
            answers.append(generate_responses(engine, tok, prompts, greedy))  # one model in memory at a time
    write_jsonl(out / "responses.jsonl", [{"id": i, "prompt": p, "response_a": a, "response_b": b}
                                          for i, p, a, b in zip(ids, prompts, *answers)])
    with loaded_engine(judge_model, judge_adapter, batch_size=batch_size, seed=seed, **serving) as (engine, tok):
        summary = head_to_head(prompts, answers[0], answers[1], engine, tok, template, judge_mode,
                               Sampling(temperature=0.0, top_p=1.0, max_new_tokens=max(max_new_tokens, 160)),
                               out / "h2h_verdicts.jsonl", ids)
    labels = {"model_a": resolve_model(model_a, adapter_a), "model_b": resolve_model(model_b, adapter_b),
              "judge": resolve_model(judge_model, judge_adapter)}
    summary.update({k: {"model": m, "adapter": a} for k, (m, a) in labels.items()})
    write_json(out / "h2h_summary.json", summary)
    print(f"A vs B over {summary['n']} prompts, both orders: win {summary['win']}% / tie {summary['tie']}% / "
          f"loss {summary['loss']}% ({summary['inconsistent']} order flips)")
    return summary
