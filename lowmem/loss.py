"""The loss a stack row computes: the model's own, or the LM head + loss done by lowmem.

Rows up to `checkpoint` call the Hugging Face model with labels (its head and cross-entropy,
logits kept in the output). From `softmax_approx` on, and in the `best` profile, lowmem runs
the decoder to the final hidden states and computes head + loss itself:

- `softmax_approx`: CE over K candidates per position (`lowmem.softmax_approx`), training only;
- `logits_mask`: the head runs on the N trainable positions only (`lowmem.logits_mask`);
- `fused_loss` (`best`): exact chunked head + CE, no N x V tensor (`lowmem.fused_loss`).

In eval mode (`model.training` False) the loss is always the exact full-vocabulary one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowmem.fused_loss import chunked_logits, fused_cross_entropy
from lowmem.logits_mask import shifted, trainable_rows
from lowmem.models import base_model
from lowmem.reference import IGNORE_INDEX
from lowmem.softmax_approx import subset_cross_entropy


def compute_loss(model: torch.nn.Module, batch: dict, cfg) -> tuple[torch.Tensor, object]:
    """(loss, model output or None) for one batch under the stack row `cfg`."""
    batch = dict(batch)
    index = batch.pop("trainable_index", None)
    if not (cfg.enabled("softmax_approx") or cfg.enabled("logits_mask")):
        out = model(**batch)
        return out.loss, out
    base = base_model(model)
    hidden = base.model(input_ids=batch["input_ids"]).last_hidden_state
    head = base.get_output_embeddings()
    if cfg.enabled("logits_mask"):
        rows, targets = trainable_rows(hidden, batch["labels"], index)
    else:
        rows, targets = shifted(hidden, batch["labels"])
    del hidden
    if cfg.enabled("fused_loss"):
        return fused_cross_entropy(rows, targets, head, cfg.loss_chunk), None
    if cfg.enabled("softmax_approx") and model.training:
        loss = subset_cross_entropy(
            rows,
            targets,
            head,
            cfg.softmax_k,
            cfg.softmax_rule,
            cfg.softmax_variant,
            base.get_input_embeddings(),
            cfg.loss_chunk,
        )
        return loss, None
    logits = chunked_logits(rows, head, cfg.loss_chunk)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX), None
