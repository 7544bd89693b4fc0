import pytest
import torch
import torch.nn.functional as F

from lowmem import reference
from lowmem.logits_mask import trainable_index, trainable_rows


@pytest.mark.parametrize(
    "shape, masked", [((1, 7), [0, 1, 2]), ((3, 5), []), ((2, 9), "all"), ((2, 6), [0, 2, 5])]
)
def test_masked_head_equals_full_cross_entropy_with_ignore_index(shape, masked):
    torch.manual_seed(0)
    b, t = shape
    head = torch.nn.Linear(16, 11, bias=False)
    hidden = torch.randn(b, t, 16, requires_grad=True)
    labels = torch.randint(0, 11, shape)
    labels[:, masked if masked != "all" else slice(None)] = -100
    h1 = hidden.detach().clone().requires_grad_(True)
    ref = reference.causal_lm_loss(head(h1), labels)
    rows, targets = trainable_rows(hidden, labels)
    assert rows.shape[0] == reference.trainable_positions(labels)
    loss = F.cross_entropy(head(rows), targets)
    if masked == "all":  # nothing to train on: both are NaN, as torch's mean over nothing
        assert torch.isnan(loss) and torch.isnan(ref)
        return
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(loss, [hidden, head.weight])
    ref_grads = torch.autograd.grad(ref, [h1, head.weight])
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)


def test_benchmark_index_equals_the_one_found_from_labels():
    from lowmem.config import StackConfig
    from lowmem.stack import benchmark_batch

    batch = benchmark_batch(StackConfig(stack="logits_mask", seq_len=50, batch_size=2), 100)
    assert torch.equal(batch["trainable_index"], trainable_index(batch["labels"]))
