"""Beyond the paper: a decoder layer's attention half a block of query rows at a time.

A pre-norm decoder layer computes h = x + o_proj(attention(rope(q_proj(n)), rope(k_proj(n)),
v_proj(n))) with n = norm(x). Done whole, its backward (in `best`, phase 2 of the checkpointed
layer's MLP-first backward, `lowmem.checkpoint`) holds x, n (saved for the LoRA A gradients),
the queries, the attention output SDPA saves, the incoming gradient and its copies for the
queries and the output: from 4096 tokens on that is where `best` peaks on Llama-3.2 3B (nine
T x D at 16384 tokens, 1.63 GiB; experiments/LOG.md, session 8). But only the keys and values
are needed whole: a query row's output depends on its own row of n and on K, V. So here

    forward (no grad):  K, V from n a block of rows at a time; then for each block of `rows`
                        query rows: q = rope(q_proj(n_b)), o = SDPA(q, K[:e], V[:e]) with the
                        block's causal (or given) mask, and o_proj(o) written over n_b;
    backward:           K, V again, rows at a time, from x (norm inside); dK, dV zeros; for
                        each query block: norm, q, attention and o_proj of its rows recomputed
                        with grad against K[:e], V[:e] as leaves, back-propagated from dh_b:
                        dx_b, dK[:e] +=, dV[:e] +=, the LoRA gradients +=; then the keys and
                        values of each row block recomputed with grad and back-propagated from
                        dK, dV (their rows of dx and the k / v adapters' gradients).

dx is written into dh's buffer (its rows are read once, by their query block, before they are
overwritten), so phase 2 holds x, dh / dx, K, V, dK, dV and one block's tensors: on Llama-3.2 3B
(8 K/V heads of 24) 3.33 T x D instead of about nine. Each block's SDPA call also holds its
mask (rows x e floats: SDPA turns the boolean mask into an additive one) and its dK, dV rows.
The arithmetic is the layer's own, in another order (the query blocks' contributions to dK, dV
and the two contributions to dx are summed apart): loss and gradients equal the whole-tensor
layer's within FP32 rounding (tests/test_attention_rows.py). The query and output projections
dequantize their weights once per block (`rows` tokens: 32 blocks at 16384 with 512 rows).

Used by a checkpointed layer (`apply_checkpoint(..., attention_rows=n)`, best's auto from 4096
tokens), where the forward runs under no_grad: `install` replaces the attention module's
forward by the blocked one while grad is off and the sequence is longer than one block, and
the MLP-first backward calls `AttentionRows.backward` in place of the attention's recompute.
The layer must be a Llama / Qwen2 / Mistral one (`lowmem.architectures`), without LoRA dropout
or attention dropout (the blocks would draw other random masks than the whole-tensor forward).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv

from lowmem.attention import math_path_for_gqa
from lowmem.rope import rotary


class AttentionRows:
    """One decoder layer's attention half (input norm + attention) in blocks of `rows` tokens."""

    def __init__(self, layer: torch.nn.Module, attention: str, rows: int) -> None:
        if not (isinstance(rows, int) and rows > 0):
            raise ValueError(f"bad attention_rows={rows!r}: must be an integer > 0 (tokens)")
        self.attn = layer.get_submodule(attention)
        self.norm = layer.input_layernorm
        self.rows = rows
        for name, module in self.attn.named_modules():
            p = getattr(module, "p", 0.0) if isinstance(module, torch.nn.Dropout) else 0.0
            if p:
                raise ValueError(
                    f"bad dropout p={p} in {name}: attention_rows needs LoRA dropout 0 (the "
                    "blocks would draw other masks than the whole-tensor forward)"
                )
        if getattr(self.attn, "attention_dropout", 0.0):
            raise ValueError(
                f"bad attention_dropout={self.attn.attention_dropout}: attention_rows needs 0"
            )
        self.params = [p for m in (self.attn, self.norm) for p in m.parameters() if p.requires_grad]

    def install(self) -> None:
        """The attention module's forward runs in blocks when grad is off (else as before)."""
        inner = self.attn.forward
        self.attn.forward = functools.partial(_forward, self, inner)

    def blocks(self, t: int):
        return ((s, min(s + self.rows, t)) for s in range(0, t, self.rows))

    def keys_values(self, src: torch.Tensor, cos, sin, normed: bool):
        """K, V (B x H_kv x T x d, RoPE applied to K) from n (normed) or x, a row block at a
        time (no whole-T temporaries beside them)."""
        b, t, _ = src.shape
        heads, d = self._kv_heads(), self.attn.head_dim
        k = src.new_empty(b, t, heads, d).transpose(1, 2)  # transformers' layout
        v = src.new_empty(b, t, heads, d).transpose(1, 2)
        for s, e in self.blocks(t):
            kb, vb = self.project_kv(src[:, s:e], cos[:, s:e], sin[:, s:e], normed)
            k[:, :, s:e] = kb
            v[:, :, s:e] = vb
        return k, v

    def project_kv(self, src, cos, sin, normed: bool):
        n = src if normed else self.norm(src)
        shape = (*n.shape[:-1], -1, self.attn.head_dim)
        k = rotary(self.attn.k_proj(n).view(shape).transpose(1, 2), cos, sin)
        return k, self.attn.v_proj(n).view(shape).transpose(1, 2)

    def query_block(self, src, k, v, cos, sin, mask, s: int, e: int, normed: bool):
        """o_proj(attention) of query rows s..e (src: their n or x) against keys 0..e."""
        n = src if normed else self.norm(src)
        shape = (*n.shape[:-1], -1, self.attn.head_dim)
        q = rotary(self.attn.q_proj(n).view(shape).transpose(1, 2), cos[:, s:e], sin[:, s:e])
        o = _sdpa(q, k[:, :, :e], v[:, :, :e], _block_mask(mask, s, e, q.device), self.attn)
        return self.attn.o_proj(o.transpose(1, 2).reshape(*n.shape[:-1], -1))

    def forward(self, n: torch.Tensor, position_embeddings, attention_mask) -> torch.Tensor:
        """The attention module's output for normed input n, block by block (no graph),
        written over n: once K and V are made, a block's rows of n are read by its own query
        projection only (the decoder layer reads n nowhere else)."""
        cos, sin = position_embeddings
        k, v = self.keys_values(n, cos, sin, normed=True)
        for s, e in self.blocks(n.shape[1]):
            y = self.query_block(n[:, s:e], k, v, cos, sin, attention_mask, s, e, normed=True)
            n[:, s:e] = y
        return n

    def backward(self, x: torch.Tensor, dh: torch.Tensor, kwargs: dict) -> dict:
        """Gradients of h = x + attention(norm(x)) given dh = dL/dh: dx is written into dh's
        buffer (which the caller gives up); returns {id(param): gradient} of `self.params`."""
        cos, sin = kwargs["position_embeddings"]
        mask = kwargs.get("attention_mask")
        x = x.detach()
        with torch.no_grad():
            k, v = self.keys_values(x, cos, sin, normed=False)
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        grads: dict[int, torch.Tensor] = {}
        for s, e in self.blocks(x.shape[1]):
            with torch.enable_grad():
                xb = x[:, s:e].requires_grad_()
                ke = k[:, :, :e].requires_grad_()
                ve = v[:, :, :e].requires_grad_()
                y = self.query_block(xb, ke, ve, cos, sin, mask, s, e, normed=False)
                got = self._grad(y, [xb, ke, ve], dh[:, s:e], grads)
            dh[:, s:e] += got[0]
            dk[:, :, :e] += got[1]
            dv[:, :, :e] += got[2]
            del y, got
        del k, v
        for s, e in self.blocks(x.shape[1]):
            with torch.enable_grad():
                xr = x[:, s:e].requires_grad_()
                kr, vr = self.project_kv(xr, cos[:, s:e], sin[:, s:e], normed=False)
                got = self._grad((kr, vr), [xr], (dk[:, :, s:e], dv[:, :, s:e]), grads)
            dh[:, s:e] += got[0]
            del kr, vr, got
        return grads

    def _grad(self, outputs, inputs, grad_outputs, grads: dict) -> list:
        """Gradients of `inputs`; the parameters' are added into `grads`."""
        got = torch.autograd.grad(outputs, [*inputs, *self.params], grad_outputs, allow_unused=True)
        for p, g in zip(self.params, got[len(inputs) :], strict=True):
            if g is not None:
                grads[id(p)] = g if id(p) not in grads else grads[id(p)].add_(g)
        return list(got[: len(inputs)])

    def _kv_heads(self) -> int:
        return self.attn.config.num_key_value_heads


