"""Technique 4: logits masking: run the LM head only where the loss needs it.

A causal LM's loss only reads the logits of positions whose next label is trainable
(label != -100 after the shift). Instruction tuning trains on the replies alone, and the memory
benchmark marks the last 30% of each sequence trainable, so most of the B x T x V logits are
computed, kept for backward and thrown away. Gathering the N trainable hidden states first,

    loss = CE(head(h[trainable]), y[trainable])  ==  CE(head(h), y, ignore_index=-100),

is exact, and the head's output shrinks from T x V to N x V: on Llama-3.2 3B at 2048 tokens,
one T x V FP32 tensor is 0.98 GiB, one N x V (N = 614) is 0.29 GiB.

`trainable_rows` needs to know N. With real labels it finds the positions itself; a fake batch
(the `simulated` meter) has no label values, so the positions are passed in (`index`), as the
benchmark batch does.
"""

from __future__ import annotations

import torch

from lowmem.reference import IGNORE_INDEX


def trainable_index(labels: torch.Tensor) -> torch.Tensor:
    """Flat positions p into (B x (T-1)) whose shifted label is trainable; needs real labels."""
    return (labels[:, 1:].reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


def shifted(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All positions that predict a next token: (B(T-1)) x D hidden rows and their targets."""
    d = hidden.shape[-1]
    return hidden[:, :-1].reshape(-1, d), labels[:, 1:].reshape(-1)


def trainable_rows(
    hidden: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """N x D hidden rows and N targets of the trainable positions only."""
    rows, targets = shifted(hidden, labels)
    if index is None:
        index = trainable_index(labels)
    return rows.index_select(0, index), targets.index_select(0, index)
