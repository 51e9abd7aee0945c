"""Each self-instruction step alone, on given files (the loop runs the same functions):

    python main.py generate-prompts --output prompts.jsonl --num_prompts 32
    python main.py generate-candidates --prompts prompts.jsonl --output candidates.jsonl --adapter runs/loop/m1/model
    python main.py judge --candidates candidates.jsonl --output judgements.jsonl --mode logit
    python main.py make-pairs --candidates candidates.jsonl --judgements judgements.jsonl --output pairs.jsonl

Every command resumes: rerun it after a kill and it appends only what is missing.
"""

from __future__ import annotations

from typing import Optional

from srlm.data.datamodule import load_sft_file, resolve_path
from srlm.data.records import read_jsonl
from srlm.inference.engine import Sampling
from srlm.inference.judge import JUDGE_SAMPLES, JUDGE_SAMPLING, make_judge
from srlm.inference.loading import BACKEND, GPU_MEMORY_UTILIZATION, TENSOR_PARALLEL_SIZE, loaded_engine
from srlm.models.backbone import DEFAULT_MODEL
from srlm.prompts import JUDGE_TEMPLATE, load_template
from srlm.selfreward import steps
from srlm.selfreward.config import CANDIDATE_SAMPLING, PROMPT_SAMPLING, SelfRewardConfig as Defaults

# Every default below is the loop's (SelfRewardConfig and the sampling constants beside it): one place each.


def generate_prompts(output: str, num_prompts: int = Defaults.num_prompts, model: str = DEFAULT_MODEL,
                     adapter: Optional[str] = None, seed_prompts_file: str = Defaults.seed_prompts_file,
                     few_shot: int = Defaults.few_shot, template: str = Defaults.prompt_template,
                     temperature: float = PROMPT_SAMPLING.temperature, top_p: float = PROMPT_SAMPLING.top_p,
                     max_new_tokens: int = PROMPT_SAMPLING.max_new_tokens, batch_size: int = Defaults.batch_size,
                     seed: int = Defaults.seed, backend: str = BACKEND, tensor_parallel_size: int = TENSOR_PARALLEL_SIZE,
                     gpu_memory_utilization: Optional[float] = GPU_MEMORY_UTILIZATION) -> dict:
    """Write new prompts by few-shot prompting.

    Args:
        output: prompts jsonl to write (appended to on resume).
        num_prompts: how many new prompts to keep.
        model: base model (hub id, folder, or embedded:...).
        adapter: an srlm adapter folder on top of the base.
        seed_prompts_file: jsonl with "prompt" fields shown as examples.
        few_shot: examples per request.
        template: prompt-generation template (name or path).
        temperature: sampling temperature.
        top_p: nucleus mass.
        max_new_tokens: longest new prompt in tokens.
        batch_size: requests per generate call.
        seed: seed.
        backend: native (srlm's engine) or vllm.
        tensor_parallel_size: vLLM: GPUs one model is split over.
        gpu_memory_utilization: vLLM: share of device memory reserved (CPU: of system RAM; None: 0.9 GPU, 0.15 CPU).
    """
    seeds = [ex.prompt for ex in load_sft_file(seed_prompts_file)]
    with loaded_engine(model, adapter, batch_size=batch_size, seed=seed, backend=backend,
                       tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization) as (engine, tok):
        stats = steps.generate_prompts(engine, tok, seeds, load_template(template, "examples"), resolve_path(output),
                                       target=num_prompts, few_shot=few_shot, seed=seed,
                                       sampling=Sampling(temperature, top_p, max_new_tokens),
                                       requests_per_batch=batch_size)
    print(stats)
    return stats


