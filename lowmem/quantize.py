"""Technique 1: base-model quantization with on-the-fly dequantization.

LoRA freezes the base model, so its weights only have to be *read* during training. They can be
stored in 4 (or 8) bits and expanded back to FP32 just before each use:

    W ~= dequantize(quantize(W)),  y = x W^T  becomes  y = x dequantize(Q)^T.

Format (defaults from SPEC §2): round-to-nearest, symmetric INT4, one FP32 scale per group of 32
consecutive weights along the input dimension, two 4-bit codes packed per byte. Per weight that
is 4/8 + 32/(8 x 32) = 0.5 + 0.125 = 0.625 bytes instead of 4, the figure Table 1 implies.
Options: INT8, group size 64/128 or one group per output row (`group_size=0`), asymmetric
(an FP32 zero point per group as well), and bitsandbytes NF4/FP4 (`lowmem.quantize_bnb`).

Memory arithmetic, Llama-3.2 3B: 3.21e9 weights x 0.625 B = 2.01e9 B = 1.87 GiB instead of
11.97 GiB. A weight is dequantized whole, to FP32, just before its matmul and freed right
after; backward dequantizes it again for the input gradient (`_DequantLinear`), so no FP32 copy
is ever kept for backward. `best` dequantizes C output rows at a time instead (`chunk`): the
transient is C x D_in x 4 B, 32 MiB for a 1024-row chunk of Llama's down_proj, not 96 MiB.
Whole, the largest transient is the tied 128256 x 3072 LM head: 1.47 GiB of FP32 plus its
0.39 GiB of unpacked codes while they are converted.

Numerics: symmetric INT4 maps each group to {-8..7} x absmax/7; the round-trip error is at most
half a step, absmax/14 per weight (tests hold it to a budget per bit width and group size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowmem.models import base_model

BITS = (4, 8)
GROUP_SIZES = (0, 32, 64, 128)  # 0 = one group per output row ("per channel")
BACKENDS = ("lowmem", "bnb-nf4", "bnb-fp4")


@dataclass
class QuantizedWeight:
    """A packed weight: `codes` (uint8), FP32 `scales` (and `zeros`) per (row, group)."""

    codes: torch.Tensor  # D_out x D_in/2 for INT4 (two codes per byte), D_out x D_in for INT8
    scales: torch.Tensor  # D_out x G
    zeros: torch.Tensor | None  # D_out x G, asymmetric only
    shape: tuple[int, int]
    bits: int
    group_size: int  # resolved: D_in when one group per row

    @property
    def nbytes(self) -> int:
        tensors = (self.codes, self.scales) + ((self.zeros,) if self.zeros is not None else ())
        return sum(t.numel() * t.element_size() for t in tensors)


def check_format(shape: tuple[int, ...], bits: int, group_size: int) -> int:
    """Validate a weight shape + format; return the resolved group size."""
    if len(shape) != 2:
        raise ValueError(f"can only quantize 2-D weights (D_out x D_in); got shape {tuple(shape)}")
    if bits not in BITS:
        raise ValueError(f"bad bits={bits!r}: must be one of {BITS}")
    if group_size not in GROUP_SIZES:
        raise ValueError(
            f"bad group_size={group_size!r}: must be one of {GROUP_SIZES} (0 = per row)"
        )
    d_in = shape[1]
    group = group_size or d_in
    if d_in % group:
        raise ValueError(
            f"group_size={group_size} does not divide D_in={d_in} of a {tuple(shape)} "
            "weight; use a group size that divides it, or 0 for one group per row"
        )
    if bits == 4 and d_in % 2:
        raise ValueError(f"INT4 packs two codes per byte, so D_in must be even; got {d_in}")
    return group


def quantize(
    weight: torch.Tensor, bits: int = 4, group_size: int = 32, symmetric: bool = True
) -> QuantizedWeight:
    """Round-to-nearest quantization of a 2-D FP weight, per group along D_in."""
    group = check_format(tuple(weight.shape), bits, group_size)
    d_out, d_in = weight.shape
    w = weight.detach().float().reshape(d_out, d_in // group, group)
    levels = 2**bits - 1
    if symmetric:
        qmax = 2 ** (bits - 1) - 1  # 7: codes -8..7, zero sits at code 8
        scales = w.abs().amax(dim=-1) / qmax
        zeros = None
        offset = 2 ** (bits - 1)
    else:
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scales = (hi - lo) / levels
        zeros = torch.round(-lo / torch.where(scales > 0, scales, 1.0))
        offset = zeros[..., None]
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # all-zero group
    q = torch.clamp(torch.round(w / scales[..., None]) + offset, 0, levels).to(torch.uint8)
    q = q.reshape(d_out, d_in)
    if bits == 4:
        q = q[:, 0::2] | (q[:, 1::2] << 4)  # even columns in the low nibble
    return QuantizedWeight(q.contiguous(), scales, zeros, (d_out, d_in), bits, group)


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """The whole FP32 weight, D_out x D_in."""
    return _expand(qw.codes, qw.scales, qw.zeros, qw.bits, qw.group_size)


def dequantize_rows(qw: QuantizedWeight, rows: torch.Tensor) -> torch.Tensor:
    """FP32 rows `rows` (any shape of indices) of the weight: ... x D_in; nothing else expands."""
    flat = rows.reshape(-1)
    zeros = None if qw.zeros is None else qw.zeros[flat]
    out = _expand(qw.codes[flat], qw.scales[flat], zeros, qw.bits, qw.group_size)
    return out.reshape(*rows.shape, qw.shape[1])


def _expand(codes, scales, zeros, bits: int, group: int) -> torch.Tensor:
    with torch.profiler.record_function("lowmem.dequantize"):  # attributes time in profiles
        return _expand_codes(codes, scales, zeros, bits, group)


def _expand_codes(codes, scales, zeros, bits: int, group: int) -> torch.Tensor:
    n_rows = codes.shape[0]
    if bits == 4:  # unpacked into one uint8 buffer (no halves and stack: 3.4x faster here)
        pairs = codes.new_empty(*codes.shape, 2)
        torch.bitwise_and(codes, 0x0F, out=pairs[..., 0])
        torch.bitwise_right_shift(codes, 4, out=pairs[..., 1])
        codes = pairs.reshape(n_rows, -1)
    w = codes.to(torch.float32).reshape(n_rows, -1, group)  # the one FP32 copy; edited in place
    w.sub_(zeros[..., None] if zeros is not None else 2 ** (bits - 1))
    w.mul_(scales[..., None])
    return w.reshape(n_rows, -1)


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
