"""Technique 1: base-model quantization; this module is the storage format.

LoRA freezes the base model, so its weights only have to be *read* during training. They can be
stored in 4 (or 8) bits and expanded back to FP32 just before each use:

    W ~= dequantize(quantize(W)),  y = x W^T  becomes  y = x dequantize(Q)^T.

Format (defaults from SPEC §2): round-to-nearest, symmetric INT4, one FP32 scale per group of 32
consecutive weights along the input dimension, two 4-bit codes packed per byte. Per weight that
is 4/8 + 32/(8 x 32) = 0.5 + 0.125 = 0.625 bytes instead of 4, the figure Table 1 implies.
Options: INT8, group size 16/64/128 or one group per output row (`group_size=0`), asymmetric
(an FP32 zero point per group as well), bitsandbytes NF4/FP4 (`lowmem.quantize_bnb`), and
`codebook="nf4"`: the same packed 4-bit codes and FP32 group scale, but a code stands for one of
the 16 normal-float values of QLoRA (Dettmers et al. 2023, arXiv 2305.14314; `NF4`, the
quantiles of N(0, 1) scaled to [-1, 1], exact zero included) times the group's absmax, not for
an evenly spaced level. The codebook is 16 FP32 values (64 B) for the whole model, a constant of
this module: it is not stored per weight, so NF4 is 0.625 B per weight too. Weights are near
normal, so levels dense near zero waste fewer codes than INT4's even steps (SmolLM2-135M:
experiments/quant_options). Which codes a weight gets (round-to-nearest, or error-compensating
`lowmem.gptq`) does not change the format.
The layers that store weights this way and dequantize them per matmul are `lowmem.quant_linear`.

Memory arithmetic, Llama-3.2 3B: 3.21e9 weights x 0.625 B = 2.01e9 B = 1.87 GiB instead of
11.97 GiB.

Numerics: symmetric INT4 maps each group to {-8..7} x absmax/7; the round-trip error is at most
half a step, absmax/14 per weight (tests hold it to a budget per bit width and group size). NF4
rounds w / absmax to the nearest codebook value: at most half the widest gap, (1 - 0.6962) / 2
x absmax = 0.152 x absmax per weight (the gap between -1 and the next value; INT4: 0.071).

Scales in FP16 (`with_scale_dtype`, `quant_scale_dtype="fp16"`): half the bytes per group, so
groups of 16 cost what groups of 32 cost in FP32: 4/8 + 16/(8 x 16) = 0.625 B per weight, with
half as many weights sharing a scale. The codes are chosen with the FP32 scales, which are then
rounded to FP16 (10-bit mantissa): each weight moves by at most 2^-11 of its value, under 1% of
an INT4 step (tests hold it to that). Expanded in FP32 as before.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import is_fake

BITS = (4, 8)
GROUP_SIZES = (0, 16, 32, 64, 128)  # 0 = one group per output row ("per channel")
SCALE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}  # how scales (and zeros) are stored
BACKENDS = ("lowmem", "bnb-nf4", "bnb-fp4")
CODEBOOKS = ("int", "nf4")  # what a 4-bit code stands for: an even level, or a normal float
# QLoRA's NF4 values (bitsandbytes' table; `lowmem.reference.nf4_codebook` derives them)
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
INT4_LEVELS = tuple(float(code - 8) for code in range(16))  # symmetric INT4: level = code - 8


@dataclass
class QuantizedWeight:
    """A packed weight: `codes` (uint8), `scales` (and `zeros`) per (row, group), FP32 or FP16."""

    codes: torch.Tensor  # D_out x D_in/2 for INT4 (two codes per byte), D_out x D_in for INT8
    scales: torch.Tensor  # D_out x G
    zeros: torch.Tensor | None  # D_out x G, asymmetric only
    shape: tuple[int, int]
    bits: int
    group_size: int  # resolved: D_in when one group per row
    codebook: str = "int"  # CODEBOOKS; the NF4 table is a module constant, not stored here

    @property
    def nbytes(self) -> int:
        tensors = (self.codes, self.scales) + ((self.zeros,) if self.zeros is not None else ())
        return sum(t.numel() * t.element_size() for t in tensors)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """FP32 rows start:stop, (stop - start) x D_in; only those rows expand."""
        if (start, stop) == (0, self.shape[0]):
            return dequantize(self)
        zeros = None if self.zeros is None else self.zeros[start:stop]
        return _expand(
            self.codes[start:stop],
            self.scales[start:stop],
            zeros,
            self.bits,
            self.group_size,
            self.codebook,
        )


def check_format(
    shape: tuple[int, ...], bits: int, group_size: int, codebook: str = "int", symmetric=True
) -> int:
    """Validate a weight shape + format; return the resolved group size."""
    if codebook not in CODEBOOKS:
        raise ValueError(f"bad codebook={codebook!r}: must be one of {CODEBOOKS}")
    if codebook == "nf4" and (bits != 4 or not symmetric):
        raise ValueError(
            f"codebook='nf4' is a symmetric 4-bit code; got bits={bits}, symmetric={symmetric}"
        )
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
    weight: torch.Tensor,
    bits: int = 4,
    group_size: int = 32,
    symmetric: bool = True,
    codebook: str = "int",
    scale_search: bool = False,
) -> QuantizedWeight:
    """Round-to-nearest quantization of a 2-D FP weight, per group along D_in; `scale_search`
    (symmetric only): each group's scale from `searched_scales` instead of its absmax."""
    group = check_format(tuple(weight.shape), bits, group_size, codebook, symmetric)
    if scale_search and not symmetric:
        raise ValueError("scale_search=True needs a symmetric format (no zero point)")
    d_out, d_in = weight.shape
    w = weight.detach().float().reshape(d_out, d_in // group, group)
    levels = 2**bits - 1
    zeros = None
    if symmetric:
        scales = (searched_scales if scale_search else absmax_scales)(w, bits, codebook)
    if codebook == "nf4":
        q = nf4_codes((w / scales[..., None]).clamp_(-1, 1)).reshape(d_out, d_in)
        q = q[:, 0::2] | (q[:, 1::2] << 4)
        return QuantizedWeight(q.contiguous(), scales, None, (d_out, d_in), bits, group, "nf4")
    if symmetric:
        offset = 2 ** (bits - 1)  # codes -8..7 for INT4: zero sits at code 8
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


# candidate scales of `searched_scales`: the absmax scale times 1, 0.995, ..., 0.75
SCALE_SHRINK = tuple(1.0 - 0.005 * k for k in range(51))
SEARCH_ELEMENTS = 2**20  # weights searched at a time: the transients stay a few MiB


def absmax_scales(w: torch.Tensor, bits: int, codebook: str = "int") -> torch.Tensor:
    """Symmetric scale per group of w (... x group): the absmax maps to the largest level."""
    absmax = w.abs().amax(dim=-1)
    scales = absmax if codebook == "nf4" else absmax / (2 ** (bits - 1) - 1)
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def searched_scales(
    w: torch.Tensor, bits: int, codebook: str = "int", importance: torch.Tensor | None = None
) -> torch.Tensor:
    """Per group of w (rows x groups x group), the symmetric scale among absmax scale x
    SCALE_SHRINK whose round-to-nearest round trip has the least squared error: a smaller scale
    clips the group's largest weight to gain resolution for the rest. A grid search over shrink
    factors of the absmax, as the GPTQ reference code's quantizer does with `mse=True` (Frantar,
    Ashkboos, Hoefler, Alistarh 2022, arXiv 2210.17323; its repository's `quant.py`) and as AWQ
    clips weights (Lin et al. 2023, arXiv 2306.00978); here on the weight's own error. Ties keep
    the larger scale, so the absmax scale stays wherever nothing beats it. `importance` (group,
    one weight per column, shared by every group of w): the squared errors of each column are
    weighted by it (`lowmem.gptq`: diag(X^T X), the energy of the input the column multiplies)."""
    flat = w.reshape(-1, w.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=w.device)
    step = max(1, SEARCH_ELEMENTS // flat.shape[1])
    for a in range(0, flat.shape[0], step):
        block = flat[a : a + step]
        base = absmax_scales(block, bits, codebook)
        best, best_err = base, None
        for f in SCALE_SHRINK:
            s = base * f
            err = (round_trip_values(block, s, bits, codebook) - block).square_()
            err = (err if importance is None else err.mul_(importance)).sum(dim=-1)
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best = torch.where(better, s, best)
            best_err = torch.where(better, err, best_err)
        out[a : a + step] = best
    return out.reshape(w.shape[:-1])


def round_trip_values(w: torch.Tensor, scales: torch.Tensor, bits: int, codebook: str):
    """The symmetric round-to-nearest round trip of w (... x group) under per-group `scales`."""
    if codebook == "nf4":
        table = torch.tensor(NF4, device=w.device)
        return table[nf4_codes((w / scales[..., None]).clamp(-1, 1)).long()] * scales[..., None]
    half = 2 ** (bits - 1)
    return torch.clamp(torch.round(w / scales[..., None]), -half, half - 1) * scales[..., None]


def nf4_codes(x: torch.Tensor) -> torch.Tensor:
    """uint8 index of the NF4 value nearest to each element of x (x in [-1, 1])."""
    table = torch.tensor(NF4, device=x.device)
    return torch.bucketize(x, (table[1:] + table[:-1]) / 2).to(torch.uint8)


def check_scale_dtype(scale_dtype: str) -> torch.dtype:
    """The torch dtype of a SCALE_DTYPES name; any other name is refused."""
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"bad scale_dtype={scale_dtype!r}: must be one of {tuple(SCALE_DTYPES)}")
    return SCALE_DTYPES[scale_dtype]


def with_scale_dtype(qw: QuantizedWeight, scale_dtype: str) -> QuantizedWeight:
    """`qw` with its scales (and zero points) stored as `scale_dtype` (SCALE_DTYPES), its codes
    as they are; a scale FP16 cannot hold (above 65504) is refused, not stored as inf."""
    dtype = check_scale_dtype(scale_dtype)
    if qw.scales.dtype == dtype:
        return qw
    scales = qw.scales.to(dtype)
    if not is_fake(scales) and not bool(torch.isfinite(scales).all()):
        big = float(qw.scales.abs().max())
        raise ValueError(
            f"scale_dtype={scale_dtype!r} cannot hold a group scale of {big:.4g} (a weight of "
            f"shape {qw.shape}); use scale_dtype='fp32'"
        )
    zeros = None if qw.zeros is None else qw.zeros.to(dtype)  # integers 0..255: exact
    return dataclasses.replace(qw, scales=scales, zeros=zeros)


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """The whole FP32 weight, D_out x D_in."""
    return _expand(qw.codes, qw.scales, qw.zeros, qw.bits, qw.group_size, qw.codebook)


def dequantize_rows(qw: QuantizedWeight, rows: torch.Tensor) -> torch.Tensor:
    """FP32 rows `rows` (any shape of indices) of the weight: ... x D_in; nothing else expands."""
    flat = rows.reshape(-1)
    zeros = None if qw.zeros is None else qw.zeros[flat]
    out = _expand(qw.codes[flat], qw.scales[flat], zeros, qw.bits, qw.group_size, qw.codebook)
    return out.reshape(*rows.shape, qw.shape[1])


def _expand(codes, scales, zeros, bits: int, group: int, codebook: str = "int") -> torch.Tensor:
    if is_fake(codes) and bits == 4 and zeros is None:
        w = _fake_expand_4bit(codes, codebook)
        _fp32(scales)  # what the scale multiply allocates (nothing for FP32 scales)
        return w
    with torch.profiler.record_function("lowmem.dequantize"):  # attributes time in profiles
        if codebook == "nf4":
            return _expand_nf4(codes, scales, group)
        return _expand_codes(codes, scales, zeros, bits, group)


def _fake_expand_4bit(codes: torch.Tensor, codebook: str) -> torch.Tensor:
    """Under the simulated meter (fake tensors, no values), the storages a symmetric 4-bit
    expansion allocates, in its order, with 4 dispatches instead of ~20: the FP32 output, then
    the copy of the codes' last piece (int16 levels for INT4, the int32 index for NF4), freed at
    once. Everything else works inside the output (tests/test_quantize.py: the same peak, op,
    tensors and end state as the real expansion under the tracker)."""
    n_rows, n_bytes = codes.shape
    w = torch.empty(n_rows, 2 * n_bytes, dtype=torch.float32, device=codes.device)
    n = codes.numel()
    last = _tail_bounds(n)[-1]
    w.view(-1)[n + last :].view(torch.int16 if codebook == "int" else torch.int32).clone()
    return w


# The integer work of a 4-bit expansion lives in its own output's second half (n code bytes
# become 2n FP32 values, 8n bytes; one int32 per byte fills the last 4n): each step converts
# at most half of the codes left, so its writes (8 bytes a code, from the front) end where the
# unread tail (4 bytes a code, from byte 4n + 4 done) begins and never overlap it. The codes
# left after the halving, at most 1/_TAIL_LAST of them (one at least), are converted from a
# copy: the only transient, n / 16 bytes at most. Through a separate int32 index, a quarter of
# the codes at a time (up to session 19), the transient was n bytes (experiments/LOG.md).
_TAIL_LAST = 64


def _tail_bounds(n: int) -> list[int]:
    """[0, b1, ..., last]: each step converts codes b_i..b_i+1 straight from the tail; the codes
    from `last` on (at most n // _TAIL_LAST, one at least) go through a copy."""
    bounds = [0]
    while n - bounds[-1] > max(1, n // _TAIL_LAST):
        bounds.append(bounds[-1] + (n - bounds[-1]) // 2)
    return bounds


def _pair_table(values: tuple[float, ...]) -> torch.Tensor:
    """256 int64 entries, one per code byte: the FP32 values of its low and its high nibble side
    by side, the 8 bytes read as one integer, so a gather moves them as bits (no float op)."""
    table, byte = torch.tensor(values, dtype=torch.float32), torch.arange(256)
    return torch.stack([table[byte & 0x0F], table[byte >> 4]], dim=1).view(torch.int64)[:, 0]


_NF4_PAIRS = {torch.device("cpu"): _pair_table(NF4)}  # built once per device, outside any step


def _expand_nf4(codes, scales, group: int) -> torch.Tensor:
    """Each packed byte picks its two NF4 values at once from the 256-entry pair table, written
    straight into the FP32 output from an int32 index held in the output's own tail
    (_tail_bounds): the transient is at most n / 16 bytes for n code bytes (a 256 x 2 FP32 table
    gathered row by row, rebuilt each call, was 3x slower; experiments/LOG.md, session 16)."""
    n_rows, n_bytes = codes.shape
    w = torch.empty(n_rows, n_bytes * 2, dtype=torch.float32, device=codes.device)
    n, flat = codes.numel(), w.view(-1)
    out, index = flat.view(torch.int64), flat[n:].view(torch.int32)
    index.copy_(codes.reshape(-1))
    pairs = _NF4_PAIRS.get(codes.device)
    if pairs is None:
        pairs = _NF4_PAIRS[codes.device] = _NF4_PAIRS[torch.device("cpu")].to(codes.device)
    bounds = _tail_bounds(n)
    for a, b in itertools.pairwise(bounds):
        torch.index_select(pairs, 0, index[a:b], out=out[a:b])
    torch.index_select(pairs, 0, index[bounds[-1] :].clone(), out=out[bounds[-1] :])
    w.view(n_rows, -1, group).mul_(_fp32(scales)[..., None])
    return w


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """FP16 scales or zeros as the FP32 copy that an in-place multiply of FP32 weights makes of
    them anyway (inside the kernel, where the tracker cannot see it: experiments/LOG.md, session
    20); FP32 ones as they are."""
    return t.to(torch.float32)


def _expand_codes(codes, scales, zeros, bits: int, group: int) -> torch.Tensor:
    n_rows = codes.shape[0]
    if bits == 4 and zeros is None:
        w = _expand_int4_symmetric(codes)
        w.view(n_rows, -1, group).mul_(_fp32(scales)[..., None])
        return w
    if bits == 4:  # each nibble written straight into the FP32 buffer (one half-size temporary)
        w = torch.empty(*codes.shape, 2, dtype=torch.float32, device=codes.device)
        w[..., 0] = codes & 0x0F
        w[..., 1] = codes >> 4
    else:
        w = codes.to(torch.float32)
    w = w.reshape(n_rows, -1, group)  # the one FP32 copy; edited in place
    w.sub_(_fp32(zeros)[..., None] if zeros is not None else 2 ** (bits - 1))
    w.mul_(_fp32(scales)[..., None])
    return w.reshape(n_rows, -1)


# A code byte c = lo + 16 hi (after c ^ 0x88 each nibble is its level + 8, i.e. its sign bit
# flipped) times 2**12 + 2**24, in int32: one copy of the byte at bits 12-19, one at 24-31, so
# lo ^ 8 is the top nibble of the low int16 half and hi ^ 8 the top nibble of the high one; an
# arithmetic shift of each half by 12 leaves lo - 8 and hi - 8, little-endian in code order.
_SPREAD = 2**12 + 2**24


def _expand_int4_symmetric(codes: torch.Tensor) -> torch.Tensor:
    """The levels (-8..7, FP32, code order) of packed symmetric INT4 codes, n_rows x 2 n_bytes.

    Integer work on all the code bytes at once in the output's tail (_tail_bounds), then
    contiguous conversions forward: about twice as fast on CPU as writing each nibble into every
    other FP32 element (a strided copy), with a transient of at most n / 16 bytes."""
    n_rows, n_bytes = codes.shape
    w = torch.empty(n_rows, 2 * n_bytes, dtype=torch.float32, device=codes.device)
    n, out = codes.numel(), w.view(-1)
    spread = out[n:].view(torch.int32)
    spread.copy_(codes.reshape(-1))
    spread.bitwise_xor_(0x88).mul_(_SPREAD)
    levels = spread.view(torch.int16).bitwise_right_shift_(12)  # 2n levels, code order
    bounds = _tail_bounds(n)
    for a, b in itertools.pairwise(bounds):
        out[2 * a : 2 * b].copy_(levels[2 * a : 2 * b])
    out[2 * bounds[-1] :].copy_(levels[2 * bounds[-1] :].clone())
    return w
