"""Frozen weights: where a base weight's values come from, and y = x W^T over one.

LoRA freezes the base model, so a base weight is only ever *read*, and every reader wants
FP32 rows of it: a matmul (all rows, or C at a time), an embedding lookup (T gathered rows),
the fused loss (C vocabulary rows at a time), a merge (all of them). A `FrozenWeight` answers
that one question whatever the storage:

- `DenseWeight`: an FP32 tensor (a base that was not quantized): rows are views, no copy;
- `PackedWeight`: the `lowmem.quantize` format (INT4/INT8 codes + FP32 scales, zeros): rows
  are dequantized on the spot, C x D_in x 4 B for C rows (32 MiB for 1024 rows of Llama's
  down_proj; the whole tied 128256 x 3072 head is 1.47 GiB);
- `lowmem.quantize_bnb.Bnb4bitWeight`: bitsandbytes NF4/FP4 (dequantized whole);
- `lowmem.vocab_stream.VocabStream`: rows read from an offload store chunk by chunk, never
  resident.

The interface: `shape`, `nbytes` (the values as stored), `rows(start, stop)`, `gather(ids)`,
and, for a weight streamed a layer at a time, `offload()` (hand the device tensors over and
drop them), `load(tensors)` and `release()`. A linear's frozen bias rides along with its
weight, so it streams with it. `StreamedWeights` keeps a group of weights (one decoder
layer's) in one store entry and loads / releases them together (`lowmem.checkpoint`); a
`VocabStream` takes a packed table's tensors once. Only these methods change which tensors a
weight holds (no other module touches its buffers), and a weight read while released says so.

`frozen_matmul` is the one autograd function over a frozen weight: y = x W^T, backward
grad_x = grad_y W. Options: `chunk` > 0 expands C output rows at a time (forward writes each
C-column block of y in place; backward accumulates grad_x with addmm_, so no second T x D_in
buffer), a streamed weight always goes by its store's chunks; `values=False` returns an
uninitialised y (the caller reads only the input gradient, `lowmem.tiled_mlp`); `cached=y`
returns a y computed earlier (a cached activation, `lowmem.checkpoint.CachedLinear`). Backward
reads the tensors the forward saw (saved for backward: already resident, nothing new held), so
no FP32 copy of W is ever kept between forward and backward.
"""

from __future__ import annotations

import abc

import torch

from lowmem.timers import clock


