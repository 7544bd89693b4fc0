"""Technique 3: softmax approximation over a subset of semantically relevant tokens.

The exact loss normalises over the whole vocabulary: CE = lse_V(z) - z_y with z = h W^T.
The approximation normalises over K candidates per position, the target always among them:

    CE_K = log sum_{j in S} exp(z_j) - z_y,   S = subset(position), |S| = K, y in S.

It is used for training only; evaluation always uses the exact softmax. With K = V it is the
exact loss. Two ways to choose S (SPEC §2):

- `target_neighbors`: the K tokens whose (tied) embeddings are most similar (cosine) to the
  target's embedding: an N x V similarity matrix, computed without grad.
- `model_topk`: the K highest logits of the model at that position, computed without grad.

Two variants of the computation:

- `paper` (Table 1's row): the full N x V logits are built with grad, S is picked from them
  (or from the similarity matrix) and the K subset logits are gathered from them. Memory: the
  logits and one N x V score matrix in forward, an N x V gradient in backward.
- `chunked`: scores are computed one vocabulary chunk at a time keeping a running top-K, and
  the K subset logits are computed from the K gathered rows of W, max(1, C // K) positions at a
  time (at most max(C, K) rows of W, e.g. 4096 x 3072 x 4 B = 48 MiB on Llama for K <= 4096),
  recomputed in backward: never more than a chunk of an N x V matrix.

Numerics: CE_K <= CE (fewer terms in the normaliser), so the approximation under-estimates the
loss; its gradient ignores the tokens outside S. Tests bound both against the exact loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowmem.fused_loss import chunked_logits, head_rows
from lowmem.reference import IGNORE_INDEX
from lowmem.weights import frozen_weight

RULES = ("model_topk", "target_neighbors")
VARIANTS = ("paper", "chunked")


def check_k(k: int, vocab: int) -> None:
    if not isinstance(k, int) or not 0 < k <= vocab:
        raise ValueError(f"bad softmax_k={k!r}: must be an integer in 1..V (V = {vocab})")


def subset_cross_entropy(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Module,
    k: int = 1000,
    rule: str = "model_topk",
    variant: str = "paper",
    embedding: torch.nn.Module | None = None,
    chunk: int = 4096,
) -> torch.Tensor:
    """Mean CE over K candidates per row (N x D hidden, N targets; -100 rows ignored)."""
    check_k(k, head.out_features)
    if rule not in RULES:
        raise ValueError(f"bad softmax_rule={rule!r}: must be one of {RULES}")
    if variant not in VARIANTS:
        raise ValueError(f"bad softmax_variant={variant!r}: must be one of {VARIANTS}")
    if variant == "paper":
        logits = chunked_logits(hidden, head, chunk)  # N x V with grad; head never whole
        with torch.no_grad():
            scores = logits if rule == "model_topk" else _similarity(targets, embedding or head)
            subset = _with_target(scores.topk(k, dim=1).indices, targets)
            del scores
        sub_logits = _GatherColumns.apply(logits, subset)
    else:
        with torch.no_grad():
            subset = _with_target(
                _chunked_topk(hidden, targets, head, embedding, rule, k, chunk), targets
            )
        sub_logits = _SubsetLogits.apply(hidden, subset, head, max(1, chunk // k))
    position = (subset == targets.clamp(min=0)[:, None]).to(torch.uint8).argmax(dim=1)
    position = torch.where(targets == IGNORE_INDEX, IGNORE_INDEX, position)
    return F.cross_entropy(sub_logits, position, ignore_index=IGNORE_INDEX)


def _with_target(candidates: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Put the target in each row: if the top K missed it, it replaces the K-th candidate."""
    y = targets.clamp(min=0)[:, None]
    present = (candidates == y).any(dim=1, keepdim=True)
    last = torch.where(present, candidates[:, -1:], y)
    return torch.cat([candidates[:, :-1], last], dim=1)


def _similarity(targets, source, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Cosine similarity of each target's embedding to vocabulary rows start:stop."""
    weight = frozen_weight(source)  # dense, quantized or streamed: the same rows
    e_y = F.normalize(weight.gather(targets.clamp(min=0)), dim=1)
    stop = weight.shape[0] if stop is None else stop
    return e_y @ F.normalize(weight.rows(start, stop), dim=1).T


def _chunked_topk(hidden, targets, head, embedding, rule, k, chunk) -> torch.Tensor:
    best_val = best_idx = None
    for start in range(0, head.out_features, chunk):
        stop = min(start + chunk, head.out_features)
        if rule == "model_topk":
            scores = hidden @ head_rows(head, start, stop).T
        else:
            scores = _similarity(targets, embedding or head, start, stop)
        idx = torch.arange(start, stop, device=hidden.device).expand_as(scores)
        if best_val is not None:
            scores, idx = torch.cat([best_val, scores], 1), torch.cat([best_idx, idx], 1)
        best_val, pos = scores.topk(min(k, scores.shape[1]), dim=1)
        best_idx = idx.gather(1, pos)
    return best_idx


class _GatherColumns(torch.autograd.Function):
    """logits.gather(1, subset) with the memory of stock `gather` on real tensors.

    Stock `gather` keeps its input for backward and scatters the gradient into one zeroed N x V
    tensor in place. Under a TorchDispatchMode (every meter here) or on fake tensors, PyTorch's
    own backward takes its tensor-subclass branch instead and scatters out of place: one more
    N x V tensor at the peak than a plain run has (47.8 MiB on SmolLM2 at 256 tokens). This
    spells the in-place path out, so every meter sees what a plain run allocates.
    """

    @staticmethod
    def forward(ctx, logits, subset):
        ctx.save_for_backward(logits, subset)  # logits too, as GatherBackward0 saves `self`
        return logits.gather(1, subset)

    @staticmethod
    def backward(ctx, grad_out):
        logits, subset = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        grad.scatter_add_(1, subset, grad_out)
        return grad, None


class _SubsetLogits(torch.autograd.Function):
    """z[n, j] = h[n] . W[subset[n, j]], r positions at a time; W rows regathered in backward."""

    @staticmethod
    def forward(ctx, hidden, subset, head, r):
        out = torch.empty(subset.shape, dtype=hidden.dtype, device=hidden.device)
        for a in range(0, hidden.shape[0], r):
            w = frozen_weight(head).gather(subset[a : a + r])  # r x K x D
            out[a : a + r] = torch.einsum("rd,rkd->rk", hidden[a : a + r], w)
        ctx.save_for_backward(hidden, subset)
        ctx.head, ctx.r = head, r
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, subset = ctx.saved_tensors
        r = ctx.r
        grad_hidden = torch.empty_like(hidden)
        for a in range(0, hidden.shape[0], r):
            w = frozen_weight(ctx.head).gather(subset[a : a + r])
            grad_hidden[a : a + r] = torch.einsum("rk,rkd->rd", grad_out[a : a + r], w)
        return grad_hidden, None, None, None
