"""Plain, obviously correct versions of what lowmem computes; tests compare against these.

Nothing here is optimized, and nothing here should be: each function is the textbook
computation, written for a reader, so that an optimized technique can be checked against it
(STYLE: "the naive reference is selectable by name").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over trainable positions.

    logits: B x T x V; labels: B x T, IGNORE_INDEX where a position is not trained. Position t
    predicts label t + 1 (the shift every causal LM applies).
    """
    shifted_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    shifted_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T + b + scale * (x A^T) B^T, with A: r x D_in and B: D_out x r."""
    y = x @ weight.T + scale * (x @ lora_a.T) @ lora_b.T
    return y if bias is None else y + bias


def trainable_positions(labels: torch.Tensor) -> int:
    """N, the number of positions that contribute to the loss after the shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def nibble_values(codes: torch.Tensor, values) -> torch.Tensor:
    """The table values (FP32) of packed 4-bit codes, nibble by nibble: the low nibble of each
    byte is the even column, the high nibble the odd one."""
    table = torch.tensor(values, dtype=torch.float32)
    pairs = torch.stack([table[(codes & 0x0F).long()], table[(codes >> 4).long()]], dim=-1)
    return pairs.reshape(codes.shape[0], -1)


def int4_levels(codes: torch.Tensor) -> torch.Tensor:
    """The signed levels (-8..7, FP32) of packed symmetric INT4 codes: level = code - 8."""
    return nibble_values(codes, [float(code - 8) for code in range(16)])


def searched_round_trip(
    weight: torch.Tensor, bits: int, group: int, codebook: str, factors, importance=None
) -> torch.Tensor:
    """W through symmetric round-to-nearest with each group's scale chosen, group by group, as
    the first of absmax scale x `factors` with the least squared round-trip error (each
    column's squared error times importance[column] when given, one value per column of W)."""
    levels = nf4_codebook() if codebook == "nf4" else None
    out = torch.empty_like(weight, dtype=torch.float32)
    for r in range(weight.shape[0]):
        for a in range(0, weight.shape[1], group):
            w = weight[r, a : a + group].float()
            absmax = float(w.abs().max()) or 1.0
            unit = absmax if codebook == "nf4" else absmax / (2 ** (bits - 1) - 1)
            best, best_err = None, None
            for f in factors:
                s = unit * f
                if codebook == "nf4":
                    nearest = (w[:, None] / s - levels[None, :]).abs().argmin(dim=1)
                    values = levels[nearest] * s
                else:
                    half = 2 ** (bits - 1)
                    values = torch.clamp(torch.round(w / s), -half, half - 1) * s
                weights = 1.0 if importance is None else importance[a : a + group]
                err = float((weights * (values - w) ** 2).sum())
                if best_err is None or err < best_err:
                    best, best_err = values, err
            out[r, a : a + group] = best
    return out


def nf4_codebook() -> torch.Tensor:
    """QLoRA's 16 NF4 values, derived: 8 positive and 7 negative quantiles of N(0, 1), evenly
    spaced in probability from 0.5 to 0.9677 (= (1/2)(1/32 + 1 - 1/30), the paper's offset),
    each side scaled to [0, 1], plus an exact 0 (Dettmers et al. 2023, arXiv 2305.14314)."""
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (values / values.abs().max()).float()


def nf4_round_trip(weight: torch.Tensor, group: int) -> torch.Tensor:
    """W through NF4 and back: each group of `group` weights along D_in divided by its absmax,
    each value replaced by the nearest codebook value (argmin over all 16), times the absmax."""
    d_out, d_in = weight.shape
    w = weight.float().reshape(d_out, d_in // group, group)
    absmax = w.abs().amax(dim=-1, keepdim=True)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    book = nf4_codebook()
    nearest = ((w / absmax)[..., None] - book).abs().argmin(dim=-1)
    return (book[nearest] * absmax).reshape(d_out, d_in)


def gptq_round_trip(
    weight: torch.Tensor,
    x: torch.Tensor,
    bits: int,
    group: int,
    damp: float = 0.01,
    act_order: bool = False,
) -> torch.Tensor:
    """GPTQ (arXiv 2210.17323) in its textbook form, in float64, symmetric INT codes: quantize
    column i (group scale absmax / (2^(b-1) - 1) taken when its group starts), then move the
    remaining columns by the optimal-brain-surgeon update -err_i H^-1[i, j] / H^-1[i, i] and
    remove column i from H^-1 by one Gaussian elimination step. Returns the dequantized W.
    `act_order`: every group's scale taken from W first, then the same walk over the columns
    permuted by descending diag(H) (each column keeps its own group's scale), undone at the end.
    """
    qmax = 2 ** (bits - 1) - 1

    def absmax_scale(block: torch.Tensor) -> torch.Tensor:
        scale = block.abs().amax(dim=1) / qmax
        return torch.where(scale > 0, scale, torch.ones_like(scale))

    w = weight.double().clone()
    h = x.double().T @ x.double()
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    perm = torch.arange(w.shape[1])
    if act_order:
        static = [absmax_scale(w[:, g : g + group]) for g in range(0, w.shape[1], group)]
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]
    h_inv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    for i in range(w.shape[1]):
        if act_order:
            scale = static[int(perm[i]) // group]
        elif i % group == 0:
            scale = absmax_scale(w[:, i : i + group])
        q[:, i] = torch.clamp(torch.round(w[:, i] / scale), -qmax - 1, qmax) * scale
        err = (w[:, i] - q[:, i]) / h_inv[i, i]
        w[:, i:] -= err[:, None] * h_inv[i, i:][None, :]
        h_inv = h_inv - h_inv[:, i : i + 1] @ h_inv[i : i + 1, :] / h_inv[i, i]
    out = torch.empty_like(q)
    out[:, perm] = q
    return out.float()


def loftq_residual(weight: torch.Tensor, deq: torch.Tensor, r: int) -> torch.Tensor:
    """The best rank-r approximation of W - deq (an SVD truncation): what s B A should equal
    after a LoftQ step whose base is `deq`."""
    u, s, vh = torch.linalg.svd(weight.double() - deq.double())
    return (u[:, :r] * s[:r] @ vh[:r]).float()
