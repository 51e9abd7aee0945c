"""Reward modelling: how well the model, as a judge, agrees with human rankings of replies.

The paper's table (pairwise accuracy, exact match, 5-best, Spearman, Kendall tau on the EFT eval
split) for one model. Every reply of every prompt is judged in a single ``Judge.score`` call, so
the rubric prefix shared by all judge prompts is computed once. Writes to ``output_dir``:

- ``reward_scores.jsonl``: one row per reply ``{prompt_id, reply_id, human_rank, model_score}``
  (``model_score`` null when the judgement could not be parsed);
- ``reward_metrics.json``: the metrics, recomputable from the scores file alone with
  ``reward_metrics_from_scores``.

    python main.py evaluate --model runs/loop/iter_1 --output_dir runs/loop/eval/iter_1
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional, Union

from srlm.data.oasst import read_ranked as load_ranked
from srlm.data.records import RankedPrompt, write_json, write_jsonl
from srlm.inference.loading import (BACKEND, GPU_MEMORY_UTILIZATION, TENSOR_PARALLEL_SIZE, loaded_engine,
                                   resolve_model)
from srlm.metrics.reward_scores import reward_metrics_from_scores
from srlm.models.backbone import DEFAULT_MODEL
from srlm.prompts import JUDGE_TEMPLATE, PromptTemplate, load_template
from srlm.inference.engine import Engine, Sampling
from srlm.inference.judge import JUDGE_SAMPLES, JUDGE_SAMPLING, make_judge

SCORES_FILE, METRICS_FILE = "reward_scores.jsonl", "reward_metrics.json"


def format_table(metrics: dict) -> str:
    def cell(key: str, percent: bool) -> str:
        value = metrics.get(key)
        if value is None:
            return "n/a"
        return f"{100 * value:.1f}%" if percent else f"{value:.3f}"

    lines = [f"reward modelling: {metrics.get('n_prompts')} prompts, {metrics.get('n_pairs')} pairs, "
             f"{metrics.get('n_unparsed')} of {metrics.get('n_replies')} replies unparsed"]
    for key, label, percent in (("pairwise_accuracy", "pairwise accuracy", True), ("exact_match", "exact match", True),
                                ("five_best", "5-best", True), ("spearman", "Spearman", False),
                                ("kendall_tau", "Kendall tau", False)):
        lines.append(f"  {label:<18} {cell(key, percent):>8}")
    return "\n".join(lines)


def evaluate_reward_with(engine: Engine, tokenizer, ranked: list[RankedPrompt], output_dir: Union[str, Path],
                         judge_mode: str = "logit", samples: int = JUDGE_SAMPLES, sampling: Optional[Sampling] = None,
                         template: Union[str, PromptTemplate] = JUDGE_TEMPLATE, model: Optional[str] = None,
                         adapter: Optional[str] = None, verbose: bool = True) -> dict:
    """Judge every reply of ``ranked`` with an already loaded model; write the scores and metrics files.

    ``model`` and ``adapter`` are only recorded in the metrics file. Returns the metrics dict.
    """
    if not ranked:
        raise ValueError("no ranked prompts to evaluate")
    if isinstance(template, str):
        template = load_template(template, "question", "response")
    judge = make_judge(judge_mode, engine, tokenizer, template, samples, sampling)
    items = [(p.prompt, reply.text) for p in ranked for reply in p.replies]
    start = time.time()
    results = judge.score(items)  # one call: the rubric prefix is computed once for every reply
    seconds = round(time.time() - start, 2)
    rows, k = [], 0
    for p in ranked:
        for index, reply in enumerate(p.replies):
            rows.append({"prompt_id": p.id, "reply_id": f"{p.id}-r{index}", "human_rank": reply.rank,
                         "model_score": results[k].score})
            k += 1
    output_dir = Path(output_dir)
    write_jsonl(output_dir / SCORES_FILE, rows)
    metrics = reward_metrics_from_scores(rows)
    metrics.update(judge_mode=judge_mode, model=model, adapter=adapter, seconds=seconds)
    write_json(output_dir / METRICS_FILE, metrics)
    if verbose:
        print(format_table(metrics))
    return metrics


def evaluate_reward(model: str = DEFAULT_MODEL, adapter: Optional[str] = None, eval_file: str = "seed:eft_eval.jsonl",
                    output_dir: str = "runs/eval", judge_mode: str = "logit", samples: int = JUDGE_SAMPLES,
                    judge_template: str = JUDGE_TEMPLATE, max_new_tokens: int = JUDGE_SAMPLING.max_new_tokens,
                    batch_size: int = 8,
                    max_prompts: Optional[int] = None, seed: int = 0, backend: str = BACKEND,
                    tensor_parallel_size: int = TENSOR_PARALLEL_SIZE,
                    gpu_memory_utilization: Optional[float] = GPU_MEMORY_UTILIZATION) -> dict:
    """Reward-modelling metrics of a model judging human-ranked replies (the paper's EFT eval table).

    Writes ``output_dir/reward_scores.jsonl`` (one row per reply) and ``output_dir/reward_metrics.json``
    (pairwise accuracy, exact match, 5-best, Spearman, Kendall tau, counts), both atomically.

    Args:
        model: base model (hub id, folder, or embedded:...), or an srlm model folder (an exported adapter,
            or a run's m1/ or iter_t/ folder holding one in model/): its base is read from srlm_lineage.json.
        adapter: an srlm adapter folder on top of the base.
        eval_file: ranked prompts jsonl ({"id", "prompt", "replies": [{"text", "rank"}]}), or an
            OpenAssistant message export (converted on the fly).
        output_dir: folder for the scores and metrics files.
        judge_mode: logit (expected score after a forced "Score:" cue) or generative (sampled judgements).
        samples: judge samples per reply (generative).
        judge_template: judge template (bundled name or path) with {question} and {response}.
        max_new_tokens: longest judgement in tokens (generative).
        batch_size: judge prompts per forward.
        max_prompts: evaluate only the first this many prompts.
        seed: sampling seed (generative).
        backend: native (srlm's engine) or vllm.
        tensor_parallel_size: vLLM: GPUs one model is split over.
        gpu_memory_utilization: vLLM: share of device memory reserved (CPU: of system RAM; None: 0.9 GPU, 0.15 CPU).
    """
    ranked = load_ranked(eval_file, max_prompts)
    base, adapter = resolve_model(model, adapter)
    with loaded_engine(base, adapter, batch_size=batch_size, seed=seed, backend=backend,
                       tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization) as (engine, tokenizer):
        return evaluate_reward_with(engine, tokenizer, ranked, output_dir, judge_mode, samples,
                                    dataclasses.replace(JUDGE_SAMPLING, max_new_tokens=max_new_tokens),
                                    judge_template, model=base, adapter=adapter)
