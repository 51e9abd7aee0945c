"""The DPO loss and its variants, as pure functions of summed sequence log-probabilities.

delta = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)), log-probs *summed*
over response tokens (length-normalising them silently changes what beta means).

- ``sigmoid`` (DPO):  -log sigmoid(beta * delta)
- ``robust`` (label noise eps in [0, 0.5)):
  ((1 - eps) * -log sigmoid(beta * delta) - eps * -log sigmoid(-beta * delta)) / (1 - 2 eps)
- ``hinge`` (SLiC):   relu(1 - beta * delta)
- ``ipo``:            (delta_bar - 1 / (2 beta))^2 with per-token mean log-probs (delta_bar), as IPO defines it

Rewards, logged as TRL does: reward_chosen = beta * (log pi - log ref)(y_w), likewise rejected.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: Optional[torch.Tensor] = None, rejected_tokens: Optional[torch.Tensor] = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the chosen/rejected rewards (detached)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type '{loss_type}': expected one of {', '.join(LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing}: expected 0 <= eps < 0.5")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "robust":
        eps = label_smoothing
        losses = ((1 - eps) * -F.logsigmoid(beta * delta) - eps * -F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs the response token counts (it uses per-token mean log-probs)")
        mean_delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (mean_delta - 1 / (2 * beta)) ** 2
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()