def generate_candidates(prompts: str, output: str, model: str = DEFAULT_MODEL, adapter: Optional[str] = None,
                        n: int = Defaults.num_candidates, temperature: float = CANDIDATE_SAMPLING.temperature,
                        top_p: float = CANDIDATE_SAMPLING.top_p, max_new_tokens: int = CANDIDATE_SAMPLING.max_new_tokens,
                        batch_size: int = Defaults.batch_size, seed: int = Defaults.seed,
                        backend: str = BACKEND, tensor_parallel_size: int = TENSOR_PARALLEL_SIZE,
                        gpu_memory_utilization: Optional[float] = GPU_MEMORY_UTILIZATION) -> dict:
    """Sample N responses per prompt.

    Args:
        prompts: jsonl of {"id", "prompt"}.
        output: candidates jsonl to write (appended to on resume).
        model: base model, or an srlm model folder (its base read from its lineage).
        adapter: an srlm adapter folder (M_t).
        n: responses per prompt.
        temperature: sampling temperature.
        top_p: nucleus mass.
        max_new_tokens: longest response in tokens.
        batch_size: prompts per generate call.
        seed: seed.
        backend: native (srlm's engine) or vllm.
        tensor_parallel_size: vLLM: GPUs one model is split over.
        gpu_memory_utilization: vLLM: share of device memory reserved (CPU: of system RAM; None: 0.9 GPU, 0.15 CPU).
    """
    with loaded_engine(model, adapter, batch_size=batch_size, seed=seed, backend=backend,
                       tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization) as (engine, tok):
        stats = steps.generate_candidates(engine, tok, read_jsonl(resolve_path(prompts)), resolve_path(output), n=n,
                                          sampling=Sampling(temperature, top_p, max_new_tokens))
    print(stats)
    return stats


def judge(candidates: str, output: str, model: str = DEFAULT_MODEL, adapter: Optional[str] = None,
          mode: str = Defaults.judge_mode, samples: int = JUDGE_SAMPLES, template: str = JUDGE_TEMPLATE,
          temperature: float = JUDGE_SAMPLING.temperature, top_p: float = JUDGE_SAMPLING.top_p,
          max_new_tokens: int = JUDGE_SAMPLING.max_new_tokens, batch_size: int = Defaults.batch_size,
          seed: int = Defaults.seed, backend: str = BACKEND, tensor_parallel_size: int = TENSOR_PARALLEL_SIZE,
          gpu_memory_utilization: Optional[float] = GPU_MEMORY_UTILIZATION) -> dict:
    """Score every candidate with the judge template.

    Args:
        candidates: jsonl of {"id", "prompt_id", "prompt", "response"}.
        output: judgements jsonl to write (appended to on resume).
        model: base model, or an srlm model folder (its base read from its lineage).
        adapter: an srlm adapter folder (M_t).
        mode: generative, logit or reasoned.
        samples: judge samples per candidate (generative).
        template: judge template (name or path).
        temperature: sampling temperature (generative).
        top_p: nucleus mass (generative).
        max_new_tokens: longest judgement (generative).
        batch_size: judge prompts per forward.
        seed: seed.
        backend: native (srlm's engine) or vllm.
        tensor_parallel_size: vLLM: GPUs one model is split over.
        gpu_memory_utilization: vLLM: share of device memory reserved (CPU: of system RAM; None: 0.9 GPU, 0.15 CPU).
    """
    with loaded_engine(model, adapter, batch_size=batch_size, seed=seed, backend=backend,
                       tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization) as (engine, tok):
        j = make_judge(mode, engine, tok, load_template(template, "question", "response"), samples,
                       Sampling(temperature, top_p, max_new_tokens))
        stats = steps.judge_candidates(j, read_jsonl(resolve_path(candidates)), resolve_path(output))
    print(stats)
    return stats


def make_pairs(candidates: str, judgements: str, output: str, min_margin: float = Defaults.min_margin,
               length_control: Optional[float] = Defaults.length_control) -> dict:
    """Pair the best against the worst candidate of each prompt.

    Args:
        candidates: candidates jsonl.
        judgements: judgements jsonl.
        output: pairs jsonl to write (atomically).
        min_margin: best - worst must exceed this; equal scores are always dropped.
        length_control: choose the shortest answer scoring within this much of the best (None: the best).
    """
    stats = steps.make_pairs(read_jsonl(resolve_path(candidates)), read_jsonl(resolve_path(judgements)),
                             resolve_path(output), min_margin=min_margin, length_control=length_control)
    print(stats)
    return stats
