"""Supervised fine-tuning (M0 -> M1 on IFT+EFT): token-level cross-entropy on response tokens only."""

from __future__ import annotations

from typing import Optional

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

    def loss(self, batch) -> "tuple":
        sums, counts = response_logps(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                      self.sparse_lm_head)
        n = counts.sum()
        return -sums.sum() / n.clamp(min=1), n

    def training_step(self, batch, batch_idx):
        loss, _ = self.loss(batch)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/padding_fraction", 1.0 - batch["n_real_tokens"] / batch["n_tokens"], batch_size=bs)
        self.log("train/tokens", float(batch["n_real_tokens"]), reduce_fx="sum", batch_size=bs)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, _ = self.loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
