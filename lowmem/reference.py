"""Plain, obviously correct versions of what lowmem computes; tests compare against these.

Nothing here is optimized, and nothing here should be: each function is the textbook
computation, written for a reader, so that an optimized technique can be checked against it
(STYLE: "the naive reference is selectable by name").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over trainable positions.

    logits: B x T x V; labels: B x T, IGNORE_INDEX where a position is not trained. Position t
    predicts label t + 1 (the shift every causal LM applies).
    """
    shifted_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    shifted_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T + b + scale * (x A^T) B^T, with A: r x D_in and B: D_out x r."""
    y = x @ weight.T + scale * (x @ lora_a.T) @ lora_b.T
    return y if bias is None else y + bias


def trainable_positions(labels: torch.Tensor) -> int:
    """N, the number of positions that contribute to the loss after the shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
