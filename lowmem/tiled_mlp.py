"""Beyond the paper: the MLP run in sequence tiles, so its intermediates never span all of T.

A Llama/Qwen MLP is per token: y = down(silu(gate(x)) * up(x)). Its intermediates are
T x F each (F = 8192 on Llama-3.2 3B: gate, up, their product: 3 x 32 KiB per token), and
during a layer's recompute they are the largest tensors alive: 96 MiB per 1024 tokens. Since
rows are independent, the same result comes from tiles of t tokens:

    forward:  y[i:i+t] = mlp(x[i:i+t]) under no_grad, for each tile; save x only
    backward: per tile, recompute mlp(x[i:i+t]) with grad and back-propagate its slice of g

Peak intermediates: 3 x t x F instead of 3 x T x F (t = 256 on Llama: 24 MiB), at the cost of
one extra MLP forward per tile in backward. `best` sizes t by F (`lowmem.config`,
MLP_TILE_ELEMENTS): the same bytes on every model, and on a narrow MLP one tile where 256 tokens
would expand each quantized MLP weight once per tile for nothing.

Exact up to the order of FP32 sums in the weight and input gradients (tests: rtol 1e-5);
trainable (LoRA) parameters inside the MLP get their gradients summed over tiles.

In decoder layers whose MLP output only feeds the residual add (Llama, Qwen2, Mistral:
`Architecture.mlp_feeds_residual_only` in `lowmem.architectures`) the post-attention
RMSNorm, also per token, goes into the tiles as well: the tiles save the norm's input h, which
the norm saved anyway, and the normalised T x D copy that the MLP would save is never kept
(96 MiB at 8192 tokens on Llama, at the phase where `best` peaks). Two recomputes are
skipped, because their output values are never read, only their gradients:

- inside a checkpointed layer's recompute (`lowmem.checkpoint`) the tiled forward saves h and
  computes nothing: the checkpoint enters the layer's `_Tiles.values_unused()` (found with
  `tiles_of` when it wraps the layer), since backward starts from the layer output's graph
  node, and the MLP output only feeds the residual add, whose backward needs no values;
- in each tile's backward, down_proj's base matmul: its output only feeds the tile output
  (plus a LoRA term), so the tiles run it under `QuantLinear.values_unused()`, which leaves it
  out and keeps its input gradient.

Order: after LoRA and quantization (the tiles hold on to the MLP's trainable parameters and
its quantized down_proj), before checkpointing (which asks the layer for its tiles):
`apply_quantize` refuses a tiled model, `apply_tiled_mlp` a checkpointed one.
`lowmem.fused_norm` leaves the norms the tiles run (`tiled_norms`) alone.

A checkpointed layer may also run the tiles' backward before its attention is recomputed
(`backward_first`, `intercepted`; `lowmem.checkpoint`, "The MLP's backward first").

Inside a checkpointed layer a step then runs the whole MLP forward once (the forward) and gate
and up once more (the tile backward), instead of the whole MLP three times.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from lowmem.architectures import Architecture
from lowmem.models import architecture_of, base_model
from lowmem.quant_linear import QuantLinear
from lowmem.rng import replayed_rng, saved_rng


def apply_tiled_mlp(model: torch.nn.Module, tile: int) -> int:
    """Run every decoder layer's MLP (with its norm, where skippable) in tiles of `tile`
    tokens; returns the number wrapped."""
    if tile <= 0:
        raise ValueError(f"bad mlp_tile={tile}: must be > 0")
    arch = architecture_of(model)
    layers = arch.decoder_layers(base_model(model))
    for layer in layers:
        if hasattr(layer, "lowmem_checkpoint") or tiles_of(layer, arch) is not None:
            what = "checkpointed" if hasattr(layer, "lowmem_checkpoint") else "already tiled"
            raise ValueError(
                f"apply_tiled_mlp on a model whose layers are {what}: tile once, after "
                "apply_quantize and before apply_checkpoint (the order of apply_stack)"
            )
    for layer in layers:
        _Tiles(layer, arch, tile)
    return len(layers)


def tiles_of(layer: torch.nn.Module, arch: Architecture):
    """The `_Tiles` that runs this decoder layer's MLP, or None."""
    tiles = getattr(layer.get_submodule(arch.mlp).forward, "__self__", None)
    return tiles if isinstance(tiles, _Tiles) else None


def is_tiled(model: torch.nn.Module) -> bool:
    arch = architecture_of(model)
    return any(
        tiles_of(layer, arch) is not None for layer in arch.decoder_layers(base_model(model))
    )


