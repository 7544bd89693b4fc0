"""Exact attention over blocks of queries and keys: online softmax, nothing T x T ever stored.

Softmax attention out = softmax(q k^T * scale + mask) v is computed one tile of `block` query
rows x `block` keys at a time (flash-attention, Dao et al. 2022): each query block keeps a
running row maximum m, a running sum l of exp(s - m) and an unnormalised output, rescaled when
m grows; at the end out = acc / l and the log-sum-exp lse = m + log l is kept per row. Forward
saves q, k, v and lse (H x T floats): neither the probabilities nor the output. Backward walks
the query blocks again; each tile's probabilities come back from lse, p = exp(s - lse), first
to rebuild the block's output o_i = sum_j p v_j (for delta = rowsum(do_i * o_i)), then

    dv_j += p^T do_i,  dp = do_i v_j^T,  ds = p * (dp - delta) * scale,
    dq_i += ds k_j,     dk_j += ds^T q_i,

with dk and dv accumulated whole. Rebuilding o_i costs two matmuls per tile (backward: 7
instead of 5) and keeps one T x D tensor fewer alive through the layer's recompute and backward
(the output dies after o_proj, which saves no input unless it has an adapter).

Grouped-query attention copies no K/V: the g query heads of one K/V head are folded into the
rows of a tile ([B, H_kv, g * block, d] against that head's [B, H_kv, block, d]), so a tile's
matmul also sums the group's contributions to dk and dv. Causal attention (no mask) skips the
key tiles above the diagonal and masks the diagonal tile by position. A mask (transformers'
`sdpa_mask`: boolean, True = attend; or additive; [B or 1, 1 or H, T, S]) is applied per tile
and every key tile is visited. A row that attends to nothing (a left pad under a causal mask)
gets output 0 and gradient 0.

Memory, Llama-3.2 3B (24 query heads, 8 K/V heads, d = 128), 16384 tokens, FP32: saved are q
(192 MiB), k and v (64 MiB each) and lse (1.5 MiB). In backward, dq, dk, dv are whole (192 +
64 + 64 MiB, autograd takes them whole) beside the incoming do (192 MiB); per block, at most
two tiles (24 x 512 x 512 x 4 B = 24 MiB each at block = 512: scores turned into probabilities
in place, and their gradient) and the block's q, do, o and dq rows (6 MiB each). Measured alone
(simulated meter, block 512): SDPA's backward peaks at 1410 MiB, this one at 1284 MiB. Tile
loops depend on shapes only, so the simulated meter (FakeTensorMode) runs the same ops. The
whole best step on Llama-3.2 3B: 1.818 -> 1.695 GiB at 16384 tokens, 0.347 -> 0.324 at 2048
(experiments/LOG.md).

Numerics: FP32 throughout; sums run in another order than SDPA's, so results agree to rounding
(tests: within 1e-5 of the largest magnitude). A row masked entirely by a finite additive mask
(-1e9, finfo.min) has a log-sum-exp that rounds to the mask value; SDPA and this backward both
give such a row meaningless gradients (a boolean mask, transformers' own, gives it 0).
"""

from __future__ import annotations

import math

import torch


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    block: int = 256,
) -> torch.Tensor:
    """Attention of q (B x H x T x d) over k, v (B x H_kv x S x d), H a multiple of H_kv.

    Returns B x T x H x d (transformers' layout after attention). `mask`: boolean (True =
    attend) or additive, broadcastable to B x H x T x S; `causal` (top-left aligned, as SDPA's
    is_causal) only without a mask.
    """
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"bad heads: {q.shape[1]} query heads, {k.shape[1]} K/V heads")
    if mask is not None and causal:
        raise ValueError("bad causal=True with a mask: the mask must carry the causality")
    if not (isinstance(block, int) and block > 0):
        raise ValueError(f"bad block={block!r}: must be an integer > 0 (tokens per block)")
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return BlockAttention.apply(q, k, v, mask, scale, causal, block)


