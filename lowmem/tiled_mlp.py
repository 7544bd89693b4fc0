"""Beyond the paper: the MLP run in sequence tiles, so its intermediates never span all of T.

A Llama/Qwen MLP is per token: y = down(silu(gate(x)) * up(x)). Its intermediates are
T x F each (F = 8192 on Llama-3.2 3B: gate, up, their product: 3 x 32 KiB per token), and
during a layer's recompute they are the largest tensors alive: 96 MiB per 1024 tokens. Since
rows are independent, the same result comes from tiles of t tokens:

    forward:  y[i:i+t] = mlp(x[i:i+t]) under no_grad, for each tile; save x only
    backward: per tile, recompute mlp(x[i:i+t]) with grad and back-propagate its slice of g

Peak intermediates: 3 x t x F instead of 3 x T x F (t = 256 on Llama: 24 MiB), at the cost of
one extra MLP forward per tile in backward. Exact up to the order of FP32 sums in the weight
and input gradients (tests: rtol 1e-5); trainable (LoRA) parameters inside the MLP get their
gradients summed over tiles.
"""

from __future__ import annotations

import torch

from lowmem.models import base_model
from lowmem.rng import replayed_rng, saved_rng


def apply_tiled_mlp(model: torch.nn.Module, tile: int) -> int:
    """Run every decoder layer's MLP in tiles of `tile` tokens; returns the number wrapped."""
    if tile <= 0:
        raise ValueError(f"bad mlp_tile={tile}: must be > 0")
    base = base_model(model)
    for layer in base.model.layers:
        mlp = layer.mlp
        inner = mlp.forward
        mlp.forward = lambda x, inner=inner, mlp=mlp: _TiledMLP.apply(
            x, inner, tile, *[p for p in mlp.parameters() if p.requires_grad]
        )
    return len(base.model.layers)


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, inner, tile, *params):
        out = torch.empty_like(x)
        ctx.rng = saved_rng(inner.__self__, x.device)  # inner: the MLP's own bound forward
        with torch.no_grad():
            for a in range(0, x.shape[1], tile):
                out[:, a : a + tile] = inner(x[:, a : a + tile])
        ctx.save_for_backward(x)
        ctx.inner, ctx.tile, ctx.n_params = inner, tile, len(params)
        ctx.params = params
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        grad_params = [torch.zeros_like(p) for p in ctx.params]
        with replayed_rng(ctx.rng):  # the tiles draw in the order the forward drew
            for a in range(0, x.shape[1], ctx.tile):
                xt = x[:, a : a + ctx.tile].detach().requires_grad_(True)
                with torch.enable_grad():
                    yt = ctx.inner(xt)
                grads = torch.autograd.grad(yt, [xt, *ctx.params], grad_out[:, a : a + ctx.tile])
                grad_x[:, a : a + ctx.tile] = grads[0]
                for acc, g in zip(grad_params, grads[1:], strict=True):
                    acc.add_(g)
        return (grad_x, None, None, *grad_params)
