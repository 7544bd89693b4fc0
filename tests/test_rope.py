import pytest
import torch
from transformers.models.llama import modeling_llama

from lowmem.memory import LiveStorageTracker
from lowmem.rope import apply_rotary_pos_emb, per_head_rope, rotary


def _inputs(heads=5, t=37, d=16, transposed=True):
    torch.manual_seed(0)
    q = torch.randn(2, t, heads, d).transpose(1, 2) if transposed else torch.randn(2, heads, t, d)
    angles = torch.randn(2, t, d)
    return q.requires_grad_(True), angles.cos(), angles.sin()


@pytest.mark.parametrize("transposed", [True, False])
def test_rotary_is_bit_identical_to_transformers_in_value_gradient_and_layout(transposed):
    q, cos, sin = _inputs(transposed=transposed)
    ref, _ = modeling_llama.apply_rotary_pos_emb(q, q, cos, sin)
    out = rotary(q, cos, sin)
    assert out.stride() == ref.stride()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn_like(ref)
    (ref_grad,) = torch.autograd.grad(ref, q, g)
    (grad,) = torch.autograd.grad(out, q, g)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)


def test_rotary_holds_a_head_of_temporaries_not_three_tensors_like_q():
    q, cos, sin = _inputs(heads=16, t=256, d=32)
    q = q.detach()

    def peak(fn):
        tracker = LiveStorageTracker()
        tracker.register([q, cos, sin])
        with tracker, torch.no_grad():
            fn()
        return tracker.peak - 4 * (q.numel() + cos.numel() + sin.numel())

    size = 4 * q.numel()
    assert peak(lambda: modeling_llama.apply_rotary_pos_emb(q, q[:, :1], cos, sin)) >= 2.5 * size
    assert peak(lambda: rotary(q, cos, sin)) <= size + 3 * size / 16 + 4 * cos.numel()


def test_per_head_rope_swaps_the_function_only_inside_the_block():
    layer = modeling_llama.LlamaDecoderLayer.__new__(modeling_llama.LlamaDecoderLayer)
    stock = modeling_llama.apply_rotary_pos_emb
    with per_head_rope(layer):
        assert modeling_llama.apply_rotary_pos_emb is apply_rotary_pos_emb
    assert modeling_llama.apply_rotary_pos_emb is stock
    with pytest.raises(ValueError, match="bad unsqueeze_dim=2"):
        apply_rotary_pos_emb(*_inputs()[:1] * 2, *_inputs()[1:], unsqueeze_dim=2)


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-qwen", "tiny-mistral"])
def test_best_steps_bit_identically_with_either_rope(model_name):
    from test_tiled_mlp import _loss_and_grads

    from lowmem.config import StackConfig

    assert StackConfig(stack="best").resolved().kernels.rope == "per_head"
    assert StackConfig(stack="logits_mask").resolved().kernels.rope == "stock"
    common = dict(seq_len=40, offload="memory", lora_dropout=0.1)
    ref_loss, ref = _loss_and_grads(
        StackConfig.from_flat("best", rope="stock", **common), model_name
    )
    loss, grads = _loss_and_grads(StackConfig.from_flat("best", **common), model_name)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name], rtol=0, atol=0, msg=name)


def test_fake_rotary_holds_the_storages_of_the_real_one():
    """Under fake tensors (the simulated meter) the per-head loops run one head: the tracker
    sees the same peak, op, tensors and end state, forward and backward."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def traced(q, cos, sin, g):
        tracker = LiveStorageTracker()
        tracker.register([q, cos, sin, g])
        with tracker:
            out = rotary(q, cos, sin)
            (grad,) = torch.autograd.grad(out, q, g)
        return tracker.peak, tracker.peak_op, tracker.peak_tensors, tracker.live, grad.shape

    q, cos, sin = _inputs(heads=6, t=64, d=32)
    g = torch.randn(2, 6, 64, 32)
    real = traced(q, cos, sin, g)
    plain = q.detach()
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in (plain, cos, sin, g)]
        fake = traced(fakes[0].requires_grad_(True), *fakes[1:])
    assert fake == real
    assert real[0] > 4 * (2 * q.numel() + cos.numel() + sin.numel())  # temporaries were seen
