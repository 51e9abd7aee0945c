"""Naming the model to evaluate: a base plus adapter, or simply a run's iteration folder.

A model trained by srlm is exported as a peft adapter folder holding ``adapter_config.json`` and
``srlm_lineage.json`` (which names the base model). Evaluation commands accept such a folder, or
a run folder that contains one under ``model/`` (``runs/x/m1``, ``runs/x/iter_2``), in place of
``model``, so that nobody has to repeat the base model by hand.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Optional

import torch

from srlm.models.backbone import LINEAGE_FILE, is_full_model, load_for_inference, load_tokenizer
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


def load_engine(model: str, adapter: Optional[str] = None, batch_size: int = 8, seed: int = 0,
                dtype: str = "auto", device: Optional[torch.device] = None, trust_remote_code: bool = False,
                load_in_4bit: bool = False) -> tuple[Engine, object]:
    """Load ``model`` (+ ``adapter``) for inference on ``device`` (default: the GPU when there is one); returns
    ``(engine, tokenizer)``. ``load_in_4bit``: the 4-bit base a QLoRA run trains (bitsandbytes places it)."""
    base, adapter = resolve_model(model, adapter)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = load_for_inference(base, adapter, dtype, trust_remote_code, load_in_4bit=load_in_4bit)
    if not load_in_4bit:
        net = net.to(device)
    tokenizer = load_tokenizer(base, trust_remote_code)
    engine = Engine(net, [tokenizer.eos_token_id], tokenizer.pad_token_id, batch_size=batch_size, seed=seed)
    return engine, tokenizer


def release(engine: Engine) -> None:
    """Drop the engine's model so that the next one fits in GPU memory."""
    engine.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
