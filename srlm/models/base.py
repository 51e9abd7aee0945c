"""What the SFT and DPO modules share: the backbone, adapter-only checkpoints and the peft export."""

from __future__ import annotations

import contextvars
import dataclasses
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from srlm.models import optim, sharding
from srlm.models.backbone import BackboneConfig, load_tokenizer, load_trainable, write_lineage

log = logging.getLogger(__name__)


def _plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


_DEFERRED = contextvars.ContextVar("srlm_deferred_loading", default=False)


@contextmanager
def deferred_loading():
    """Modules made inside this block load their tokenizer and weights on first use (``self.tokenizer``,
    ``self.model``), at the latest in ``setup``, instead of at construction. The ``loop`` command makes its M1
    module so: a run whose M1 is trained reads only its settings and never loads it."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


class AdapterModule(L.LightningModule):
    """A backbone with a trainable adapter. Checkpoints hold the trainable weights only.

    The tokenizer and the weights load at construction, or on first use when made under ``deferred_loading``.
    """

    def __init__(self, backbone: BackboneConfig, optimizer: optim.OptimConfig, export_dir: Optional[str],
                 sparse_lm_head: bool):
        super().__init__()
        self.backbone_config, self.optim_config = backbone, optimizer
        self.export_dir, self.sparse_lm_head = export_dir, sparse_lm_head
        # Frozen base weights come from the model files, not the checkpoint.
        self.strict_loading = False
        self.exported_to: Optional[Path] = None
        if not _DEFERRED.get():
            self._load_tokenizer()
            self._load_weights()

    def __getattr__(self, name: str):
        # Only for names not found as usual: a deferred module's tokenizer and weights, loaded on first use.
        try:
            return super().__getattr__(name)  # torch keeps submodules (``model``) out of __dict__
        except AttributeError:
            if name == "tokenizer":
                self._load_tokenizer()
            elif name in ("model", "merged_adapters"):
                self._load_weights()
            else:
                raise
            return super().__getattr__(name) if name == "model" else self.__dict__[name]

    def _load_tokenizer(self) -> None:
        self.tokenizer = load_tokenizer(self.backbone_config.model_name_or_path, self.backbone_config.trust_remote_code)

    def _load_weights(self) -> None:
        self.model, self.merged_adapters = load_trainable(self.backbone_config)
        # from_pretrained returns eval mode, and Lightning 2.x keeps submodules' modes: without this,
        # LoRA dropout would silently stay off during training.
        self.model.train()

    def unload(self) -> None:
        """Drop the network (the tokenizer and settings stay), once a phase has exported it: the loop keeps a
        finished phase's module for its settings, not its half-gigabyte of weights. A later use of ``self.model``
        loads the weights again, as under ``deferred_loading``."""
        if "model" in self._modules:
            del self.model
        self.__dict__.pop("merged_adapters", None)

    def setup(self, stage: str) -> None:
        self.model  # noqa: B018  (loaded here at the latest: before configure_model and a checkpoint's restore)

    def configure_model(self) -> None:
        # Under ModelParallelStrategy (FSDP2, configs/strategies/fsdp.yaml) Lightning hands the module a
        # device mesh: shard the network over its data-parallel dimension.
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None or sharding.is_sharded(self.model):
            return
        if self.backbone_config.load_in_4bit:
            raise ValueError("4-bit weights cannot be sharded with FSDP: use DDP, or load_in_4bit: false")
        if mesh.ndim > 1 and mesh["tensor_parallel"].size() > 1:
            raise ValueError("srlm shards with FSDP only: set the strategy's tensor_parallel_size to 1")
        sharding.shard(self.model, mesh["data_parallel"] if mesh.ndim > 1 else mesh)
        log.info("sharded with FSDP2 over %d processes", mesh.size())
        # The sparse LM head calls the decoder and the head apart, past the root shard group's
        # gathering of the embeddings and the head: run the whole forward instead.
        self.sparse_lm_head = False

    def configure_optimizers(self):
        return optim.configure(self, self.optim_config)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        # Plain data only, so that checkpoints load with torch.load(weights_only=True).
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = _plain(dict(checkpoint["hyper_parameters"]))

    def on_train_end(self) -> None:
        # on_train_end (not on_fit_end): callbacks' on_fit_end run before the module's, and the
        # self-rewarding callback needs the exported model. The path is found on every rank: under
        # DDP trainer.log_dir is a collective, which rank 0 alone (inside export) would wait on forever.
        self.export(str(self.export_path()))

    def export_path(self) -> Path:
        if self.export_dir:
            return Path(self.export_dir)
        root = self.trainer.log_dir or self.trainer.default_root_dir
        return Path(root) / "adapter"

    def export(self, path: Optional[str] = None) -> Optional[Path]:
        """Write the adapter in peft's own format (or the full model without LoRA), the tokenizer and the lineage.

        Rank 0 writes; under FSDP every rank first takes part in gathering the full weights.
        """
        state = sharding.full_state_dict(self.model) if sharding.is_sharded(self.model) else None
        return self._write(Path(path) if path else self.export_path(), state)

    @rank_zero_only
    def _write(self, target: Path, state: Optional[dict]) -> Path:
        target.mkdir(parents=True, exist_ok=True)
        extra = {} if state is None else {"state_dict": state}
        if self.backbone_config.lora:
            self.model.save_pretrained(target, selected_adapters=["default"], **extra)
        else:
            self.model.save_pretrained(target, **extra)
        self.tokenizer.save_pretrained(target)
        write_lineage(target, self.merged_adapters, self.backbone_config)
        self.exported_to = target
        log.info("exported model to %s", target)
        return target
