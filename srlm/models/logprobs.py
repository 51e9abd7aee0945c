"""Summed log-probabilities of response tokens, with the LM head applied only where needed.

The vocabulary projection is the largest matmul of a small model (49k x 576 for SmolLM2-135M), and
only response positions carry loss; running the decoder for hidden states and the head on the
selected positions alone skips that work for every prompt and padding position.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from srlm.data.batching import IGNORE


def _split_head(model):
    """(decoder, head) of a causal LM (peft-wrapped or not), or None when the split is unsafe."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "final_logit_softcapping", None):
        return None  # logits are post-processed inside forward (Gemma 2): use the full forward
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head


def length_groups(lengths: Sequence[int], min_saving: float = 0.15) -> list[list[int]]:
    """Rows split into a short and a long group when padding each to its own width saves at least
    ``min_saving`` of the positions; otherwise one group of all rows.

    A DPO batch stacks chosen and rejected replies, whose lengths often differ by a factor of two:
    padding the short ones to the longest is work that two forwards avoid.
    """
    n = len(lengths)
    order = sorted(range(n), key=lambda i: (lengths[i], i))
    whole = n * lengths[order[-1]]
    best_cost, best_cut = whole, None
    for cut in range(1, n):
        cost = cut * lengths[order[cut - 1]] + (n - cut) * lengths[order[-1]]
        if cost < best_cost:
            best_cost, best_cut = cost, cut
    if best_cut is None or best_cost > (1.0 - min_saving) * whole:
        return [list(range(n))]
    return [sorted(order[:best_cut]), sorted(order[best_cut:])]


def response_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                   sparse_head: bool = True, lengths: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the sum of log p(token) over positions whose label is not IGNORE, and their count.

    Labels are aligned with ``input_ids`` (the usual causal-LM convention); position t predicts t+1.
    ``lengths`` (real tokens per right-padded row, as plain ints so that no device sync is needed)
    lets rows of very different lengths run as two forwards, each cut to its own width.
    """
    groups = length_groups(lengths) if lengths is not None else [list(range(input_ids.shape[0]))]
    if len(groups) > 1:
        sums = torch.zeros(input_ids.shape[0], dtype=torch.float64, device=input_ids.device)
        counts = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        for rows in groups:
            width = max(lengths[i] for i in rows)
            index = torch.tensor(rows, device=input_ids.device)
            s, c = _response_logps(model, input_ids[index, :width], attention_mask[index, :width],
                                   labels[index, :width], sparse_head)
            sums = sums.index_copy(0, index, s)
            counts = counts.index_copy(0, index, c)
        return sums, counts
    return _response_logps(model, input_ids, attention_mask, labels, sparse_head)


def _response_logps(model, input_ids, attention_mask, labels, sparse_head):
    targets = labels[:, 1:]
    mask = targets != IGNORE
    split = _split_head(model) if sparse_head else None
    if split is not None:
        decoder, head = split
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][mask])
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][mask]
    # Summed in float64: a few hundred float32 terms drift by ~1e-3, the tolerance reference log-probs need.
    token_logps = -F.cross_entropy(logits.float(), targets[mask], reduction="none").double()
    rows = mask.nonzero(as_tuple=True)[0]
    sums = torch.zeros(input_ids.shape[0], dtype=token_logps.dtype, device=input_ids.device).index_add_(0, rows, token_logps)
    return sums, mask.sum(dim=1)