def _forward(rows: AttentionRows, inner, hidden_states, position_embeddings=None,
             attention_mask=None, **kwargs):  # fmt: skip
    """The attention module's forward: blocked under no_grad for sequences longer than a block
    and without a KV cache, else the module's own."""
    plain = torch.is_grad_enabled() or hidden_states.shape[1] <= rows.rows
    if plain or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return inner(hidden_states, position_embeddings, attention_mask, **kwargs)
    return rows.forward(hidden_states, position_embeddings, attention_mask), None


def _block_mask(mask: torch.Tensor | None, s: int, e: int, device) -> torch.Tensor:
    """Query rows s..e against keys 0..e: transformers' mask cut to them, or causal by position
    (True = attend) where transformers built none (a plain causal mask is left to the kernel)."""
    if mask is not None:
        return mask[..., s:e, :e]
    rows = torch.arange(s, e, device=device)[:, None]
    return torch.arange(e, device=device)[None, :] <= rows


def _sdpa(q, k, v, mask, attn) -> torch.Tensor:
    """SDPA with the GQA heads grouped by the kernel (K/V copied only where that would take
    the math path, as `lowmem.attention` does); B x H x rows x d."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and math_path_for_gqa(q, k, v, mask, 0.0, False):
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        groups = 1
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=groups > 1
    )
