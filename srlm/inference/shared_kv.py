"""Decoding a prompt's n samples against one copy of the prompt's key/values.

The n samples of a prompt (N candidates, a generative judge's k judgements) share its tokens. Repeating the
prompt's key/values for each sample made a generative judge (3 samples of ~450-token rubric prompts) hold
three copies of every prompt: about 1 GB more than anything else in the default loop. Here a batch keeps its
prompts' key/values one row per prompt, each sample keeps only the tokens it generated, and attention over
the two parts is combined exactly: the softmax over their union, from each part's maximum, sum and weighted
values. The prompt part is read once per prompt for all its samples, as queries of one matrix product.

Used by ``Engine.generate`` for n > 1 on models whose layers all attend over the full context through
transformers' attention interface.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from transformers import AttentionInterface

NAME = "srlm_shared_prompt"


class SharedPrompts:
    """The prompts' key/values of one batch and which prompt each live row samples.

    Args:
        cache: the prompts' cache after prefill, one row per prompt ([prompts, kv heads, length, dim] a layer).
        mask: [prompts, length], 1 where a prompt has a token (prompts are left-padded).
        samples: rows per prompt; row ``p * samples + j`` is sample j of prompt p.
    """

    def __init__(self, cache, mask: torch.Tensor, samples: int):
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]
        if self.layers and self.layers[0][0].shape[2] != mask.shape[1]:
            raise ValueError(f"prompt mask covers {mask.shape[1]} positions, the cache {self.layers[0][0].shape[2]}")
        self.valid = mask.bool()[:, None, None, :]
        self.prompts, self.samples = mask.shape[0], samples
        self.slots = torch.arange(self.prompts * samples, device=mask.device)

    def select(self, index: torch.Tensor) -> None:
        """Keep the live rows ``index`` (finished samples leave the batch)."""
        self.slots = self.slots[index]


def _merge(o1, m1, z1, o2, m2, z2):
    """softmax-weighted values over two parts of the keys, from each part's unnormalised values, max and sum."""
    m = torch.maximum(m1, m2)
    a1, a2 = torch.exp(m1 - m), torch.exp(m2 - m)
    return (o1 * a1 + o2 * a2) / (z1 * a1 + z2 * a2)


def _part(scores: torch.Tensor, values: torch.Tensor):
    """(unnormalised weighted values, max, sum) of one part; scores in fp32."""
    m = scores.amax(-1, keepdim=True)
    e = torch.exp(scores - m)
    return torch.matmul(e.to(values.dtype), values).float(), m, e.sum(-1, keepdim=True)


def shared_prompt_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                            shared_prompts: SharedPrompts = None, **kwargs):
    """Attention of one decode step: ``key``/``value`` hold each row's own tokens, ``shared_prompts`` its prompt's."""
    if shared_prompts is None or query.shape[2] != 1:
        raise RuntimeError(f"{NAME} attention serves decode steps of Engine.generate only")
    sp = shared_prompts
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads  # query heads per key/value head
    scaling = dim ** -0.5 if scaling is None else scaling
    q = query[:, :, 0].reshape(rows, kv_heads, group, dim)

    # Prompt part: the live rows of each prompt are n x group queries against its one copy of the prompt.
    pk, pv = sp.layers[module.layer_idx]
    p, n = sp.prompts, sp.samples
    slotted = q.new_zeros((p * n, kv_heads, group, dim)).index_copy_(0, sp.slots, q)
    slotted = slotted.view(p, n, kv_heads, group, dim).transpose(1, 2).reshape(p, kv_heads, n * group, dim)
    scores = torch.matmul(slotted, pk.transpose(-1, -2)).float() * scaling
    o1, m1, z1 = _part(scores.masked_fill(~sp.valid, float("-inf")), pv)

    def by_row(t: torch.Tensor) -> torch.Tensor:  # [prompts, kv heads, n * group, x] -> [rows, kv heads, group, x]
        x = t.shape[-1]
        t = t.view(p, kv_heads, n, group, x).transpose(1, 2).reshape(p * n, kv_heads, group, x)
        return t.index_select(0, sp.slots)

    # Own part: the tokens this row generated (the current one included).
    o2, m2, z2 = _part(torch.matmul(q, key.transpose(-1, -2)).float() * scaling, value)
    out = _merge(by_row(o1), by_row(m1), by_row(z1), o2, m2, z2)
    return out.to(query.dtype).reshape(rows, 1, heads, dim), None


AttentionInterface.register(NAME, shared_prompt_attention)


def supported(model, cache) -> bool:
    """Whether ``model`` attends as this module assumes: full attention in every layer (no sliding window, no
    logit soft-capping, no attention sinks) through transformers' attention interface."""
    from srlm.inference.kv_cache import ReservedLayer

    config = model.config
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    if getattr(config, "attn_logit_softcapping", None) or any(hasattr(m, "sinks") for m in model.modules()):
        return False
    return all(type(layer) is ReservedLayer for layer in cache.layers)  # sliding-window layers are not


@contextmanager
def shared_prompt_attention_of(model) -> Iterator[None]:
    """Within the block, ``model`` attends with ``shared_prompt_attention``."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