class BlockAttention(torch.autograd.Function):
    """`block_attention` with its block-wise backward; saves q, k, v, lse (and the mask)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, causal, block):
        tiles = _Tiles(q, k, v, mask, scale, causal, block)
        out = q.new_empty(tiles.b, tiles.t, tiles.h, v.shape[-1])
        lse = q.new_empty(tiles.b, tiles.kv, tiles.g, tiles.t)
        for a, e in tiles.query_blocks():
            qi = tiles.rows(q.unflatten(1, (tiles.kv, tiles.g)), a, e)
            m = q.new_full((*qi.shape[:-1], 1), -math.inf)
            l_sum = q.new_zeros(m.shape)
            acc = q.new_zeros((*qi.shape[:-1], v.shape[-1]))
            for c, f in tiles.key_blocks(e):
                p = tiles.scores(qi, a, e, c, f)  # turned into probabilities in place
                m_new = torch.maximum(m, p.amax(-1, keepdim=True))
                # a row with every key masked so far keeps m = -inf: subtract 0 instead (p = 0)
                m_safe = m_new.masked_fill(m_new == -math.inf, 0.0)
                p.sub_(m_safe).exp_()
                alpha = (m - m_safe).exp_()
                l_sum.mul_(alpha).add_(p.sum(-1, keepdim=True))
                acc.mul_(alpha).add_(p @ v[:, :, c:f])
                m = m_new
                del p  # else it lives on while the next tile's scores are computed
            empty = l_sum == 0  # attends to nothing: output 0, lse = +inf (backward p = 0)
            acc.div_(l_sum.masked_fill(empty, 1.0))
            lse_i = (m + l_sum.log()).masked_fill(empty, math.inf)
            out5 = out[:, a:e].unflatten(2, (tiles.kv, tiles.g))
            out5.copy_(tiles.unrows(acc, e - a).permute(0, 3, 1, 2, 4))
            lse[..., a:e] = lse_i.view(tiles.b, tiles.kv, tiles.g, e - a)
        ctx.save_for_backward(q, k, v, lse, mask)
        ctx.scale, ctx.causal, ctx.block = scale, causal, block
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, lse, mask = ctx.saved_tensors
        tiles = _Tiles(q, k, v, mask, ctx.scale, ctx.causal, ctx.block)
        dq = q.new_empty(tiles.b, tiles.kv, tiles.g, tiles.t, q.shape[-1])
        dk = torch.zeros_like(k, memory_format=torch.contiguous_format)
        dv = torch.zeros_like(v, memory_format=torch.contiguous_format)
        q5 = q.unflatten(1, (tiles.kv, tiles.g))
        # B x T x H x d -> B x H_kv x g x T x d views, read block by block
        do5 = dout.unflatten(2, (tiles.kv, tiles.g)).permute(0, 2, 3, 1, 4)
        for a, e in tiles.query_blocks():
            qi, doi = tiles.rows(q5, a, e), tiles.rows(do5, a, e)
            lse_i = lse[..., a:e].reshape(tiles.b, tiles.kv, -1, 1)
            delta = tiles.delta(qi, doi, lse_i, v, a, e)
            dqi = torch.zeros_like(qi)
            for c, f in tiles.key_blocks(e):
                kj, vj = k[:, :, c:f], v[:, :, c:f]
                p = tiles.probabilities(qi, lse_i, a, e, c, f)
                dv[:, :, c:f] += p.transpose(-1, -2) @ doi
                ds = (doi @ vj.transpose(-1, -2)).sub_(delta).mul_(p).mul_(ctx.scale)
                del p  # at most two tiles alive: p and ds, then ds alone
                dqi += ds @ kj
                dk[:, :, c:f] += ds.transpose(-1, -2) @ qi
                del ds
            dq[..., a:e, :] = tiles.unrows(dqi, e - a)
        return dq.flatten(1, 2), dk, dv, None, None, None, None


class _Tiles:
    """The shapes of one attention call and how its tiles are cut (shape arithmetic only)."""

    def __init__(self, q, k, v, mask, scale, causal, block) -> None:
        self.b, self.h, self.t, _ = q.shape
        self.kv, self.s = k.shape[1], k.shape[2]
        self.g = self.h // self.kv
        self.k, self.scale, self.causal, self.block = k, scale, causal, block
        # B' x H' x T x S -> B' x (1 or H_kv) x (1 or g) x T x S, broadcast against a 5-D tile
        heads = (1, 1) if mask is None or mask.shape[1] == 1 else (self.kv, self.g)
        self.mask = None if mask is None else mask.reshape(mask.shape[0], *heads, *mask.shape[2:])

    def query_blocks(self):
        return ((a, min(a + self.block, self.t)) for a in range(0, self.t, self.block))

    def key_blocks(self, query_end: int):
        """Key tiles a query block ending before `query_end` can see."""
        end = min(query_end, self.s) if self.causal else self.s
        return ((c, min(c + self.block, end)) for c in range(0, end, self.block))

    def rows(self, x5: torch.Tensor, a: int, e: int) -> torch.Tensor:
        """Rows a..e of B x H_kv x g x T x d as one tile's B x H_kv x (g * rows) x d (a copy)."""
        return x5[:, :, :, a:e].reshape(self.b, self.kv, -1, x5.shape[-1])

    def unrows(self, tile: torch.Tensor, n: int) -> torch.Tensor:
        return tile.view(self.b, self.kv, self.g, n, tile.shape[-1])

    def probabilities(self, qi, lse_i, a: int, e: int, c: int, f: int) -> torch.Tensor:
        """A tile's softmax probabilities, rebuilt from the rows' log-sum-exp."""
        return self.scores(qi, a, e, c, f).sub_(lse_i).exp_()

    def delta(self, qi, doi, lse_i, v, a: int, e: int) -> torch.Tensor:
        """rowsum(do_i * o_i) of query rows a..e, their output o_i rebuilt tile by tile."""
        oi = doi.new_zeros((*doi.shape[:-1], v.shape[-1]))
        for c, f in self.key_blocks(e):
            oi += self.probabilities(qi, lse_i, a, e, c, f) @ v[:, :, c:f]
        return (doi * oi).sum(-1, keepdim=True)

    def scores(self, qi: torch.Tensor, a: int, e: int, c: int, f: int) -> torch.Tensor:
        """Masked q_i k_j^T * scale of query rows a..e and keys c..f: B x H_kv x g(e-a) x (f-c)."""
        s = (qi @ self.k[:, :, c:f].transpose(-1, -2)).mul_(self.scale)
        s5 = s.view(self.b, self.kv, self.g, e - a, f - c)
        if self.mask is not None:
            tile = self.mask[..., a:e, c:f]
            if tile.dtype == torch.bool:
                s5.masked_fill_(~tile, -math.inf)
            else:
                s5.add_(tile)
        elif self.causal and f - 1 > a:  # the tile crosses the diagonal
            rows = torch.arange(a, e, device=s.device)[:, None]
            above = torch.arange(c, f, device=s.device)[None, :] > rows
            s5.masked_fill_(above, -math.inf)
        return s
