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
    """(loss, model output or None) for one batch under the stack row `cfg`; token ids checked."""
    check_token_ids(batch["input_ids"], batch.get("labels"), model.config.vocab_size)
    if not own_head(cfg):
        batch = {k: v for k, v in batch.items() if k != "trainable_index"}
        out = model(**batch)
        return out.loss, out
    return own_head_loss(model, batch, cfg), None


def own_head(cfg) -> bool:
    """Whether the row computes the LM head and loss itself (from softmax_approx on, best)."""
    return cfg.enabled("softmax_approx") or cfg.enabled("logits_mask")


def own_head_loss(model: torch.nn.Module, batch: dict, cfg) -> torch.Tensor:
    """The decoder to the final hidden states, then the row's head + loss; never B x T x V.

    `batch` holds input_ids and labels, optionally attention_mask, position_ids (which reach
    the decoder as the model's own call passes them), trainable_index (lowmem.logits_mask) and
    further keyword arguments of the decoder."""
    base = base_model(model)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "trainable_index")}
    hidden = base.model(**inputs).last_hidden_state
    head = base.get_output_embeddings()
    index = batch.get("trainable_index")
    if cfg.enabled("logits_mask"):
        rows, targets = trainable_rows(hidden, batch["labels"], index)
    else:
        rows, targets = shifted(hidden, batch["labels"])
    del hidden
    if cfg.enabled("fused_loss"):
        return fused_cross_entropy(rows, targets, head, cfg.kernels.loss_chunk)
    if cfg.enabled("softmax_approx") and model.training:
        loss = subset_cross_entropy(
            rows,
            targets,
            head,
            cfg.softmax.k,
            cfg.softmax.rule,
            cfg.softmax.variant,
            base.get_input_embeddings(),
            cfg.kernels.loss_chunk,
        )
        return loss
    logits = chunked_logits(rows, head, cfg.kernels.loss_chunk)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)


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