def tiled_norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The norms that run inside the MLP tiles (the layer's own call of them is the identity)."""
    arch = architecture_of(model)
    tiles = [tiles_of(layer, arch) for layer in arch.decoder_layers(base_model(model))]
    return [t.norm_module for t in tiles if t is not None and t.norm_module is not None]


class _Tiles:
    """One layer's tiled unit: [post-attention norm +] MLP, installed as the MLP's forward."""

    def __init__(self, layer: torch.nn.Module, arch: Architecture, tile: int) -> None:
        mlp, self.tile = layer.get_submodule(arch.mlp), tile
        self.mlp_forward = mlp.forward
        self.skippable = arch.mlp_feeds_residual_only
        self.norm = self.norm_module = None
        if self.skippable:
            # the norm's own class forward (a fused norm is not needed at tile size); the
            # layer's call of the norm becomes the identity
            self.norm_module = norm = layer.get_submodule(arch.post_attention_norm)
            self.norm = type(norm).forward.__get__(norm)
            norm.forward = _identity
        down = getattr(mlp, "down_proj", None)
        down = getattr(down, "base_layer", down)
        self.down = down if isinstance(down, QuantLinear) else None
        self.rng_module = mlp
        self.modules = [mlp] if self.norm_module is None else [self.norm_module, mlp]
        self.output_unused = False  # set for a recompute whose output nobody reads
        self.intercept = None  # a function of the input the tiles return instead of running
        mlp.forward = self.forward

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """Every trainable parameter the tiles run, as of now: the MLP's and, when the tiles
        run it, the norm's (not a LoRA default, but its gradient must not be lost)."""
        return [p for m in self.modules for p in m.parameters() if p.requires_grad]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.intercept is not None:
            return self.intercept(x)
        return _TiledMLP.apply(x, self, *self.params)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_forward(x if self.norm is None else self.norm(x))

    @contextlib.contextmanager
    def values_unused(self) -> Iterator[None]:
        """Within the block, a skippable tiled MLP returns uninitialised values (its gradients
        stay exact): for a recompute whose output values nobody reads."""
        previous, self.output_unused = self.output_unused, True
        try:
            yield
        finally:
            self.output_unused = previous

    def down_values_unused(self):
        return contextlib.nullcontext() if self.down is None else self.down.values_unused()

    @contextlib.contextmanager
    def intercepted(self, fn) -> Iterator[None]:
        """Within the block the tiles return fn(input) instead of running (a checkpointed
        layer's MLP-first backward, `lowmem.checkpoint`)."""
        previous, self.intercept = self.intercept, fn
        try:
            yield
        finally:
            self.intercept = previous

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """[norm +] MLP of x under no_grad, a tile at a time."""
        out = torch.empty_like(x)
        with torch.no_grad():
            for a in range(0, x.shape[1], self.tile):
                out[:, a : a + self.tile] = self(x[:, a : a + self.tile])
        return out

    def backward_tiles(self, x, grad_out, grad_x, accumulate=False) -> list[torch.Tensor]:
        """Per tile: recompute [norm +] MLP with grad and back-propagate grad_out's slice; its
        input gradient goes into grad_x (added to it with accumulate). grad_x may be x or
        grad_out itself: a tile is read before it is written. Returns the parameters'
        gradients summed over tiles."""
        params = self.params
        grad_params = [torch.zeros_like(p) for p in params]
        with self.down_values_unused():
            for a in range(0, x.shape[1], self.tile):
                xt = x[:, a : a + self.tile].detach().requires_grad_(True)
                with torch.enable_grad():
                    yt = self(xt)
                grads = torch.autograd.grad(yt, [xt, *params], grad_out[:, a : a + self.tile])
                del xt, yt
                if accumulate:
                    grad_x[:, a : a + self.tile] += grads[0]
                else:
                    grad_x[:, a : a + self.tile] = grads[0]
                for acc, g in zip(grad_params, grads[1:], strict=True):
                    acc.add_(g)
        return grad_params

    def backward_first(
        self, h: torch.Tensor, grad_out: torch.Tensor, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The gradient of out = h + mlp(norm(h)) with respect to h, from out's gradient g
        alone: dh = g + J^T g (the MLP output feeds only the residual add, so its gradient is
        g), and the parameters' gradients. dh goes into g's own buffer where autograd handed g
        to this backward alone (`sole_owner`), else over h, which is dead once its tile is
        done, unless h is `keep` (or a view) or cannot hold a gradient of g's kind."""
        if sole_owner(grad_out):
            return grad_out, self.backward_tiles(h, grad_out, grad_out, accumulate=True)
        own = h is not keep and h._base is None and h.is_contiguous()
        own = own and h.dtype == grad_out.dtype and h.shape == grad_out.shape
        grad_h = h if own else torch.empty_like(grad_out)
        grad_params = self.backward_tiles(h, grad_out, grad_h)
        return grad_h.add_(grad_out), grad_params


def sole_owner(grad: torch.Tensor) -> bool:
    """Whether autograd handed `grad` to the running backward and to nothing else, so that
    writing into it changes no tensor anyone else reads. A gradient that one node passes on to
    two (an add's backward does) is held by the second's input buffer too (use count 2); a
    view, or a tensor sharing its storage, has a storage used by more than this tensor and the
    probe's own handle. Where torch offers no use count, the answer is no."""
    use_count = getattr(grad, "_use_count", None)
    storage_use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None or storage_use_count is None:
        return False
    if grad._base is not None or not grad.is_contiguous():
        return False
    storage_uses = storage_use_count(grad.untyped_storage()._cdata)
    return use_count() == 1 and storage_uses == 2  # this tensor + the probe's handle


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tiles, *params):
        ctx.rng = saved_rng(tiles.rng_module, x.device)
        if tiles.skippable and tiles.output_unused:
            out = torch.empty_like(x)
        else:
            out = tiles.values(x)
        ctx.save_for_backward(x)
        ctx.tiles = tiles
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        with replayed_rng(ctx.rng):  # the tiles draw in the order the forward drew
            grad_params = ctx.tiles.backward_tiles(x, grad_out, grad_x)
        return (grad_x, None, *grad_params)
