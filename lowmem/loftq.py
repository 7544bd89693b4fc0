"""Quantization option: a LoRA initialisation that absorbs the quantization error (LoftQ).

With peft's default init (B = 0) training starts from the quantized base alone, W ~= Q, and
the adapters must first learn back what quantization lost. LoftQ (Li, Yu, Liang, He, Karampatziakis,
Chen, Zhao 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models", arXiv
2310.08659) chooses Q and the adapters together so that base + adapter starts close to W:

    min over Q, A, B of ||W - Q - s B A||_F,  s = alpha / r (peft's LoRA scaling),

by alternating T times: Q = quantize(W - s B A); then the best rank-r fit of the residual
W - deq(Q), from its SVD U S V^T: B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T, so that
s B A = U_r S_r V_r^T. One step already gives ||W - deq(Q) - s B A|| <= ||W - deq(Q)||
(an SVD truncation is the best rank-r approximation, and 0 is one of them).

With error-compensating codes (`quant_method="gptq"`) the first step's round-to-nearest would
throw the adapted layers' GPTQ codes away; `quant_loftq_keep_codes` keeps them instead and runs
the one SVD step on their residual W - deq(Q_gptq) (our variant; LoftQ's own Q step is RTN).

Only layers that carry an adapter change; their base is stored in the same packed format
(round-to-nearest of W - s B A, INT or NF4: the codes change, not the bytes) and A, B are the
FP32 adapters peft already holds (r x D_in + D_out x r: no extra memory). Cost: one SVD of
D_out x D_in per step and layer (SmolLM2-135M: 60 layers of 576 x 576 / 192 x 576, about a
second). Caveat: the adapter is trained against this Q, so the saved adapter belongs with this
quantized base (as with peft's LoftQ), not with the FP32 one.

peft's own `LoftQConfig` / `replace_lora_weights_loftq` do not apply here: `loftq_init` moves
the weight to "cuda" (or "xpu") and quantizes with bitsandbytes, and `replace_lora_weights_loftq`
accepts only bitsandbytes `Linear4bit` layers, not `lowmem.quant_linear.QuantLinear`; neither
knows our format or the scaling alpha / r (peft sets B A to the residual itself).
"""

from __future__ import annotations

import torch

from lowmem.models import base_model
from lowmem.quantize import QuantizedWeight, dequantize, quantize


@torch.no_grad()
def loftq_init(
    weight: torch.Tensor,
    r: int,
    scale: float,
    iters: int = 1,
    bits: int = 4,
    group_size: int = 32,
    codebook: str = "int",
    keep: QuantizedWeight | None = None,
    scale_search: bool = False,
) -> tuple[QuantizedWeight, torch.Tensor, torch.Tensor]:
    """(Q, A r x D_in, B D_out x r) with deq(Q) + scale * B A ~= weight; `iters` >= 1 steps.
    `keep`: the codes to use as Q in the (then only) step instead of rounding to nearest."""
    if iters < 1:
        raise ValueError(f"bad loftq iters={iters}: must be >= 1")
    if keep is not None and iters != 1:
        raise ValueError(f"bad loftq iters={iters} with codes to keep: must be 1")
    w = weight.detach().float()
    low_rank = torch.zeros_like(w)  # s B A, 0 before the first step
    for _ in range(iters):
        q = keep or quantize(w - low_rank, bits, group_size, True, codebook, scale_search)
        u, s, vh = torch.linalg.svd(w - dequantize(q), full_matrices=False)
        root = (s[:r] / scale).sqrt()
        b, a = u[:, :r] * root, root[:, None] * vh[:r]
        low_rank = scale * b @ a
    return q, a.contiguous(), b.contiguous()


def apply_loftq(
    model: torch.nn.Module,
    iters: int,
    bits: int = 4,
    group_size: int = 32,
    codebook: str = "int",
    adapter: str = "default",
    keep: dict[str, QuantizedWeight] | None = None,
    scale_search: bool = False,
) -> dict[str, QuantizedWeight]:
    """Set the adapters of every LoRA layer of the (not yet quantized) peft `model` by
    `loftq_init`; return {stock parameter name: its base's Q} for `apply_quantize(chosen=...)`.
    `keep` ({stock parameter name: Q}, e.g. GPTQ's): those layers keep their Q (one step)."""
    keep = keep or {}
    base = base_model(model)
    names = {id(p): n.replace(".base_layer", "") for n, p in base.named_parameters()}
    out = {}
    for module in base.modules():
        if not (hasattr(module, "lora_A") and adapter in getattr(module, "lora_A", {})):
            continue
        w = module.get_base_layer().weight
        r, scale = module.r[adapter], module.scaling[adapter]
        kept = keep.get(names[id(w)])
        q, a, b = loftq_init(w, r, scale, iters, bits, group_size, codebook, kept, scale_search)
        module.lora_A[adapter].weight.data.copy_(a)
        module.lora_B[adapter].weight.data.copy_(b)
        out[names[id(w)]] = q
    return out
