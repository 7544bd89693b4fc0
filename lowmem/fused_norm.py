"""Beyond the paper: RMSNorm with a hand-written backward that needs one T x D temporary.

Llama and Qwen normalise each token before attention and before the MLP:

    y = w * (x * r),   r = rsqrt(mean(x^2) + eps)   (x: T x D, r: T x 1, w frozen)

Autograd runs the backward through the decomposed ops (mul, rsqrt, mean, pow) and allocates a
T x D tensor at almost every step: five of them are alive together at the post-attention norm
of the layer being recomputed, which is where `best` peaks at long contexts. With w frozen,
the input gradient has a closed form,

    t = g * w,   grad_x = r * t - x * r^3 * mean(t * x),

computed here in place in one T x D buffer (t becomes grad_x); the per-token dot product is a
batched 1 x D @ D x 1 matmul, so t * x is never materialised. Llama-3.2 3B at 16384 tokens:
one T x D tensor is 192 MiB, so four fewer at the peak is 0.75 GiB. Forward saves x and r, as
autograd does.

Numerics: the forward runs the same ops as the model's own RMSNorm (bit-identical output); the
input gradient is equal within FP32 rounding (a different order of the same sums; tests:
rtol 1e-5). The norm weight must be frozen (LoRA never trains it).
"""

from __future__ import annotations

import torch

from lowmem.models import architecture_of, base_model
from lowmem.tiled_mlp import tiled_norms


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)), over the last dim; frozen weight."""
    if weight.requires_grad:
        raise ValueError("the fused RMSNorm needs a frozen norm weight")
    return _RMSNorm.apply(x, weight, eps)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return weight * (x * r)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, r = ctx.saved_tensors
        t = grad_y * weight
        dot = (t.unsqueeze(-2) @ x.unsqueeze(-1)).squeeze(-1)  # sum(t * x) per token: T x 1
        coef = dot.mul_(r.pow(3)).div_(-x.shape[-1])
        return t.mul_(r).addcmul_(x, coef), None, None


def apply_fused_norm(model: torch.nn.Module) -> int:
    """Swap the backward of every RMSNorm (decoder layers and the final norm); returns the count.

    Norms that a tiled MLP runs (`lowmem.tiled_mlp.tiled_norms`) are left alone: T x D never
    exists there; applied before tiling, the tiles take those norms back (either order works).
    """
    norm_class = architecture_of(model).norm_class
    inside_tiles = {id(m) for m in tiled_norms(model)}
    count = 0
    for module in base_model(model).modules():
        if isinstance(module, norm_class) and id(module) not in inside_tiles:
            module.forward = lambda x, m=module: rms_norm(x, m.weight, m.variance_epsilon)
            count += 1
    return count
