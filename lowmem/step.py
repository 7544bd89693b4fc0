"""One training step: which rows, forward + backward over micro-batches; and
the evaluation pass (exact loss, eval mode, no_grad).

Data order: epoch e's order is a permutation of the rows drawn from (seed, e), and micro-batch p
of a run is B consecutive rows of it (the last n mod B rows of each epoch are left out). The
data position p is thus the whole state of the data order: a resumed run needs p, not a
generator's state, and any (seed, p) names the same rows on every machine.

Gradient accumulation: a micro-batch's loss is the mean over its N_i trainable tokens. Scaled by
N_i / N (N = the step's total) before backward, the accumulated gradient is that of the mean
over all N tokens, which is what one batch of grad_accum x B rows gives (equal within FP32
summation order; tests: rtol 1e-5). Dividing by grad_accum instead would weight each token of
a short reply more than one of a long reply.

Memory: `lowmem.meter.StepMeter` watches each step, optimizer included.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from datasets import Dataset

from lowmem.config import StackConfig
from lowmem.loss import check_token_ids, compute_loss
from lowmem.reference import trainable_positions

COLUMNS = ("input_ids", "labels")


class BatchOrder:
    """Micro-batch p of a run: B rows of epoch p // (n // B)'s permutation, drawn from
    (seed, epoch); the last n % B rows of each permutation are left out."""

    def __init__(self, ds: Dataset, batch_size: int, seed: int) -> None:
        self.ds = ds.select_columns(list(COLUMNS)).with_format("torch")
        self.batch_size, self.seed = batch_size, seed
        self.per_epoch = len(ds) // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def rows(self, position: int) -> list[int]:
        epoch, k = divmod(position, self.per_epoch)
        if epoch != self._epoch:
            seed = np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0]
            gen = torch.Generator().manual_seed(int(seed))
            self._epoch, self._perm = epoch, torch.randperm(len(self.ds), generator=gen)
        return self._perm[k * self.batch_size : (k + 1) * self.batch_size].tolist()

    def batch(self, position: int, device: torch.device) -> dict[str, torch.Tensor]:
        return to_batch(self.ds, self.rows(position), device)


def check_dataset(ds: Dataset, vocab_size: int, name: str) -> None:
    """Refuse a dataset without the COLUMNS or with a token id outside the vocabulary."""
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(f"{name} lacks column(s) {', '.join(missing)}; it needs {COLUMNS}")
    if len(ds):
        got = ds.select_columns(list(COLUMNS)).with_format("torch")[:]
        ids, labels = (
            got[c] if isinstance(got[c], torch.Tensor) else torch.cat(list(got[c])) for c in COLUMNS
        )
        check_token_ids(ids, labels, vocab_size, where=name)


def to_batch(ds: Dataset, rows: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    """B x T `input_ids` and `labels` of dataset rows (a dataset in torch format)."""
    got = ds[rows]
    batch = {}
    for column in COLUMNS:
        value = got[column]
        if not isinstance(value, torch.Tensor):  # ragged rows come back as a list
            lengths = sorted({len(r) for r in value})
            raise ValueError(
                f"rows {rows} have {column} of lengths {lengths}: every row must have the "
                "same length (pad with -100 labels)"
            )
        batch[column] = value.to(device=device, dtype=torch.long)
    if batch["input_ids"].shape != batch["labels"].shape:
        raise ValueError(f"rows {rows}: input_ids and labels differ in length")
    return batch


def accumulate(
    model: torch.nn.Module,
    stack: StackConfig,
    batches: list[dict[str, torch.Tensor]],
    mark: Callable[[str], None] = lambda phase: None,
) -> tuple[float, int]:
    """Forward + backward of micro-batches, each loss weighted by its share of the trainable
    tokens, so the gradients add up to one batch's; returns (mean loss, trainable tokens)."""
    counts = [trainable_positions(b["labels"]) for b in batches]
    total, loss_sum = sum(counts), 0.0
    for batch, n in zip(batches, counts, strict=True):
        if n == 0:  # a mean over no tokens is NaN; its share of the gradient is zero
            continue
        mark("forward")
        loss = compute_loss(model, batch, stack)[0]  # the output (logits) is not kept
        mark("backward")
        (loss * (n / total)).backward()
        loss_sum += float(loss.detach()) * n
    return (loss_sum / total if total else float("nan")), total


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, stack: StackConfig, ds: Dataset, batch_size: int, batches: int = 0
) -> float:
    """Exact mean cross-entropy over the trainable tokens of the first `batches` batches."""
    ds = ds.select_columns(list(COLUMNS)).with_format("torch")
    device = next(model.parameters()).device
    stop = min(len(ds), batches * batch_size) if batches else len(ds)
    was_training, loss_sum, total = model.training, 0.0, 0
    model.eval()
    try:
        for start in range(0, stop, batch_size):
            batch = to_batch(ds, list(range(start, min(start + batch_size, stop))), device)
            n = trainable_positions(batch["labels"])
            if n:
                loss_sum += float(compute_loss(model, batch, stack)[0]) * n
                total += n
    finally:
        model.train(was_training)
    return loss_sum / total if total else float("nan")
