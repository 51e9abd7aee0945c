"""Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) for srlm's modules.

Lightning runs FSDP2 through ``ModelParallelStrategy`` (``configs/strategies/fsdp.yaml``), which
calls the module's ``configure_model`` with a device mesh: there each decoder layer becomes one
shard group (gathered one layer at a time in forward and backward) and the rest of the network the
root group. Frozen base weights and trainable LoRA weights may share a group (FSDP2 shards each
parameter on its own). FSDP2 runs on CPU with gloo, so the loop's multi-process test covers it;
Lightning's older ``FSDPStrategy`` (FSDP1) needs CUDA.

Export needs the full weights: ``full_state_dict`` gathers them (a collective: every rank calls
it) onto rank 0, which alone writes the model folder.
"""

from __future__ import annotations

import torch


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model (peft-wrapped or not), by its ``_no_split_modules``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(base).__name__} names no decoder layer class (_no_split_modules): cannot shard it")
    return layers


def shard(model: torch.nn.Module, mesh) -> None:
    """Shard ``model`` in place over ``mesh`` (a 1-D data-parallel device mesh): each decoder layer, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: torch.nn.Module) -> dict:
    """The full (unsharded) state dict on rank 0, on CPU; ``{}`` on the other ranks. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
