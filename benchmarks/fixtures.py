"""The model, the data and the trainers both sides of a section share: the same weights, examples and LoRA."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere, without installing srlm
    sys.path.insert(0, str(ROOT))

SEED_DIR = ROOT / "srlm" / "data" / "seed"
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")  # srlm's BackboneConfig defaults


def load_model(path: str):
    """The model for generation and judging: fp32, eval mode, as srlm loads it for inference."""
    from srlm.models.backbone import load_for_inference, load_tokenizer

    return load_for_inference(path, dtype="float32"), load_tokenizer(path)


def seed_prompts(n: int) -> list[str]:
    """User prompts: ``prompt`` fields of the IFT seed, else of the eval seed; first n distinct."""
    from srlm.data import records

    out: list[str] = []
    for name in ("ift.jsonl", "eft_eval.jsonl"):
        path = SEED_DIR / name
        if path.exists():
            for _, obj in records.iter_jsonl(path):
                if isinstance(obj.get("prompt"), str) and obj["prompt"] not in out:
                    out.append(obj["prompt"])
        if len(out) >= n:
            break
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} seed prompts in {SEED_DIR}, need {n}")
    return out[:n]


def eval_groups(min_items: int) -> list:
    """Whole ranked groups of the eval split, in file order, until they hold at least ``min_items`` replies."""
    from srlm.data import records

    groups = records.read_records(SEED_DIR / "eft_eval.jsonl", records.parse_ranked)
    out, n = [], 0
    for g in groups:
        if n >= min_items:
            break
        out.append(g)
        n += len(g.replies)
    return out


def preference_pairs(n: int, shortest: bool = False) -> list:
    """n preference pairs: prefs.jsonl when shipped, else eval-split rank-0 reply vs worst-ranked reply.

    ``shortest``: the n pairs with the shortest prompt + longer response (in characters), for quick runs.
    """
    from srlm.data import records

    path = SEED_DIR / "prefs.jsonl"
    if path.exists():
        pairs = records.read_records(path, records.parse_preference)
    else:
        pairs = []
        for g in records.read_records(SEED_DIR / "eft_eval.jsonl", records.parse_ranked):
            ranked = sorted(g.replies, key=lambda r: r.rank)
            if ranked[0].rank != ranked[-1].rank:
                pairs.append(records.PreferencePair(g.prompt, ranked[0].text, ranked[-1].text, g.id))
    if len(pairs) < n:
        raise RuntimeError(f"only {len(pairs)} preference pairs available, need {n}")
    if shortest:
        pairs = sorted(pairs, key=lambda p: len(p.prompt) + max(len(p.chosen), len(p.rejected)))
    return pairs[:n]


def lightning_trainer(steps: int, clock, root: str):
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, callbacks=[clock], default_root_dir=root)


def hf_quiet(trainer) -> None:
    """Drop the callback that prints every step's log dict (disable_tqdm swaps the bar for it)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def hf_args(config_cls, root: str, steps: int, batch: int, lr: float, **extra):
    # bf16 and gradient checkpointing are TRL's defaults; srlm runs fp32 without checkpointing on CPU,
    # so TRL gets the same (bf16 autocast is several times slower on CPU, which would flatter srlm).
    return config_cls(output_dir=root, max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                      logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False, fp16=False,
                      gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True, seed=0, **extra)


def lora_config():
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", bias="none", **LORA)


def backbone_config(model_path: str):
    from srlm.models.backbone import BackboneConfig

    return BackboneConfig(model_name_or_path=model_path, dtype="float32", lora=True, lora_r=LORA["r"],
                          lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                          lora_target_modules=LORA["target_modules"])


def load_hf_model(model_path: str):
    import torch
    from transformers import AutoModelForCausalLM

    from srlm.models.backbone import resolve_model_path

    return AutoModelForCausalLM.from_pretrained(resolve_model_path(model_path), dtype=torch.float32,
                                                attn_implementation="sdpa")
