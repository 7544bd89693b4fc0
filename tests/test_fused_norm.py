import pytest
import torch

from lowmem.fused_norm import apply_fused_norm, rms_norm
from lowmem.memory import LiveStorageTracker
from lowmem.models import build_model


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-qwen", "tiny-mistral"])
def test_fused_norm_equals_the_model_norm(model_name):
    torch.manual_seed(0)
    norm = build_model(model_name).model.layers[0].input_layernorm.requires_grad_(False)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 37, norm.weight.shape[0], requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn_like(x)
    y = norm(x)
    y2 = rms_norm(x2, norm.weight, norm.variance_epsilon)
    assert torch.equal(y, y2)  # the same forward ops
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)


def test_fused_norm_backward_holds_one_t_by_d_temporary():
    model = build_model("tiny-llama").requires_grad_(False)
    norm = model.model.layers[0].input_layernorm
    x = torch.randn(1, 512, norm.weight.shape[0], requires_grad=True)
    g = torch.randn_like(x)

    def backward_peak(module):
        y = module(x)
        tracker = LiveStorageTracker()
        tracker.register([x, g, y])
        base = tracker.live
        with tracker:
            y.backward(g)
        x.grad = None
        return tracker.peak - base

    plain = backward_peak(norm)
    assert apply_fused_norm(model) == 2 * model.config.num_hidden_layers + 1  # and the final norm
    fused = backward_peak(norm)
    one = x.numel() * 4
    assert fused < 1.1 * one < 3 * one < plain  # grad_x only, not the decomposed chain


def test_a_trainable_norm_weight_is_refused():
    with pytest.raises(ValueError, match="frozen norm weight"):
        rms_norm(torch.randn(2, 4), torch.ones(4, requires_grad=True), 1e-6)


@pytest.mark.parametrize("fused_first", [True, False])
def test_norms_inside_mlp_tiles_stay_unfused_in_either_order(fused_first):
    from lowmem.tiled_mlp import apply_tiled_mlp

    torch.manual_seed(0)
    ref = build_model("tiny-llama").requires_grad_(False)
    model = build_model("tiny-llama").requires_grad_(False)
    model.load_state_dict(ref.state_dict())
    first, second = (apply_fused_norm, None), (None, apply_tiled_mlp)
    for fused, tiled in (first, second) if fused_first else (second, first):
        n = fused(model) if fused else tiled(model, 16)
        if fused and not fused_first:
            assert n == model.config.num_hidden_layers + 1  # the tiled norms are left alone
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    assert torch.equal(model(ids).logits, ref(ids).logits)  # each norm applied once
