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
from torch._subclasses.fake_tensor import FakeTensor

from lowmem.fused_loss import chunked_logits, fused_cross_entropy
from lowmem.logits_mask import shifted, trainable_rows
from lowmem.models import base_model
from lowmem.reference import IGNORE_INDEX
from lowmem.softmax_approx import subset_cross_entropy


def compute_loss(model: torch.nn.Module, batch: dict, cfg) -> tuple[torch.Tensor, object]:
    """(loss, model output or None) for one batch under the stack row `cfg`."""
    check_token_ids(batch["input_ids"], batch.get("labels"), model.config.vocab_size)
    batch = dict(batch)
    index = batch.pop("trainable_index", None)
    if not (cfg.enabled("softmax_approx") or cfg.enabled("logits_mask")):
        out = model(**batch)
        return out.loss, out
    base = base_model(model)
    # a padded batch's mask and positions reach the decoder as the model's own call passes them
    masks = {k: batch[k] for k in ("attention_mask", "position_ids") if batch.get(k) is not None}
    hidden = base.model(input_ids=batch["input_ids"], **masks).last_hidden_state
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


def check_token_ids(
    input_ids: torch.Tensor, labels: torch.Tensor | None, vocab_size: int, where: str = "batch"
) -> None:
    """Refuse token ids or targets outside [0, vocab_size) (labels may also be -100).

    Every row must refuse them alike: a stock embedding raises IndexError, while a streamed
    embedding would clamp and a chunked loss would score a missing logit as 0, both silently.
    Fake tensors (the simulated meter) hold no values and are not checked."""
    if isinstance(input_ids, FakeTensor):
        return
    checks = [("input_ids", input_ids)]
    if labels is not None:
        checks.append(("labels", labels[labels != IGNORE_INDEX]))
    for name, ids in checks:
        if not ids.numel():
            continue
        low, high = int(ids.min()), int(ids.max())
        if high >= vocab_size or low < 0:
            bad = high if high >= vocab_size else low
            raise ValueError(
                f"{where}: {name} holds token id {bad} (largest {high}), outside the "
                f"model's vocabulary of {vocab_size} (ids 0..{vocab_size - 1}"
                + (", or -100 for untrained labels)" if name == "labels" else ")")
                + "; tokenize with the model's own tokenizer"
            )
