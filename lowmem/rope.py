"""Beyond the paper: rotary position embedding a head at a time, with a backward that saves nothing.

Hugging Face applies RoPE to the queries and keys as

    q_rot = q * cos + rotate_half(q) * sin,   rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2])

one whole-tensor op at a time: q * cos, the negated half, the concatenation, its product with
sin and the sum each allocate a B x H x T x d tensor, so that four query-sized tensors (q, two
products, the sum) are alive at once. On Llama-3.2 3B (24 query heads of 128) one is T x 3072
floats: 24 MiB at 2048 tokens, and once `best`'s backward no longer peaks in the MLP
(`lowmem.checkpoint`, the MLP-first backward) the forward's RoPE in the last layers is where
`best` peaks at 2048 tokens. Autograd through those ops also builds its gradient out of
full-size pieces (the halves' `slice_backward` zero-fills a full tensor each).

`rotary(q, cos, sin)` computes the same elements with the same operations, one head at a time,
into one output laid out like q: the temporaries are three T x d per head (1 MiB at 2048).
Its backward, dq = g * cos + rotate_half^T(g * sin) with rotate_half^T(y) = cat(y[..., d/2:],
-y[..., :d/2]), needs only cos and sin, and runs a head at a time as well. Every element is the
same sum of the same two products as Hugging Face's (and its gradient the same two terms,
added in either order: FP32 addition is commutative), so loss and gradients are bit-identical
(tests/test_rope.py).

`per_head_rope(layer)` swaps a decoder layer's module-level `apply_rotary_pos_emb` (the
attention calls it by its global name; Llama, Qwen2 and Mistral share its signature) for the
duration of a block; `apply_per_head_rope(model)` enters it around every decoder layer's
forward (and so around a checkpointed layer's recompute: apply it before `apply_checkpoint`),
when `KernelSettings.rope` is "per_head" (auto: in best). Nothing changes outside those calls.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator

import torch
from torch._subclasses.fake_tensor import is_fake

from lowmem.models import architecture_of, base_model

ROPES = ("stock", "per_head")


def rotary(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """q * cos + rotate_half(q) * sin for q of shape B x H x T x d and cos, sin of B x T x d."""
    return _Rotary.apply(q, cos.unsqueeze(1), sin.unsqueeze(1))


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """Drop-in for transformers' function of the same name (B x H x T x d layout only)."""
    if unsqueeze_dim != 1:
        raise ValueError(f"bad unsqueeze_dim={unsqueeze_dim}: the per-head RoPE takes 1 only")
    return rotary(q, cos, sin), rotary(k, cos, sin)


@contextlib.contextmanager
def per_head_rope(layer: torch.nn.Module) -> Iterator[None]:
    """Within the block, the decoder layer's modeling module applies RoPE a head at a time."""
    module = sys.modules[type(layer).__module__]
    previous = module.apply_rotary_pos_emb
    module.apply_rotary_pos_emb = apply_rotary_pos_emb
    try:
        yield
    finally:
        module.apply_rotary_pos_emb = previous


def apply_per_head_rope(model: torch.nn.Module) -> int:
    """Every decoder layer's forward applies RoPE a head at a time; returns the number wrapped."""
    layers = architecture_of(model).decoder_layers(base_model(model))
    for layer in layers:
        if hasattr(layer, "lowmem_checkpoint") or hasattr(layer, "lowmem_rope"):
            what = "checkpointed" if hasattr(layer, "lowmem_checkpoint") else "already wrapped"
            raise ValueError(
                f"apply_per_head_rope on a model whose layers are {what}: apply it once, "
                "before apply_checkpoint (the order of apply_stack)"
            )
    for layer in layers:
        layer.forward = functools.partial(_forward, layer, layer.forward)
        layer.lowmem_rope = True
    return len(layers)


def _forward(layer, inner, *args, **kwargs):
    with per_head_rope(layer):
        return inner(*args, **kwargs)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_half_t(y: torch.Tensor) -> torch.Tensor:
    """The transpose of rotate_half: the gradient of its input from its output's gradient."""
    half = y.shape[-1] // 2
    return torch.cat((y[..., half:], -y[..., :half]), dim=-1)


def _heads(x: torch.Tensor) -> int:
    """Heads the loops below run: all of them, or under the simulated meter (fake tensors, no
    values) the first, whose temporaries every head allocates and frees alike: the tracker
    sees the same peak, op and tensors with 1/H of the dispatches (tests/test_rope.py)."""
    return 1 if is_fake(x) else x.shape[1]


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, cos, sin):
        out = torch.empty_like(q)  # q's layout (transformers' q is a transposed view)
        for h in range(_heads(q)):
            qh = q[:, h : h + 1]
            torch.add(qh * cos, _rotate_half(qh) * sin, out=out[:, h : h + 1])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        dq = torch.empty_like(grad)
        for h in range(_heads(grad)):
            gh = grad[:, h : h + 1]
            torch.add(gh * cos, _rotate_half_t(gh * sin), out=dq[:, h : h + 1])
        return dq, None, None
