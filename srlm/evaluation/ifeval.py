"""IFEval: instruction following measured by code, with no judge (Zhou et al. 2023).

Every IFEval prompt carries verifiable instructions ("answer in fewer than 3 sentences", "no
commas", "wrap the answer in double quotes" ...). The model answers each prompt once, greedily,
and IFEval's own checkers decide, strictly and loosely, whether each instruction was followed
(``srlm.metrics.ifeval``: the checkers, the prompt files, the four accuracies). Writes to ``output_dir``:

- ``ifeval_responses.jsonl``: one row per prompt ``{key, prompt, response, finished, n_tokens,
  instruction_id_list, follow_instruction_list, follow_instruction_list_loose}`` (``null`` in a
  follow list: the checker could not run, the instruction is skipped), appended as each batch of
  prompts completes: a rerun skips the keys already there and finishes the rest, and every stored
  response is checked again at the end (a rerun on a finished folder only re-scores it);
- ``ifeval.json``: the metrics (``ifeval_metrics``, recomputable from the responses file), with
  ``model``, ``max_new_tokens``, ``seconds`` and ``n_truncated``.

    python main.py ifeval --model embedded:smollm2-135m-instruct --output_dir runs/ifeval_base
    python main.py ifeval --model runs/loop/iter_1 --output_dir runs/loop/ifeval/iter_1 --max_prompts 50

The shipped prompts (``seed:ifeval_dev.jsonl``) are 270 of IFEval's 541 (Apache-2.0, see
``srlm/data/seed/ATTRIBUTION.md``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Union

from srlm.data.chat import encode_prompt
from srlm.data.records import JsonlAppender, iter_jsonl, write_json, write_jsonl
from srlm.inference.engine import Engine, Sampling
from srlm.inference.loading import (BACKEND, GPU_MEMORY_UTILIZATION, TENSOR_PARALLEL_SIZE, loaded_engine,
                                   resolve_model)
from srlm.metrics.ifeval import check_response, format_table, ifeval_metrics, load_ifeval, setup_checkers
from srlm.models.backbone import DEFAULT_MODEL

RESPONSES_FILE, METRICS_FILE = "ifeval_responses.jsonl", "ifeval.json"


# -- evaluation ------------------------------------------------------------------------------------
def _rescore(path: Path, items: list[dict]) -> list[dict]:
    """The rows of ``items`` from the responses file, in ``items`` order, checked again with the checkers
    installed now; the file is rewritten (atomically) only when a verdict changed or a key repeats, so a
    rerun on a finished folder re-scores it without generating."""
    by_key = {str(item["key"]): item for item in items}
    rows: dict[str, dict] = {}
    n_lines = changed = 0
    for _, row in iter_jsonl(path):
        n_lines += 1
        key = str(row["key"])
        if key in rows:
            continue
        rows[key] = row
        if key in by_key:
            verdict = check_response(by_key[key], row["response"])
            for field in ("follow_instruction_list", "follow_instruction_list_loose"):
                if row.get(field) != verdict[field]:
                    row[field] = verdict[field]
                    changed += 1
    if changed or n_lines != len(rows):
        write_jsonl(path, rows.values())
    return [rows[str(item["key"])] for item in items]


def evaluate_ifeval_with(engine: Engine, tokenizer, items: list[dict], output_dir: Union[str, Path],
                         max_new_tokens: int = 256, show_progress: bool = True, model: Optional[str] = None,
                         adapter: Optional[str] = None) -> dict:
    """Answer every IFEval prompt greedily with a loaded model, check the answers, write both files.

    Responses are appended to ``output_dir/ifeval_responses.jsonl`` as each engine batch completes;
    keys already in the file are not generated again, so a rerun finishes an interrupted one with
    every key exactly once. All stored responses of ``items`` are then checked again (``_rescore``)
    and the metrics computed from them. ``model`` and ``adapter`` are only recorded; ``seconds`` is
    the time of this call. Returns the metrics.
    """
    if not items:
        raise ValueError("no IFEval prompts to evaluate")
    setup_checkers()
    output_dir = Path(output_dir)
    out_path = output_dir / RESPONSES_FILE
    wanted = {str(item["key"]) for item in items}
    seen = {str(row["key"]) for _, row in iter_jsonl(out_path)} if out_path.exists() else set()
    done = len(wanted & seen)
    sampling = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)
    start = time.time()
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), initial=done, desc="ifeval", unit="prompt", dynamic_ncols=True)
    with JsonlAppender(out_path) as out:
        def on_batch(indices: list[int], groups) -> None:
            rows = []
            for i, group in zip(indices, groups):
                item = items[i]
                if str(item["key"]) in seen:
                    continue
                sample = group[0]
                response = tokenizer.decode(sample.token_ids, skip_special_tokens=True)
                verdict = check_response(item, response)
                rows.append({"key": item["key"], "prompt": item["prompt"], "response": response,
                             "finished": sample.finished, "n_tokens": len(sample.token_ids),
                             "instruction_id_list": item["instruction_id_list"],
                             "follow_instruction_list": verdict["follow_instruction_list"],
                             "follow_instruction_list_loose": verdict["follow_instruction_list_loose"]})
            out.write_many(rows)
            seen.update(str(row["key"]) for row in rows)
            if bar is not None:
                bar.update(len(rows))

        if not wanted <= seen:
            engine.generate([encode_prompt(tokenizer, item["prompt"]) for item in items], 1, sampling,
                            on_batch=on_batch, skip=lambda chunk: all(str(items[i]["key"]) in seen for i in chunk))
    if bar is not None:
        bar.close()
    ordered = _rescore(out_path, items)
    metrics = ifeval_metrics(ordered)
    metrics.update(n_truncated=sum(not row["finished"] for row in ordered), model=model, adapter=adapter,
                   max_new_tokens=max_new_tokens, seconds=round(time.time() - start, 2))
    write_json(output_dir / METRICS_FILE, metrics)
    return metrics


def ifeval(model: str = DEFAULT_MODEL, prompts: str = "seed:ifeval_dev.jsonl", output_dir: str = "runs/ifeval",
           adapter: Optional[str] = None, max_new_tokens: int = 256, batch_size: int = 16,
           max_prompts: Optional[int] = None, backend: str = BACKEND, tensor_parallel_size: int = TENSOR_PARALLEL_SIZE,
           gpu_memory_utilization: Optional[float] = GPU_MEMORY_UTILIZATION) -> dict:
    """IFEval: how well a model follows verifiable instructions, checked by code (no judge).

    Answers each prompt once, greedily, and applies IFEval's instruction checkers. Writes
    ``output_dir/ifeval_responses.jsonl`` (one row per prompt, appended as batches complete: a rerun
    resumes) and ``output_dir/ifeval.json`` (prompt- and instruction-level accuracy, strict and
    loose, per instruction group, counts, time). Prints a short table.

    Args:
        model: base model (hub id, folder, or embedded:...), or an srlm model folder (an exported adapter,
            or a run's m1/ or iter_t/ folder holding one in model/): its base is read from srlm_lineage.json.
        prompts: IFEval prompts jsonl ({"key", "prompt", "instruction_id_list", "kwargs"});
            seed:ifeval_dev.jsonl is the shipped half of IFEval (270 prompts).
        output_dir: folder for the responses and metrics files.
        adapter: an srlm adapter folder on top of the base.
        max_new_tokens: longest response in tokens (greedy decoding).
        batch_size: prompts per generation batch.
        max_prompts: evaluate only the first this many prompts.
        backend: native (srlm's engine) or vllm.
        tensor_parallel_size: vLLM: GPUs one model is split over.
        gpu_memory_utilization: vLLM: share of device memory reserved (CPU: of system RAM; None: 0.9 GPU, 0.15 CPU).
    """
    items = load_ifeval(prompts, max_prompts)
    base, adapter = resolve_model(model, adapter)
    with loaded_engine(base, adapter, batch_size=batch_size, backend=backend, tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization) as (engine, tokenizer):
        metrics = evaluate_ifeval_with(engine, tokenizer, items, output_dir, max_new_tokens, model=base,
                                       adapter=adapter)
    print(format_table(metrics))
    return metrics