class FrozenWeight(torch.nn.Module, abc.ABC):
    """A frozen D_out x D_in weight (and optional D_out bias); subclasses say where rows come from.

    The device tensors are buffers of this module, so `module.buffers()` counts them.
    """

    parts: tuple[str, ...] = ()  # the buffers that hold the values, in store order
    row_block = 0  # rows come in blocks of this many (a streamed table's chunk); 0 = any

    def __init__(self, shape: tuple[int, int], bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.register_buffer("bias", None if bias is None else bias.detach())
        self._streamed: tuple[str, ...] = ()  # buffers offloaded to a store, when streamed

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """The tensors backing the values, as `rows_from` takes them (saved for backward)."""
        tensors = tuple(self._buffers[p] for p in self.parts)
        if self._streamed and self._buffers[self._streamed[0]] is None:
            raise RuntimeError(
                f"frozen weight of shape {self.shape} is released: it is streamed from an "
                "offload store; load it first (lowmem.checkpoint loads a layer while it runs)"
            )
        return tensors

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """FP32 rows start:stop, (stop - start) x D_in."""
        return self.rows_from(self.tensors(), start, stop)

    @abc.abstractmethod
    def rows_from(self, tensors, start: int, stop: int) -> torch.Tensor:
        """FP32 rows start:stop from `tensors` (what `tensors()` returned)."""

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """FP32 rows `ids` (any shape of indices): ... x D_in (an embedding lookup); here all
        rows expand, a kind that can expand only the gathered ones does so."""
        return self.rows(0, self.shape[0])[ids]

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes of the values as stored."""

    # streaming a layer at a time (StreamedWeights)
    def offload(self) -> dict[str, torch.Tensor]:
        """Hand over the device tensors (values, then bias) and drop them; `load` restores."""
        if self._streamed:
            raise RuntimeError(f"frozen weight of shape {self.shape} is already offloaded")
        out = {p: self._buffers[p] for p in (*self.parts, "bias") if self._buffers[p] is not None}
        self._streamed = tuple(out)
        self.release()
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != set(self._streamed):
            raise ValueError(
                f"cannot load {sorted(tensors)} into a frozen weight that streams "
                f"{sorted(self._streamed)}"
            )
        self._buffers.update(tensors)

    def release(self) -> None:
        if not self._streamed:
            raise RuntimeError(
                f"frozen weight of shape {self.shape} is not streamed: releasing it would lose "
                "it; offload() it into a store first"
            )
        for p in self._streamed:
            self._buffers[p] = None


class DenseWeight(FrozenWeight):
    """An FP32 weight as it is: rows are views of it."""

    parts = ("weight",)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(tuple(weight.shape), bias)
        self.register_buffer("weight", weight.detach())

    def rows_from(self, tensors, start: int, stop: int) -> torch.Tensor:
        return tensors[0][start:stop]

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tensors()[0][ids]

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class PackedWeight(FrozenWeight):
    """A weight in the `lowmem.quantize` format; rows dequantize when read."""

    parts = ("codes", "scales", "zeros")

    def __init__(self, qw, bias: torch.Tensor | None = None) -> None:
        super().__init__(qw.shape, bias)
        self.bits, self.group_size, self.codebook = qw.bits, qw.group_size, qw.codebook
        self.register_buffer("codes", qw.codes)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("zeros", qw.zeros)

    def packed(self, tensors=None):
        """The `lowmem.quantize.QuantizedWeight` of these (or the given) tensors."""
        from lowmem.quantize import QuantizedWeight

        codes, scales, zeros = self.tensors() if tensors is None else tensors
        fmt = (self.bits, self.group_size, self.codebook)
        return QuantizedWeight(codes, scales, zeros, self.shape, *fmt)

    def rows_from(self, tensors, start: int, stop: int) -> torch.Tensor:
        with clock("dequantize"):
            return self.packed(tensors).rows(start, stop)

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        from lowmem.quantize import dequantize_rows

        with clock("dequantize"):
            return dequantize_rows(self.packed(), ids)

    @property
    def nbytes(self) -> int:
        return self.packed().nbytes

    def extra_repr(self) -> str:
        fmt = f"bits={self.bits}, group_size={self.group_size}"
        return f"shape={self.shape}, {fmt}" + (", nf4" if self.codebook == "nf4" else "")


def frozen_weight(module: torch.nn.Module) -> FrozenWeight:
    """The frozen weight a module computes with: its own (`module.frozen`, lowmem's layers), or a
    dense view of a plain layer's `weight` (nn.Linear, nn.Embedding)."""
    frozen = getattr(module, "frozen", None)
    if isinstance(frozen, FrozenWeight):
        return frozen
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return DenseWeight(weight)
    raise TypeError(f"{type(module).__name__} has no frozen weight (no `frozen`, no `weight`)")


class StreamedWeights:
    """A group of frozen weights (one decoder layer's) kept as one store entry between uses.

    Entry keys are "<name>.<buffer>"; `load` reads the entry (kept in the store for the next
    use) and hands each weight its tensors; `release(prefix)` drops those whose name starts
    with prefix (the MLP's, once its backward is done).
    """

    def __init__(self, weights: dict[str, FrozenWeight], store, key: str) -> None:
        self.weights, self.store, self.key = weights, store, key
        entry = {}
        for name, w in weights.items():
            entry.update({f"{name}.{p}": t for p, t in w.offload().items()})
        if entry:
            store.put(key, entry)

    def prefetch(self) -> None:
        if self.weights:
            self.store.prefetch(self.key)

    def load(self) -> None:
        if not self.weights:
            return
        entry = self.store.get(self.key, keep=True)
        parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.weights}
        for key, t in entry.items():
            name, _, p = key.rpartition(".")
            parts[name][p] = t
        for name, w in self.weights.items():
            w.load(parts[name])

    def release(self, prefix: str = "") -> None:
        for name, w in self.weights.items():
            if name.startswith(prefix):
                w.release()


def frozen_matmul(
    x: torch.Tensor,
    weight: FrozenWeight,
    chunk: int = 0,
    values: bool = True,
    cached: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T (no bias) for a frozen W, differentiable in x only; see the module docstring."""
    if chunk < 0:
        raise ValueError(f"bad chunk={chunk}: must be >= 0 (0 = all rows at once)")
    return _FrozenMatmul.apply(x, weight, weight.row_block or chunk, values, cached)


class _FrozenMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, chunk, values, cached):
        ctx.save_for_backward(*weight.tensors())  # already resident: nothing new is held
        ctx.weight, ctx.chunk = weight, chunk
        n = weight.shape[0]
        if cached is not None:
            return cached
        if not values:
            return x.new_empty(*x.shape[:-1], n)
        if not chunk:
            return x @ weight.rows(0, n).T
        y = x.new_empty(*x.shape[:-1], n)
        for a in range(0, n, chunk):  # one C x D_in block of W alive at a time
            w = weight.rows(a, min(a + chunk, n)).T
            torch.matmul(x, w, out=y[..., a : a + chunk])
            del w
        return y

    @staticmethod
    def backward(ctx, grad_y):
        weight, chunk, tensors = ctx.weight, ctx.chunk, ctx.saved_tensors
        n = weight.shape[0]
        if not chunk:
            return grad_y @ weight.rows_from(tensors, 0, n), None, None, None, None
        g = grad_y.reshape(-1, n)  # accumulated in place: no second T x D_in buffer
        grad_x = g.new_zeros(g.shape[0], weight.shape[1])
        for a in range(0, n, chunk):
            grad_x.addmm_(g[:, a : a + chunk], weight.rows_from(tensors, a, min(a + chunk, n)))
        return grad_x.reshape(*grad_y.shape[:-1], -1), None, None, None, None
