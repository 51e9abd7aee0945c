"""Naming the model to evaluate: a base plus adapter, or simply a run's iteration folder.

A model trained by srlm is exported as a peft adapter folder holding ``adapter_config.json`` and
``srlm_lineage.json`` (which names the base model). Evaluation commands accept such a folder, or
a run folder that contains one under ``model/`` (``runs/x/m1``, ``runs/x/iter_2``), in place of
``model``, so that nobody has to repeat the base model by hand.

``load_engine`` is the one way the loop, the commands and evaluation get an engine: ``backend`` picks
the native engine (srlm/inference/engine.py) or vLLM (srlm/inference/vllm_engine.py, imported only then);
both answer ``generate`` and ``next_token_logprobs``, and ``release`` frees either. ``loaded_engine`` is the
two together for an engine that lives inside one ``with`` block: released on the way out, errors included.
"""

from __future__ import annotations

import gc
import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

from srlm.allocator import trim
from srlm.models.backbone import (LINEAGE_FILE, is_full_model, load_for_inference, load_tokenizer,
                                  resolve_model_path)
from srlm.inference.engine import Engine


def _adapter_folder(path: Path) -> Optional[Path]:
    for folder in (path, path / "model"):
        if (folder / "adapter_config.json").exists() and (folder / LINEAGE_FILE).exists():
            return folder
    return None


def resolve_model(model: str, adapter: Optional[str] = None) -> tuple[str, Optional[str]]:
    """``(base model, adapter folder)``: ``model`` may be an exported srlm adapter or a folder holding one in ``model/``
    (or, from full fine-tuning, a whole model there: it is the model, with no adapter)."""
    path = Path(model).expanduser()
    folder = _adapter_folder(path) if path.is_dir() else None
    if folder is None:
        if path.is_dir() and not (path / "config.json").exists() and is_full_model(path / "model"):
            return str(path / "model"), adapter
        return model, adapter
    if adapter is not None:
        raise ValueError(f"'{model}' is already an srlm model folder (base + adapter); do not pass adapter as well")
    lineage = json.loads((folder / LINEAGE_FILE).read_text(encoding="utf-8"))
    base = lineage.get("base_model")
    if not base:
        raise ValueError(f"{folder / LINEAGE_FILE} names no base_model")
    return str(base), str(folder)


BACKENDS = ("native", "vllm")
BACKEND = "native"
"""The default inference backend: srlm's own engine (vllm: pip install 'srlm[vllm]')."""
TENSOR_PARALLEL_SIZE = 1
"""vLLM: GPUs one model is split over (the native engine runs on one device)."""
GPU_MEMORY_UTILIZATION: Optional[float] = None
"""vLLM: share of the device's memory it reserves; None: 0.9 of a GPU, 0.15 of system RAM on CPU (vllm_engine.py)."""


def load_engine(model: str, adapter: Optional[str] = None, batch_size: int = 8, seed: int = 0,
                dtype: str = "auto", device: Optional[torch.device] = None, trust_remote_code: bool = False,
                load_in_4bit: bool = False, backend: str = BACKEND, tensor_parallel_size: int = TENSOR_PARALLEL_SIZE,
                gpu_memory_utilization: Optional[float] = GPU_MEMORY_UTILIZATION) -> tuple[Engine, object]:
    """Load ``model`` (+ ``adapter``) for inference on ``device`` (default: the GPU when there is one); returns
    ``(engine, tokenizer)``. ``load_in_4bit``: the 4-bit base a QLoRA run trains (bitsandbytes places it).
    ``backend``: ``native`` or ``vllm`` (which places the model itself and serves a 4-bit run's model merged in
    full precision); ``tensor_parallel_size`` and ``gpu_memory_utilization`` are vLLM's."""
    if backend not in BACKENDS:
        raise ValueError(f"backend '{backend}': expected one of {', '.join(BACKENDS)}")
    base, adapter = resolve_model(model, adapter)
    if backend == "vllm":
        return _load_vllm(base, adapter, batch_size, seed, dtype, trust_remote_code, tensor_parallel_size,
                          gpu_memory_utilization)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = load_for_inference(base, adapter, dtype, trust_remote_code, load_in_4bit=load_in_4bit)
    if not load_in_4bit:
        net = net.to(device)
    tokenizer = load_tokenizer(base, trust_remote_code)
    engine = Engine(net, [tokenizer.eos_token_id], tokenizer.pad_token_id, batch_size=batch_size, seed=seed)
    return engine, tokenizer


def _load_vllm(base: str, adapter: Optional[str], batch_size: int, seed: int, dtype: str, trust_remote_code: bool,
               tensor_parallel_size: int, gpu_memory_utilization: Optional[float]):
    from srlm.inference.vllm_engine import VLLMEngine, _import_vllm, merged_folder

    _import_vllm()  # fail before merging anything when vLLM is not installed
    tokenizer = load_tokenizer(base, trust_remote_code)
    # an adapter is merged into a folder once per engine (per iteration in the loop); release deletes it
    folder = merged_folder(base, adapter, dtype, trust_remote_code) if adapter is not None else None
    try:
        engine = VLLMEngine(str(folder) if folder is not None else resolve_model_path(base), [tokenizer.eos_token_id],
                            batch_size=batch_size, seed=seed, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                            gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=trust_remote_code,
                            owned_folder=folder)
    except BaseException:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return engine, tokenizer


@contextmanager
def loaded_engine(model: str, adapter: Optional[str] = None, **options) -> Iterator[tuple[Engine, object]]:
    """``with loaded_engine(model, adapter, batch_size=...) as (engine, tokenizer):`` ``load_engine`` with the same
    arguments (``options`` are its keyword ones), and ``release`` of the engine when the block ends, however it
    ends (one model in memory at a time, a vLLM engine and its merged folder never left behind)."""
    engine, tokenizer = load_engine(model, adapter, **options)
    try:
        yield engine, tokenizer
    finally:
        release(engine)


def release(engine: Engine) -> None:
    """Drop the engine's model so that the next one fits in memory (a vLLM engine is shut down)."""
    if hasattr(engine, "release"):
        engine.release()
        return
    engine.model = None
    gc.collect()
    trim()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
