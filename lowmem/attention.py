"""Grouped-query attention two ways, chosen per model: K/V heads copied, or SDPA's own GQA.

Llama-3.2 3B has 24 query heads and 8 K/V heads (groups of 3). SDPA can attend each group of
query heads to its K/V head itself (`enable_gqa=True`: "native"), or K and V can first be
copied up to one head per query head (`repeat_kv`), as transformers' eager path does. The two
compute the same attention but differ in memory, because SDPA saves its K and V inputs for
backward: with repeat_kv those are 2 x (query heads x head dim) floats per token per layer,
2 x 3072 x 4 B x 28 layers = 0.66 GiB per 1024 tokens on Llama-3.2 3B, against 0.22 GiB
native. Table 1's numbers imply repeat_kv up to `+ LoRA` and native from `+ Quantization` on
(`KernelSettings.gqa`; experiments/LOG.md).

transformers' own "sdpa" attention decides by device and mask (`use_gqa_in_sdpa`), so lowmem
registers one attention implementation per path with transformers' `AttentionInterface`,
`lowmem_sdpa_repeat_kv` and `lowmem_sdpa_native`, each with transformers' SDPA mask
(`AttentionMaskInterface`), and `set_gqa` selects one on a model. Nothing process-wide is
patched: two models in one process can run different paths. Each implementation runs the ops
of transformers' `sdpa_attention_forward` with its choice forced, including its handling of
`attention_mask` and `is_causal`, so measured peaks are those of the "sdpa" path (tests
compare the two op by op; its NPU-only mask conversion is left out: lowmem runs on CPU and
CUDA).

A third path, `lowmem_blocks_<n>` (`KernelSettings.attention_block` = n > 0), runs the exact
block attention of `lowmem.block_attention` (n tokens per query and key block, no T x T
tensor, no K/V copies) with the same mask; `set_gqa` registers it on first use.

The selected name lives in `model.config._attn_implementation`. config.json never records it
(transformers drops it when saving), but a model handed on in memory to code that has not
imported lowmem should be set back with `model.set_attn_implementation("sdpa")`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import pack_gqa, repeat_kv
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lowmem.block_attention import block_attention
from lowmem.models import base_model

IMPLEMENTATIONS = {"repeat_kv": "lowmem_sdpa_repeat_kv", "native": "lowmem_sdpa_native"}


def sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    gqa: str,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention with the GQA path fixed: "repeat_kv" or "native".

    query: B x H x T x d, key / value: B x H_kv x S x d; returns B x T x H x d and no weights.
    Other keyword arguments of the attention call (e.g. Mistral's sliding_window, which its
    mask already applies) are ignored, as the "sdpa" path ignores them.
    """
    for name in ("softcap", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"lowmem's SDPA attention takes no {name}= (got a value)")
    sdpa_kwargs = {}
    q_length = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # the kernel's own causal mask only when no mask was built (sdpa_mask skips a plain causal)
    is_causal = q_length > 1 and attention_mask is None and is_causal
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        native = (query, key, value, attention_mask, dropout, is_causal)
        if gqa == "native" and not math_path_for_gqa(*native):
            sdpa_kwargs["enable_gqa"] = True
        elif q_length == 1:  # one query token: its heads grouped per K/V head, nothing copied
            query = pack_gqa(query, groups)
            attention_mask = pack_gqa(attention_mask, groups)
        else:
            key = repeat_kv(key, groups)
            value = repeat_kv(value, groups)
    if is_causal and key.shape[2] > q_length:  # prefill into an empty static cache
        key = key[:, :, :q_length, :]
        value = value[:, :, :q_length, :]
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=is_causal,
        **sdpa_kwargs,
    )
    out = out.reshape(out.shape[0], -1, q_length, value.shape[-1])  # undoes pack_gqa
    return out.transpose(1, 2).contiguous(), None


def math_path_for_gqa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    is_causal: bool,
) -> bool:
    """Whether SDPA would run `enable_gqa=True` on its math path: CUDA tensors that none of the
    fused kernels (flash, memory-efficient, cuDNN) takes with GQA, e.g. FP32 (flash and cuDNN
    take half precision only, the memory-efficient kernel takes no GQA). The math path saves
    the B x H x T x S probabilities of every layer: measured on an H200 (torch 2.11, FP32,
    `make gpu-check`), Llama-3.2 3B `+ Quantization` at 2048 tokens held 26.0 GiB instead of
    14.8, `best` 1.78 instead of 0.35. The native path then copies K/V as "repeat_kv" does,
    which the memory-efficient kernel takes. On the CPU (and under the simulated meter) the
    flash kernel takes GQA in FP32: never the math path."""
    if not query.is_cuda:
        return False
    cuda = torch.backends.cuda
    params = cuda.SDPAParams(query, key, value, attention_mask, dropout, is_causal, True)
    fused = (cuda.can_use_flash_attention, cuda.can_use_efficient_attention)
    fused += (cuda.can_use_cudnn_attention,)
    return not any(can_use(params) for can_use in fused)


for _gqa, _name in IMPLEMENTATIONS.items():
    AttentionInterface.register(_name, functools.partial(sdpa_attention, gqa=_gqa))
    AttentionMaskInterface.register(_name, sdpa_mask)


def blocked_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    block: int,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """`sdpa_attention`'s contract (same arguments, mask and causal rule, B x T x H x d out)
    computed by `lowmem.block_attention` in blocks of `block` tokens."""
    if dropout:
        raise ValueError(f"bad dropout={dropout!r}: block attention has none (must be 0)")
    for name in ("softcap", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"lowmem's block attention takes no {name}= (got a value)")
    q_length = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = q_length > 1 and attention_mask is None and is_causal
    if is_causal and key.shape[2] > q_length:  # prefill into an empty static cache
        key, value = key[:, :, :q_length], value[:, :, :q_length]
    out = block_attention(query, key, value, attention_mask, scaling, is_causal, block)
    return out, None


def set_gqa(model: torch.nn.Module, gqa: str, attention_block: int = 0) -> None:
    """Run every attention layer of a (peft-wrapped) Hugging Face model on the `gqa` path, or
    in blocks of `attention_block` tokens when that is > 0 (GQA then copies nothing)."""
    if gqa not in IMPLEMENTATIONS:
        raise ValueError(f"bad gqa={gqa!r}: must be one of {', '.join(IMPLEMENTATIONS)}")
    if not (isinstance(attention_block, int) and attention_block >= 0):
        raise ValueError(f"bad attention_block={attention_block!r}: must be an integer >= 0")
    name = IMPLEMENTATIONS[gqa]
    if attention_block:
        name = f"lowmem_blocks_{attention_block}"
        AttentionInterface.register(
            name, functools.partial(blocked_attention, block=attention_block)
        )
        AttentionMaskInterface.register(name, sdpa_mask)
    base_model(model).set_attn_implementation(name)
