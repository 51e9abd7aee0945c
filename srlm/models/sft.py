"""Supervised fine-tuning (M0 -> M1 on IFT+EFT): token-level cross-entropy on response tokens only.

The loss is the mean over the response tokens of the whole (global) batch, on one device or many:
under DDP each rank divides its own sum by the token count of all ranks, so that the averaged
gradients and the logged loss are those of one process running the global batch.
"""

from __future__ import annotations

from typing import Optional

import torch

from srlm.models.backbone import BackboneConfig
from srlm.models.base import AdapterModule
from srlm.models.logprobs import response_logps
from srlm.models.optim import OptimConfig


class SFTModule(AdapterModule):
    """Masked-loss SFT through a LoRA adapter.

    Args:
        backbone: which model to load and how (LoRA, dtype, 4-bit, gradient checkpointing).
        optimizer: AdamW and learning-rate schedule over the trainable parameters.
        export_dir: where the peft adapter is written at the end of fit (default: the logger's folder/adapter).
        sparse_lm_head: apply the LM head only at response positions (same loss, less work).
    """

    def __init__(self, backbone: BackboneConfig = BackboneConfig(), optimizer: OptimConfig = OptimConfig(),
                 export_dir: Optional[str] = None, sparse_lm_head: bool = True):
        super().__init__(backbone, optimizer, export_dir, sparse_lm_head)
        self.save_hyperparameters()

    def loss(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to back-propagate, the global token-mean loss to log)."""
        sums, counts = response_logps(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                      self.sparse_lm_head)
        total, n = -sums.sum(), counts.sum()
        world = self._trainer.world_size if self._trainer is not None else 1
        if world == 1:
            loss = total / n.clamp(min=1)
            return loss, loss.detach()
        # One all-reduce for the global sum and count. Gradients are averaged over the ranks, hence
        # the factor world: the mean gradient is that of (global sum / global count).
        both = self.trainer.strategy.reduce(torch.stack([total.detach(), n.to(total.dtype)]), reduce_op="sum")
        count = both[1].clamp(min=1)
        return total * world / count, both[0] / count

    def training_step(self, batch, batch_idx):
        loss, value = self.loss(batch)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", value, prog_bar=True, batch_size=bs)
        self.log("train/padding_fraction", 1.0 - batch["n_real_tokens"] / batch["n_tokens"], batch_size=bs)
        self.log("train/tokens", float(batch["n_real_tokens"]), reduce_fx="sum", batch_size=bs)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        return loss

    def validation_step(self, batch, batch_idx):
        _, value = self.loss(batch)
        self.log("val/loss", value, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
