"""The quality protocol's held-out metrics: evaluate's modules against a direct computation."""

import math

import pytest
import torch
from datasets import Dataset

from lowmem.config import StackConfig
from lowmem.heldout import heldout_metrics, load_metric
from lowmem.models import build_model
from lowmem.stack import apply_stack
from lowmem.step import evaluate

IGNORE = -100


def _dataset(vocab: int, rows: int = 5, seq_len: int = 24) -> Dataset:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (rows, seq_len), generator=gen)
    labels = ids.clone()
    labels[torch.rand(rows, seq_len, generator=gen) < 0.4] = IGNORE  # untrainable positions
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def _direct(model, ds: Dataset) -> tuple[float, float, int]:
    """Mean NLL and top-1 accuracy over labels != -100 from the full logits."""
    ids = torch.tensor(ds["input_ids"])
    labels = torch.tensor(ds["labels"])[:, 1:]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].double()
    keep = labels != IGNORE
    log_p = logits.log_softmax(-1)[keep].gather(1, labels[keep][:, None]).squeeze(1)
    hits = logits[keep].argmax(-1) == labels[keep]
    return float(-log_p.mean()), float(hits.double().mean()), int(keep.sum())


@pytest.mark.parametrize("stack", ["lora", "best"])
def test_metrics_through_evaluate_equal_a_direct_computation(stack):
    model = apply_stack(build_model("tiny-llama"), StackConfig(stack))
    ds = _dataset(model.config.vocab_size)
    got = heldout_metrics(model, ds, batch_size=2, chunk=7)
    loss, accuracy, tokens = _direct(model, ds)
    assert got["tokens"] == tokens
    assert got["loss"] == pytest.approx(loss, rel=1e-5)  # FP32 chunked log-sum-exp vs FP64
    assert got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert got["accuracy"] == pytest.approx(accuracy, abs=1 / tokens)  # an FP32 near-tie at most
    # and the training loop's exact evaluation agrees (its loss, its batches)
    assert got["loss"] == pytest.approx(evaluate(model, StackConfig(stack), ds, 2), rel=1e-5)


def test_the_modules_compute_what_they_say():
    loss = load_metric("heldout_loss")
    loss.add_batch(predictions=[-0.5, -1.5])
    loss.add_batch(predictions=[-4.0])
    assert loss.compute() == {"loss": 2.0, "perplexity": math.exp(2.0), "tokens": 3}
    assert load_metric("next_token_accuracy").compute(predictions=[1, 0, 0, 1]) == {
        "accuracy": 0.5,
        "tokens": 4,
    }


def test_an_unknown_metric_is_refused_with_the_allowed_ones():
    with pytest.raises(ValueError, match="bad metric='bleu': must be one of heldout_loss"):
        load_metric("bleu")
