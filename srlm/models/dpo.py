"""DPO round (M_t -> M_{t+1}): the policy starts as M_t, and M_t itself is the frozen reference.

Where the reference comes from:
- M_t given as an srlm adapter (``backbone.adapter_path``) on a full-precision base: that adapter (and
  its lineage) is *merged* into the base weights and a fresh adapter is added, so the network with
  its adapter disabled is exactly M_t.
- A 4-bit base, where merging is lossy: M_t's adapters (its lineage and itself) stay frozen and
  active under the fresh one, and the reference pass turns the fresh one alone off.
- Full fine-tuning (``lora: false``, M_t a whole model folder): the policy is M_t's weights, all
  trainable. With ``precompute_reference`` (or every pair's log-probs harvested) no copy is kept: the
  reference is the policy before its first update. Otherwise a frozen copy of M_t, made before the
  first update, serves the reference pass of every step (twice the weights' memory).
- No adapter_path: the base model (M0) is the reference.

Reference log-probs are computed once for the whole preference set before training (one no-grad
pass, kept with the data; ``precompute_reference``), so a training step runs one forward; the
on-the-fly path (reference pass every step) stays available. Pairs that already carry
``ref_chosen_logp``/``ref_rejected_logp`` (harvested while sampling from M_t) need no pass at all.
The values travel in the checkpoints: a round resumed mid-way, whose policy is no longer M_t, keeps
the reference of its start (full fine-tuning could not compute it again).
"""

# No ``from __future__ import annotations`` here: DPORoundConfig (srlm/selfreward/config.py) inherits
# DPOConfig's fields, and jsonargparse would resolve their string annotations in that module.
import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Optional

import torch

from srlm.models.backbone import BackboneConfig, activate, lineage_names
from srlm.models.base import AdapterModule
from srlm.models.dpo_loss import LOSS_TYPES, dpo_loss
from srlm.models.logprobs import response_logps
from srlm.models.optim import OptimConfig

log = logging.getLogger(__name__)


@dataclass
class DPOConfig:
    """How a DPO round trains: the loss and the optimiser (as TRL's ``DPOConfig``).

    ``DPOModule`` takes these as its arguments (their defaults are these); the loop's ``dpo:`` section extends
    them (``DPORoundConfig``)."""

    beta: float = 0.1
    """DPO temperature (paper: 0.1)."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO) | robust | hinge | ipo."""
    label_smoothing: float = 0.0
    """eps for the robust loss, in [0, 0.5)."""
    optimizer: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, warmup_ratio=0.1, schedule="linear",
                                                                      min_lr_ratio=0.1))
    """Optimiser; the paper decays 1e-6 -> 1e-7 for full fine-tuning."""
    precompute_reference: bool = True
    """Reference log-probs in one pass before training (harvested ones need none); false: a reference pass every
    step (with ``lora: false`` on a frozen copy of M_t, twice the weights' memory)."""

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type '{self.loss_type}': expected one of {', '.join(LOSS_TYPES)}")


_DEFAULT = DPOConfig()


