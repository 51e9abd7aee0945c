"""Summed log-probabilities of response tokens, with the LM head applied only where needed.

The vocabulary projection is the largest matmul of a small model (49k x 576 for SmolLM2-135M), and
only response positions carry loss; running the decoder for hidden states and the head on the
selected positions alone skips that work for every prompt and padding position.
"""

from __future__ import annotations

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


def response_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                   sparse_head: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the sum of log p(token) over positions whose label is not IGNORE, and their count.

    Labels are aligned with ``input_ids`` (the usual causal-LM convention); position t predicts t+1.
    """
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
