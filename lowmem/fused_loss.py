"""Beyond the paper: an exact LM-head + cross-entropy that never holds an N x V tensor.

The plain loss materialises logits = h W^T (N x V), keeps log-softmax output for backward and
builds an N x V gradient: three N x V FP32 tensors at the peak, 1.47 GiB per 1024 positions on
Llama-3.2 3B (V = 128256), plus the dequantized head (1.47 GiB) in backward. Here the
vocabulary is walked in chunks of C rows of W:

    forward:  for each chunk: z = h W_c^T (N x C); running max m and sum s of exp(z - m)
              (online log-sum-exp); pick the target's logit when it falls in the chunk.
              loss = mean over trainable rows of (m + log s - z_target).
              When a gradient is wanted, the same pass builds it: d lse / d h is
              sum_v softmax(z)_v W_v, an attention whose keys and values are both the head's
              rows, so it accumulates online as flash attention's output does:
              A = A exp(m_old - m) + exp(z - m) W_c, and the target's row W_t is picked from
              the chunk that holds it. grad_h = (A / s - W_t) / N_valid, saved for backward.
    backward: grad_h times the incoming gradient of the loss.

Peak extra memory: one N x C block, one C x D chunk of W (dequantized from INT4 chunk by chunk
when the head is quantized) and four N x D (h, A, W_t and the picked rows of one chunk), e.g.
N = 4915, C = 4096 on Llama: 80 + 48 + 4 x 58 MiB, instead of 3 x 2.3 GiB + 1.47 GiB.
Compute: two head matmuls per step, as the plain loss (logits, then their gradient), and the
head is read once (a streamed head: once from disk); an earlier version recomputed the logits
in backward (three matmuls, the head read twice: experiments/LOG.md, session 13).

Numerics: FP32 throughout; equal to `torch.nn.functional.cross_entropy` within FP32
rounding (tests: rtol 1e-5). Rows whose target is -100 contribute nothing. The head must be
frozen (LoRA never trains it).
"""

from __future__ import annotations

import torch

from lowmem.reference import IGNORE_INDEX
from lowmem.weights import frozen_weight


def head_rows(head: torch.nn.Module, start: int, stop: int) -> torch.Tensor:
    """FP32 rows start:stop of a frozen LM head's weight (dense, quantized or streamed), C x D."""
    return frozen_weight(head).rows(start, stop)


def fused_cross_entropy(
    hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, chunk: int = 4096
) -> torch.Tensor:
    """Mean CE of head(hidden) against targets (N x D, N), chunked over the vocabulary."""
    if chunk <= 0:
        raise ValueError(f"bad chunk={chunk}: must be > 0")
    weight = getattr(head, "weight", None)
    if weight is not None and weight.requires_grad:
        raise ValueError("fused_cross_entropy needs a frozen LM head (its weight has no grad)")
    want_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _FusedLinearCrossEntropy.apply(hidden, targets, head, chunk, want_grad)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, targets, head, chunk, want_grad):
        n = hidden.shape[0]
        m = torch.full((n,), float("-inf"), dtype=torch.float32, device=hidden.device)
        s = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        target_logit = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        if want_grad:  # sum_v exp(z_v - m) W_v, and the target's row W_t
            acc, target_rows = torch.zeros_like(hidden), torch.zeros_like(hidden)
        for start in range(0, head.out_features, chunk):
            stop = min(start + chunk, head.out_features)
            w = head_rows(head, start, stop)
            z = hidden @ w.T
            inside, local = _local_targets(targets, start, stop)
            picked = z.gather(1, local[:, None]).squeeze(1)
            target_logit = torch.where(inside, picked, target_logit)
            new_m = torch.maximum(m, z.amax(dim=1))
            rescale = torch.exp(m - new_m)
            p = z.sub_(new_m[:, None]).exp_()  # exp(z - m), in z's storage
            s = s * rescale + p.sum(dim=1)
            m = new_m
            if want_grad:
                acc.mul_(rescale[:, None]).addmm_(p, w)
                target_rows.addcmul_(w.index_select(0, local), inside[:, None])
            del z, p, w
        lse = m + torch.log(s)
        valid = targets != IGNORE_INDEX
        n_valid = valid.sum()
        loss = ((lse - target_logit) * valid).sum() / n_valid
        if want_grad:
            acc.div_(s[:, None]).sub_(target_rows).mul_((valid / n_valid)[:, None])
            del target_rows
            ctx.save_for_backward(acc)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss, None, None, None, None


def chunked_logits(hidden: torch.Tensor, head: torch.nn.Module, chunk: int = 4096) -> torch.Tensor:
    """head(hidden) (N x V) with the frozen head dequantized C rows at a time, never whole."""
    return _ChunkedLogits.apply(hidden, head, chunk)


class _ChunkedLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, head, chunk):
        out = torch.empty(
            hidden.shape[0], head.out_features, dtype=hidden.dtype, device=hidden.device
        )
        for start in range(0, head.out_features, chunk):
            stop = min(start + chunk, head.out_features)
            torch.mm(hidden, head_rows(head, start, stop).T, out=out[:, start:stop])
        ctx.save_for_backward(hidden)
        ctx.head, ctx.chunk = head, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (hidden,) = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden)
        for start in range(0, ctx.head.out_features, ctx.chunk):
            stop = min(start + ctx.chunk, ctx.head.out_features)
            grad_hidden.addmm_(grad_out[:, start:stop], head_rows(ctx.head, start, stop))
        return grad_hidden, None, None


def _local_targets(targets, start, stop):
    inside = (targets >= start) & (targets < stop)
    return inside, (targets - start).clamp(0, stop - start - 1)


@torch.no_grad()
def token_stats(
    rows: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p(target), entropy and top-1 hit (ties count) of softmax(rows W^T) per row (N x D,
    N), W the frozen head read C rows at a time: online log-sum-exp as in lowmem.fused_loss,
    one N x C block and its exponentials alive, never N x V; FP32."""
    n, vocab = rows.shape[0], head.out_features
    m = rows.new_full((n,), float("-inf"))
    s, zs, picked = rows.new_zeros(n), rows.new_zeros(n), rows.new_zeros(n)
    for a in range(0, vocab, chunk):
        b = min(a + chunk, vocab)
        z = rows @ head_rows(head, a, b).T
        new_m = torch.maximum(m, z.amax(dim=1))
        rescale = torch.exp(m - new_m)
        e = (z - new_m[:, None]).exp_()
        s = s * rescale + e.sum(dim=1)
        zs = zs * rescale + e.mul_(z).sum(dim=1)  # sum of exp(z - m) z, for the entropy
        m = new_m
        inside = (targets >= a) & (targets < b)
        local = (targets - a).clamp(0, b - a - 1)
        picked = torch.where(inside, z.gather(1, local[:, None]).squeeze(1), picked)
        del z, e
    lse = m + torch.log(s)
    return picked - lse, lse - zs / s, picked >= m