class DPOModule(AdapterModule):
    """Direct Preference Optimisation with a hand-written loss against the adapter-disabled reference.

    Args:
        backbone: the model; ``adapter_path`` names M_t's adapter (merged, then a fresh adapter is trained).
        optimizer: AdamW and learning-rate schedule over the trainable parameters.
        beta: DPO temperature (paper: 0.1).
        loss_type: sigmoid (DPO), robust, hinge or ipo.
        label_smoothing: eps for the robust loss, in [0, 0.5).
        precompute_reference: compute reference log-probs once before training instead of every step.
        export_dir: where the peft adapter is written at the end of fit (default: the logger's folder/adapter).
        sparse_lm_head: apply the LM head only at response positions (same log-probs, less work).

    The DPO arguments are those of ``DPOConfig``, with its defaults (flat, so a ``fit`` config names them
    directly); ``DPOModule.from_config`` builds one from a config.
    """

    def __init__(self, backbone: BackboneConfig = BackboneConfig(), optimizer: OptimConfig = _DEFAULT.optimizer,
                 beta: float = _DEFAULT.beta, loss_type: str = _DEFAULT.loss_type,
                 label_smoothing: float = _DEFAULT.label_smoothing,
                 precompute_reference: bool = _DEFAULT.precompute_reference, export_dir: Optional[str] = None,
                 sparse_lm_head: bool = True):
        self.dpo_config = DPOConfig(beta, loss_type, label_smoothing, optimizer, precompute_reference)
        super().__init__(backbone, optimizer, export_dir, sparse_lm_head)
        self.save_hyperparameters()
        self.reference_model: Optional[torch.nn.Module] = None  # full fine-tuning's frozen M_t (made in setup)

    @classmethod
    def from_config(cls, backbone: BackboneConfig, config: DPOConfig, **kwargs) -> "DPOModule":
        """A module with ``config``'s DPO settings (``kwargs``: ``export_dir``, ``sparse_lm_head``)."""
        return cls(backbone, **{f.name: getattr(config, f.name) for f in fields(DPOConfig)}, **kwargs)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # Full fine-tuning without precomputed log-probs: keep M_t as a frozen copy, made here (after the data
        # is read, before a checkpoint is restored or the optimiser built) and only if some pair needs it.
        if self.backbone_config.lora or self.dpo_config.precompute_reference or self.reference_model is not None:
            return
        datasets = self._datasets()  # none known (plain dataloaders): keep the copy to be safe
        if not datasets or any(item["ref"] is None for ds in datasets.values() for item in ds.items):
            self.reference_model = copy.deepcopy(self.model).eval()
            for p in self.reference_model.parameters():
                p.requires_grad_(False)
            log.info("full fine-tuning, reference computed every step: a frozen copy of M_t is kept")

    # -- reference -------------------------------------------------------------------------------
    @contextmanager
    def _reference_mode(self):
        """The network as M_t: adapter off (or the frozen reference adapter), eval mode, no grad.

        Eval mode also turns off dropout and gradient checkpointing for this pass.
        """
        was_training = self.model.training
        self.model.eval()
        lineage = lineage_names(self.model) if self.backbone_config.lora else []
        try:
            with torch.no_grad():
                if lineage:  # 4-bit base: M_t is its stacked lineage adapters without the new one
                    activate(self.model, lineage)
                    try:
                        yield
                    finally:
                        activate(self.model, lineage + ["default"])
                elif self.backbone_config.lora:
                    with self.model.disable_adapter():
                        yield
                elif self.reference_model is not None:
                    self.reference_model.eval()  # kept out of training mode whatever Lightning does to children
                    yield
                elif self._trainer is None or self._trainer.global_step == 0:
                    yield  # full fine-tuning, before the first update: the network is still M_t
                else:
                    raise RuntimeError("full fine-tuning with precompute_reference keeps no copy of M_t: its reference "
                                       "log-probs are computed before the first update (restored from the checkpoint "
                                       "on resume)")
        finally:
            self.model.train(was_training)

    def reference_logps(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        with self._reference_mode():
            network = self.model if self.reference_model is None else self.reference_model
            sums, _ = response_logps(network, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                     self.sparse_lm_head, batch.get("lengths"))
        half = sums.shape[0] // 2
        return sums[:half], sums[half:]

    def _datasets(self) -> dict:
        """The fit's preference datasets by split (those that keep reference log-probs)."""
        dm = self.trainer.datamodule
        if dm is None:
            return {}
        return {split: ds for split, ds in (("train", dm.train_dataset), ("val", dm.val_dataset))
                if ds is not None and hasattr(ds, "set_reference")}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # The reference of the round's start (plain lists: the checkpoint loads with weights_only=True).
        checkpoint["reference_logps"] = {split: [list(x["ref"]) if x["ref"] is not None else None for x in ds.items]
                                         for split, ds in self._datasets().items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Lightning restores the checkpoint after the datamodule's setup and before on_fit_start.
        for split, values in (checkpoint.get("reference_logps") or {}).items():
            dataset = self._datasets().get(split)
            if dataset is not None and len(values) == len(dataset):
                for i, ref in enumerate(values):
                    if ref is not None:
                        dataset.set_reference(i, *ref)

    def on_fit_start(self) -> None:
        if not self.dpo_config.precompute_reference and (self.backbone_config.lora or self.reference_model is not None):
            return
        dm = self.trainer.datamodule
        for dataset in self._datasets().values():
            missing = [i for i, item in enumerate(dataset.items) if item["ref"] is None]
            log.info("reference log-probs: %d pairs carry them (harvested, or restored on resume), %d to compute",
                     len(dataset) - len(missing), len(missing))
            if not missing:
                continue
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, missing), batch_size=dm.eval_batch_size,
                                                 collate_fn=dm.collate)
            for batch in loader:
                batch = self.trainer.strategy.batch_to_device(batch)
                chosen, rejected = self.reference_logps(batch)
                for i, c, r in zip(batch["index"].tolist(), chosen.tolist(), rejected.tolist()):
                    dataset.set_reference(i, c, r)

    # -- steps -----------------------------------------------------------------------------------
    def _step(self, batch, stage: str):
        sums, counts = response_logps(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                      self.sparse_lm_head, batch.get("lengths"))
        half = sums.shape[0] // 2
        if "ref_chosen_logp" in batch:
            ref_c, ref_r = batch["ref_chosen_logp"].to(sums.dtype), batch["ref_rejected_logp"].to(sums.dtype)
        else:
            ref_c, ref_r = self.reference_logps(batch)
        losses, rew_c, rew_r = dpo_loss(sums[:half], sums[half:], ref_c, ref_r, self.dpo_config.beta,
                                        self.dpo_config.loss_type, self.dpo_config.label_smoothing, counts[:half], counts[half:])
        loss = losses.mean()
        prefix = "" if stage == "train" else "val/"
        sync = stage != "train"
        metrics = {
            "rewards/chosen": rew_c.mean(),
            "rewards/rejected": rew_r.mean(),
            "rewards/accuracies": (rew_c > rew_r).float().mean(),
            "rewards/margins": (rew_c - rew_r).mean(),
            "logps/chosen": sums[:half].detach().mean(),
            "logps/rejected": sums[half:].detach().mean(),
        }
        self.log_dict({prefix + k: v for k, v in metrics.items()}, batch_size=half, sync_dist=sync,
                      prog_bar=False)
        self.log(prefix + "loss", loss, batch_size=half, prog_bar=True, sync_dist=sync)
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train")
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)
        return loss

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")
