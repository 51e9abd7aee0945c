"""Optimiser and learning-rate schedule shared by the SFT and DPO modules."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class OptimConfig:
    """AdamW over the trainable parameters only (the LoRA adapter), with warm-up and decay."""

    lr: float = 2e-4
    """Peak learning rate. The paper's 5.5e-6 (SFT) and 1e-6 (DPO) are for full fine-tuning of 70B; LoRA wants more."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    warmup_steps: int = 0
    """Linear warm-up steps; when 0, ``warmup_ratio`` of the total steps is used."""
    warmup_ratio: float = 0.05
    """Warm-up as a share of all optimizer steps (used when warmup_steps is 0)."""
    schedule: str = "cosine"
    """Decay after warm-up: ``cosine``, ``linear`` or ``constant``."""
    min_lr_ratio: float = 0.2
    """Final learning rate as a share of the peak (the paper decays 5.5e-6 -> 1.1e-6, i.e. 0.2)."""


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"schedule '{schedule}': expected cosine, linear or constant")
    return min_ratio + (1.0 - min_ratio) * decay


def configure(module, config: OptimConfig):
    """The ``configure_optimizers`` return value for a LightningModule: trainable parameters only."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("no trainable parameters (is the adapter frozen?)")
    fused = bool(params[0].is_cuda)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=tuple(config.betas),
                                  fused=fused or None)
    total = max(1, int(module.trainer.estimated_stepping_batches))
    warmup = config.warmup_steps or int(round(config.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, config.schedule, config.min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
