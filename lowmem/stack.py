"""The cumulative technique stack: turn a freshly built model into one row of Table 1.

The rows and their configuration live in `lowmem.config` (`STACK`, `StackConfig`); this module
applies a row to a model and builds its benchmark batch.

- `baseline`: full-parameter FP32 fine-tuning; every weight trains. Llama-3.2 3B: weights and
  gradients alone are 2 x 11.97 GiB.
- `lora`: the base is frozen and peft injects rank-r adapters (r=16, alpha=32, q_proj and v_proj
  by default, SPEC §2). Llama-3.2 3B: 28 layers x (16 x (3072 + 3072) + 16 x (3072 + 1024))
  = 4.59e6 trainable parameters, 17.5 MiB; the activations dominate the peak instead.
- `quantize`: the frozen base (every decoder linear, the embedding and the tied LM head) is
  stored in INT4 and dequantized per matmul (`lowmem.quantize`): 11.97 -> 1.87 GiB on Llama.

Every row also fixes the model's grouped-query attention path (`KernelSettings.gqa`,
`lowmem.attention`): repeat_kv for baseline and lora, native from quantize on, as Table 1
implies; with `KernelSettings.attention_block` > 0 (best) the exact block attention replaces
SDPA. It is the model's own setting (its attention implementation), not a process-wide one.

The benchmark batch is the paper's setting: batch 1, T random tokens, and labels that mark the
last 30% of positions trainable (the rest -100), which only matters once logits masking exists.
"""

from __future__ import annotations

import math

import torch
from peft import LoraConfig, get_peft_model

from lowmem.attention import set_gqa
from lowmem.checkpoint import apply_checkpoint
from lowmem.config import StackConfig, Techniques
from lowmem.fused_norm import apply_fused_norm
from lowmem.models import check_architecture, mlp_width
from lowmem.quant_linear import apply_quantize
from lowmem.rope import apply_per_head_rope
from lowmem.tiled_mlp import apply_tiled_mlp


def apply_stack(
    model: torch.nn.Module,
    cfg: Techniques,
    meter: str = "cpu",
    calibration: torch.Tensor | None = None,
) -> torch.nn.Module:
    """Turn a freshly built FP32 model into the row `cfg.stack` of the cumulative stack.

    With checkpointing, the model owns temporary offload files until
    `model.get_base_model().lowmem_checkpointing.close()` (or until it is garbage-collected).
    `meter` matters only there: under "simulated" the disk store keeps shapes only. The model's
    attention implementation becomes the row's GQA path (`lowmem.attention.IMPLEMENTATIONS`).
    """
    check_architecture(model.config)
    cfg.check_model(model.config.vocab_size)
    cfg = cfg.resolved(mlp_width=mlp_width(model.config))
    set_gqa(model, cfg.kernels.gqa, cfg.kernels.attention_block)
    if not cfg.enabled("lora"):
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    model = apply_lora(model, cfg)
    if cfg.enabled("quantize"):
        q = cfg.quant
        apply_quantize(
            model,
            q.bits,
            q.group_size,
            q.symmetric,
            q.backend,
            cfg.kernels.dequant_chunk,
            codebook=q.codebook,
            vocab_bits=q.vocab_bits,
            chosen=chosen_codes(model, q, meter, calibration),
            scale_search=q.scale_search and meter != "simulated",
            scale_dtype=q.scale_dtype,
        )
    return apply_after_quantize(model, cfg, meter)


def chosen_codes(model, q, meter: str, calibration: torch.Tensor | None) -> dict:
    """{parameter name: quantized weight} for the linears whose codes are not round-to-nearest:
    GPTQ's (`lowmem.gptq`), then LoftQ's for the adapted ones (`lowmem.loftq`, which also sets
    their adapters, from GPTQ's codes with quant_loftq_keep_codes); `q` is the QuantSettings."""
    chosen = {}
    if q.method == "gptq" and meter != "simulated":
        if calibration is None:
            raise ValueError(
                "quant_method='gptq' needs calibration token ids: apply_stack(..., calibration="
                "lowmem.gptq.calibration_ids(train_split, quant_calib_tokens))"
            )
        from lowmem.gptq import calibrate

        codes = calibrate(
            model,
            calibration,
            q.bits,
            q.group_size,
            q.codebook,
            q.gptq_sequential,
            q.gptq_act_order,
            q.scale_search,
            q.gptq_weighted_search,
        )
        chosen.update(codes)
    if q.loftq_iters:
        from lowmem.loftq import apply_loftq

        keep = chosen if q.loftq_keep_codes else None
        chosen.update(
            apply_loftq(
                model,
                q.loftq_iters,
                q.bits,
                q.group_size,
                q.codebook,
                keep=keep,
                scale_search=q.scale_search and meter != "simulated",
            )
        )
    return chosen


def apply_lora(model: torch.nn.Module, cfg: Techniques) -> torch.nn.Module:
    """The row's peft LoRA wrapper (the base frozen); draws the adapters' random init."""
    targets = "all-linear" if cfg.lora.targets == ("all-linear",) else list(cfg.lora.targets)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def apply_after_quantize(model: torch.nn.Module, cfg: Techniques, meter: str) -> torch.nn.Module:
    """The techniques that follow quantization (shared with `lowmem.loader`, which quantizes
    while it loads); `cfg` resolved (`Techniques.resolved`)."""
    # the one order dependency: quantize, then tile (the tiles hold the quantized down_proj),
    # then checkpoint (it streams and caches the layers it finds); each refuses the wrong order
    if cfg.kernels.mlp_tile:
        apply_tiled_mlp(model, cfg.kernels.mlp_tile)
    if cfg.enabled("fused_norm"):
        apply_fused_norm(model)
    if cfg.kernels.rope == "per_head":
        apply_per_head_rope(model)
    if cfg.enabled("checkpoint"):
        apply_checkpoint(
            model,
            cfg.checkpoint.offload,
            cfg.checkpoint.stream_weights,
            cfg.checkpoint.cache_policy,
            meter,
            cfg.checkpoint.offload_dir or None,
            cfg.checkpoint.offload_async,
            bool(cfg.checkpoint.offload_prefetch),
            cfg.kernels.loss_chunk if cfg.enabled("fused_loss") else 0,
            cfg.checkpoint.mlp_first,
            cfg.kernels.attention_rows,
        )
    return model


def benchmark_batch(cfg: StackConfig, vocab_size: int, device: torch.device | str = "cpu") -> dict:
    """Batch of `batch_size` x `seq_len` random tokens; the last `trainable_fraction` trainable.

    Labels are the inputs (the model shifts them); positions before the trainable tail are -100.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, vocab_size, (cfg.batch_size, cfg.seq_len), generator=gen)
    labels = ids.clone()
    n_masked = cfg.seq_len - math.ceil(cfg.trainable_fraction * cfg.seq_len)
    labels[:, :n_masked] = -100
    batch = {"input_ids": ids.to(device), "labels": labels.to(device)}
    if cfg.enabled("logits_mask"):  # flat positions whose shifted label is trainable
        t = cfg.seq_len - 1
        batch["trainable_index"] = torch.cat(
            [torch.arange(b * t + max(n_masked - 1, 0), (b + 1) * t) for b in range(cfg.batch_size)]
        ).to(device)
    return batch
