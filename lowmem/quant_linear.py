"""Technique 1, applied: quantized layers that dequantize on the fly, and the model patcher.

`QuantLinear` / `QuantEmbedding` keep a base weight in the `lowmem.quantize` format (a
`lowmem.weights.PackedWeight`) and expand it only when it is used; `apply_quantize` swaps them
into a model (the decoder linears, the embedding and the LM head; a tied head shares the
embedding's weight).

A weight is dequantized whole, to FP32, just before its matmul and freed right after; backward
dequantizes it again for the input gradient (`lowmem.weights.frozen_matmul`), so no FP32 copy
is ever kept for backward. `best` dequantizes C output rows at a time instead (`chunk`, given
when the layer is built): the transient is C x D_in x 4 B, 32 MiB for a 1024-row chunk of
Llama's down_proj, not 96 MiB. Whole, the largest transient is the tied 128256 x 3072 LM head:
1.47 GiB of FP32 plus one nibble of each code (0.18 GiB of uint8) while they are converted. An
embedding lookup dequantizes only the T rows it gathers. Where the weight's rows come from can
change once, to a store (`use_weight`, `lowmem.vocab_stream`); the layer computes the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from lowmem.models import base_model
from lowmem.quantize import (
    BACKENDS,
    QuantizedWeight,
    check_scale_dtype,
    quantize,
    with_scale_dtype,
)
from lowmem.weights import FrozenWeight, PackedWeight, frozen_matmul


class QuantLinear(torch.nn.Module):
    """A frozen linear layer stored quantized; drop-in for `nn.Linear` (LoRA wraps it).

    chunk: output rows dequantized at a time; 0 = the whole matrix (the paper).
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None, chunk: int = 0):
        super().__init__()
        if chunk < 0:
            raise ValueError(f"bad dequant chunk={chunk}: must be >= 0 (0 = the whole matrix)")
        self.out_features, self.in_features = qw.shape
        self.bits, self.group_size = qw.bits, qw.group_size
        self.chunk = chunk
        self.frozen: FrozenWeight = PackedWeight(qw, bias)
        self._values_needed = True

    @classmethod
    def from_linear(
        cls, linear: torch.nn.Linear, bits=4, group_size=32, symmetric=True, chunk: int = 0
    ) -> QuantLinear:
        return cls(quantize(linear.weight, bits, group_size, symmetric), linear.bias, chunk)

    @property
    def qweight(self) -> QuantizedWeight:
        if not isinstance(self.frozen, PackedWeight):
            raise ValueError(f"the weight is a {type(self.frozen).__name__}, not resident packed")
        return self.frozen.packed()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.frozen.bias

    @property
    def nbytes(self) -> int:
        return self.frozen.nbytes

    @property
    def values_needed(self) -> bool:
        return self._values_needed

    @contextlib.contextmanager
    def values_unused(self) -> Iterator[None]:
        """Within the block, forward returns uninitialised values; the input gradient stays
        exact (for a caller that reads only gradients, `lowmem.tiled_mlp`)."""
        previous, self._values_needed = self._values_needed, False
        try:
            yield
        finally:
            self._values_needed = previous

    def use_weight(self, weight: FrozenWeight) -> None:
        """Read the rows from `weight` from now on (the same values stored elsewhere)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"a {tuple(weight.shape)} weight cannot replace the "
                f"{(self.out_features, self.in_features)} weight of this layer"
            )
        self.frozen = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = frozen_matmul(x, self.frozen, self.chunk, self._values_needed)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, chunk={self.chunk}"
        )


class QuantEmbedding(torch.nn.Module):
    """A frozen embedding stored quantized; a lookup dequantizes only the rows it gathers."""

    def __init__(self, qw: QuantizedWeight, chunk: int = 0) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qw.shape
        self.linear = QuantLinear(qw, chunk=chunk)  # shares its weight with a tied LM head

    @property
    def frozen(self) -> FrozenWeight:
        return self.linear.frozen

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.linear.frozen.gather(ids)


@dataclass(frozen=True)
class QuantReport:
    """What `apply_quantize` replaced and the bytes it saved."""

    n_weights: int
    fp32_bytes: int
    quantized_bytes: int

    @property
    def saved_bytes(self) -> int:
        return self.fp32_bytes - self.quantized_bytes

    @property
    def bytes_per_weight(self) -> float:
        return self.quantized_bytes / self.n_weights


def apply_quantize(
    model: torch.nn.Module,
    bits: int = 4,
    group_size: int = 32,
    symmetric: bool = True,
    backend: str = "lowmem",
    chunk: int = 0,
    packed: Callable[[str, torch.Tensor], QuantizedWeight] | None = None,
    codebook: str = "int",
    vocab_bits: int = 0,
    chosen: dict[str, QuantizedWeight] | None = None,
    scale_search: bool = False,
    scale_dtype: str = "fp32",
) -> QuantReport:
    """Quantize every base linear of the decoder layers and the embedding / LM head, in place.

    Works on a plain Hugging Face causal LM or on a peft model: LoRA's `base_layer`s are
    quantized, its adapters stay FP32 and trainable. A tied LM head shares the embedding's
    quantized weight, so it is stored once. `backend` "bnb-nf4" / "bnb-fp4" quantizes the
    decoder linears with bitsandbytes instead (`lowmem.quantize_bnb`). `chunk` > 0 dequantizes
    that many output rows at a time in every lowmem layer (`QuantLinear`). `packed(name, w)`
    gives the quantized weight of the parameter `name` (its stock name, without peft's
    `.base_layer`; `w` as the model holds it); the default quantizes `w`. `lowmem.loader`
    passes one that reads and quantizes the weight from its shard, a row block at a time.
    `codebook` "nf4" stores the 4-bit codes as normal floats (`lowmem.quantize`); `vocab_bits`
    (0 = `bits`) is the embedding / LM head's bit width (INT at 8 bits, groups of
    `group_size`); neither applies to a given `packed`. `chosen` {name: weight} overrides the
    decoder linears it names (codes from `lowmem.gptq` or `lowmem.loftq`). `scale_search`: every
    group scale searched (`lowmem.quantize.searched_scales`), not the absmax. `scale_dtype`:
    how every lowmem weight's scales are stored (`lowmem.quantize.with_scale_dtype`).

    Comes before `apply_tiled_mlp` and `apply_checkpoint` (as in `lowmem.stack.apply_stack`):
    they hold on to the layers they find, so a model they changed is refused.
    """
    if backend not in BACKENDS:
        raise ValueError(f"bad quant_backend={backend!r}: must be one of {BACKENDS}")
    check_scale_dtype(scale_dtype)  # before any layer is replaced
    if packed is not None and backend != "lowmem":
        raise ValueError(f"apply_quantize(packed=...) builds lowmem layers, not {backend!r}")
    table = packed
    if packed is None:
        table_bits = vocab_bits or bits

        def packed(name: str, w: torch.Tensor) -> QuantizedWeight:
            return quantize(w, bits, group_size, symmetric, codebook, scale_search)

        def table(name: str, w: torch.Tensor) -> QuantizedWeight:
            book = codebook if table_bits == 4 else "int"  # NF4 is a 4-bit code
            return quantize(w, table_bits, group_size, symmetric, book, scale_search)

    chosen = chosen or {}

    from lowmem.tiled_mlp import is_tiled  # tiled_mlp builds on this module's layers

    base = base_model(model)
    for name, done in (
        ("apply_checkpoint", hasattr(base, "lowmem_checkpointing")),
        ("apply_tiled_mlp", is_tiled(model)),
    ):
        if done:
            raise ValueError(
                f"apply_quantize after {name}: it holds on to the layers it wrapped, which "
                "would keep their FP32 weights; quantize first (the order of apply_stack)"
            )
    head, emb = base.get_output_embeddings(), base.get_input_embeddings()
    tied = head.weight is emb.weight
    names = {id(p): n.replace(".base_layer", "") for n, p in base.named_parameters()}
    replaced = []  # (FP weight, its quantized module)
    for name, module in list(base.named_modules()):
        if isinstance(module, torch.nn.Linear) and module is not head and ".lora_" not in name:
            if backend == "lowmem":
                w = module.weight
                qw = chosen.get(names[id(w)]) or packed(names[id(w)], w)
                q = QuantLinear(with_scale_dtype(qw, scale_dtype), module.bias, chunk)
            else:
                from lowmem.quantize_bnb import BnbLinear4bit

                q = BnbLinear4bit(module, backend)
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent), child, q)
            replaced.append((module.weight, q))
    q_emb = QuantEmbedding(
        with_scale_dtype(table(names[id(emb.weight)], emb.weight), scale_dtype), chunk
    )
    base.set_input_embeddings(q_emb)
    replaced.append((emb.weight, q_emb.linear))
    if tied:
        base.set_output_embeddings(q_emb.linear)
    else:
        q_table = with_scale_dtype(table(names[id(head.weight)], head.weight), scale_dtype)
        q_head = QuantLinear(q_table, head.bias, chunk)
        base.set_output_embeddings(q_head)
        replaced.append((head.weight, q_head))
    n = sum(w.numel() for w, _ in replaced)
    return QuantReport(n, 4 * n, sum(q.nbytes for _, q in replaced))
