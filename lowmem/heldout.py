"""The quality protocol's held-out metrics, computed through `evaluate`: loss, perplexity and
next-token accuracy.

Every evaluated token (labels != -100: the assistant tokens of a chat, every token of a
Shakespeare block) is scored with the exact softmax over the whole vocabulary, by the model as
the row trained it (its base as the row stores it: INT4, streamed, ...). The decoder runs once
per batch without gradients; its final hidden states meet the LM head C rows at a time
(`lowmem.fused_loss.token_stats`): log p(target) and the top-1 hit of each token, never a
B x T x V tensor. Those go through the metric modules in lowmem/metrics/ (`heldout_loss`,
`next_token_accuracy`), loaded by path: `evaluate.load` then fetches nothing from a hub.
"""

from __future__ import annotations

from pathlib import Path

import evaluate
import torch
from datasets import Dataset

from lowmem.fused_loss import token_stats
from lowmem.logits_mask import trainable_rows
from lowmem.models import base_model
from lowmem.step import COLUMNS, to_batch

METRICS_DIR = Path(__file__).parent / "metrics"
METRICS = ("heldout_loss", "next_token_accuracy")


def load_metric(name: str) -> evaluate.EvaluationModule:
    """One of lowmem's metric modules (METRICS), by path."""
    if name not in METRICS:
        raise ValueError(f"bad metric={name!r}: must be one of {', '.join(METRICS)}")
    return evaluate.load(str(METRICS_DIR / name))


@torch.no_grad()
def heldout_metrics(
    model: torch.nn.Module, ds: Dataset, batch_size: int, batches: int = 0, chunk: int = 4096
) -> dict:
    """{loss, perplexity, accuracy, tokens} over the trainable tokens of the first `batches`
    batches of `ds` (all with 0), in batches of `batch_size` rows; the model's mode is kept."""
    loss_metric, accuracy_metric = (load_metric(name) for name in METRICS)
    rows_in = ds.select_columns(list(COLUMNS)).with_format("torch")
    stop = min(len(rows_in), batches * batch_size) if batches else len(rows_in)
    hf = base_model(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, stop, batch_size):
            batch = to_batch(rows_in, list(range(start, min(start + batch_size, stop))), device)
            hidden = hf.model(input_ids=batch["input_ids"]).last_hidden_state
            rows, targets = trainable_rows(hidden, batch["labels"])
            if not len(targets):
                continue
            log_p, _, hit = token_stats(rows, targets, hf.get_output_embeddings(), chunk)
            loss_metric.add_batch(predictions=log_p.double().tolist())
            accuracy_metric.add_batch(predictions=hit.to(torch.int8).tolist())
    finally:
        model.train(was_training)
    out = loss_metric.compute()
    out["accuracy"] = accuracy_metric.compute()["accuracy"]
    return out
