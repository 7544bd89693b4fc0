"""Technique 1, applied: quantized layers that dequantize on the fly, and the model patcher.

`QuantLinear` / `QuantEmbedding` keep a base weight in the `lowmem.quantize` format and expand
it only when it is used; `apply_quantize` swaps them into a model (the decoder linears, the
embedding and the LM head; a tied head shares the embedding's buffers).

A weight is dequantized whole, to FP32, just before its matmul and freed right after; backward
dequantizes it again for the input gradient (`_DequantLinear`), so no FP32 copy is ever kept
for backward. `best` dequantizes C output rows at a time instead (`chunk`): the transient is
C x D_in x 4 B, 32 MiB for a 1024-row chunk of Llama's down_proj, not 96 MiB. Whole, the
largest transient is the tied 128256 x 3072 LM head: 1.47 GiB of FP32 plus one nibble of
each code (0.18 GiB of uint8) while they are converted. An embedding lookup dequantizes only
the T rows it gathers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowmem.models import base_model
from lowmem.quantize import BACKENDS, QuantizedWeight, _expand, dequantize_rows, quantize


class _DequantLinear(torch.autograd.Function):
    """y = x W^T with W dequantized for the matmul only; backward dequantizes it again.

    chunk > 0 dequantizes `chunk` output rows at a time instead of the whole matrix.
    """

    @staticmethod
    def forward(ctx, x, codes, scales, zeros, bits, group, chunk=0, values=True):
        ctx.save_for_backward(codes, scales, zeros)  # the packed weight: already resident
        ctx.fmt, ctx.chunk = (bits, group), chunk
        if not values:  # the caller reads only the input gradient (lowmem.tiled_mlp)
            return x.new_empty(*x.shape[:-1], codes.shape[0])
        if not chunk:
            return x @ _expand(codes, scales, zeros, bits, group).T
        y = x.new_empty(*x.shape[:-1], codes.shape[0])
        for a in range(0, codes.shape[0], chunk):  # one C x D_in chunk alive at a time
            w = _expand(*_rows(codes, scales, zeros, a, a + chunk), bits, group).T
            torch.matmul(x, w, out=y[..., a : a + chunk])
            del w
        return y

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = input_grad(grad_y, *ctx.saved_tensors, *ctx.fmt, ctx.chunk)
        return grad_x, None, None, None, None, None, None, None


def input_grad(grad_y, codes, scales, zeros, bits: int, group: int, chunk: int = 0):
    """grad_x = grad_y W for a packed W, dequantized whole or `chunk` rows at a time."""
    if not chunk:
        return grad_y @ _expand(codes, scales, zeros, bits, group)
    g = grad_y.reshape(-1, codes.shape[0])  # accumulated in place: no second T x D_in buffer
    grad_x = g.new_zeros(g.shape[0], codes.shape[1] * 8 // bits)
    for a in range(0, codes.shape[0], chunk):
        grad_x.addmm_(
            g[:, a : a + chunk], _expand(*_rows(codes, scales, zeros, a, a + chunk), bits, group)
        )
    return grad_x.reshape(*grad_y.shape[:-1], -1)


def rows_of(qlin: QuantLinear, start: int, stop: int) -> torch.Tensor:
    """FP32 rows start:stop of a quantized linear's weight; nothing else expands."""
    if qlin.stream is not None:
        return qlin.stream.rows(start, stop)
    return _expand(
        *_rows(qlin.codes, qlin.scales, qlin.zeros, start, stop), qlin.bits, qlin.group_size
    )


def _rows(codes, scales, zeros, start, stop):
    return codes[start:stop], scales[start:stop], None if zeros is None else zeros[start:stop]


class QuantLinear(torch.nn.Module):
    """A frozen linear layer stored quantized; drop-in for `nn.Linear` (LoRA wraps it)."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.bits, self.group_size = qw.bits, qw.group_size
        self.chunk = 0  # output rows dequantized at a time; 0 = the whole matrix (the paper)
        self.stream = None  # a lowmem.vocab_stream.VocabStream when the rows live in a store
        self.values_needed = True  # False: forward returns uninitialised values, exact grads
        self.register_buffer("codes", qw.codes)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("zeros", qw.zeros)
        self.register_buffer("bias", None if bias is None else bias.detach())

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, bits=4, group_size=32, symmetric=True):
        return cls(quantize(linear.weight, bits, group_size, symmetric), linear.bias)

    @property
    def qweight(self) -> QuantizedWeight:
        shape = (self.out_features, self.in_features)
        return QuantizedWeight(
            self.codes, self.scales, self.zeros, shape, self.bits, self.group_size
        )

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stream is not None:
            y = self.stream.linear(x)
        else:
            y = _DequantLinear.apply(
                x,
                self.codes,
                self.scales,
                self.zeros,
                self.bits,
                self.group_size,
                self.chunk,
                self.values_needed,
            )
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}"
        )


class QuantEmbedding(torch.nn.Module):
    """A frozen embedding stored quantized; a lookup dequantizes only the rows it gathers."""

    def __init__(self, qw: QuantizedWeight) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qw.shape
        self.linear = QuantLinear(qw)  # shares its buffers with a tied LM head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.linear.stream is not None:
            return self.linear.stream.lookup(ids)
        return dequantize_rows(self.linear.qweight, ids)


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
) -> QuantReport:
    """Quantize every base linear of the decoder layers and the embedding / LM head, in place.

    Works on a plain Hugging Face causal LM or on a peft model: LoRA's `base_layer`s are
    quantized, its adapters stay FP32 and trainable. A tied LM head shares the embedding's
    quantized buffers, so it is stored once. `backend` "bnb-nf4" / "bnb-fp4" quantizes the
    decoder linears with bitsandbytes instead (`lowmem.quantize_bnb`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"bad quant_backend={backend!r}: must be one of {BACKENDS}")
    base = base_model(model)
    head, emb = base.get_output_embeddings(), base.get_input_embeddings()
    tied = head.weight is emb.weight
    replaced = []  # (FP weight, its quantized module)
    for name, module in list(base.named_modules()):
        if isinstance(module, torch.nn.Linear) and module is not head and ".lora_" not in name:
            q = _quantize_linear(module, bits, group_size, symmetric, backend)
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent), child, q)
            replaced.append((module.weight, q))
    q_emb = QuantEmbedding(quantize(emb.weight, bits, group_size, symmetric))
    base.set_input_embeddings(q_emb)
    replaced.append((emb.weight, q_emb.linear))
    if tied:
        base.set_output_embeddings(q_emb.linear)
    else:
        q_head = QuantLinear.from_linear(head, bits, group_size, symmetric)
        base.set_output_embeddings(q_head)
        replaced.append((head.weight, q_head))
    n = sum(w.numel() for w, _ in replaced)
    return QuantReport(n, 4 * n, sum(q.nbytes for _, q in replaced))


def _quantize_linear(linear, bits, group_size, symmetric, backend) -> torch.nn.Module:
    if backend == "lowmem":
        return QuantLinear.from_linear(linear, bits, group_size, symmetric)
    from lowmem.quantize_bnb import BnbLinear4bit

    return BnbLinear4bit(linear, backend)
