"""Two helpers the technique notebooks (notebooks/01..06) share; each is used by several.

- `loss_and_grads`: one forward + loss + backward of a stack row on real tensors, returning the
  loss and every trainable gradient, so that a notebook can put an optimized row beside the
  plain computation (`plain_loss=True`: `lowmem.reference.causal_lm_loss` on the model's full
  logits) and check that they agree. Weights are seeded, so two calls with the same model and
  seed start from the same numbers whatever the row; peft starts LoRA's B at zero, which would
  leave most gradients trivially zero, so B is drawn from N(0, 0.02^2) here.
- `measure_head_loss`: the LM head + loss alone, under a meter. The decoder is left out, so the
  bytes a loss technique saves are seen exactly: B x T x D hidden states (with grad) and the
  benchmark labels go in; the peak minus the resident inputs is what the head, the loss and
  their backward held, e.g. three N x V FP32 tensors = 12 N V bytes for the plain
  cross-entropy. The head has the model's shape (V x D), random, frozen, quantized as the row
  says.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from lowmem.checkpoint import checkpointing_of
from lowmem.config import StackConfig
from lowmem.loss import compute_loss
from lowmem.memory import meter_context
from lowmem.meter import measure_step
from lowmem.models import build_model, load_config
from lowmem.quant_linear import QuantLinear
from lowmem.reference import causal_lm_loss
from lowmem.stack import apply_stack, benchmark_batch


def loss_and_grads(
    model_name: str, cfg: StackConfig, plain_loss: bool = False, seed: int = 0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, {name: grad}) of one step of row `cfg` on random weights, real tensors (CPU)."""
    torch.manual_seed(seed)
    model = apply_stack(build_model(model_name), cfg)
    torch.manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    batch = benchmark_batch(cfg, model.config.vocab_size)
    try:
        if plain_loss:
            logits = model(input_ids=batch["input_ids"]).logits
            loss = causal_lm_loss(logits, batch["labels"])
        else:
            loss = compute_loss(model, batch, cfg)[0]
        loss.backward()
    finally:
        if (ckpt := checkpointing_of(model)) is not None:
            ckpt.close()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def measure_head_loss(
    model_name: str,
    cfg: StackConfig,
    meter: str,
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor],
) -> dict:
    """measure_step's metrics for `loss_fn(head, batch)` alone, at the model's D and V.

    batch: "hidden" (B x T x D, requires grad), "labels" (B x T, the benchmark's: the last
    `trainable_fraction` trainable) and "trainable_index" (lowmem.logits_mask's flat index).
    """
    config = load_config(model_name)
    d, vocab = config.hidden_size, config.vocab_size
    with meter_context(meter) as dev:
        torch.manual_seed(cfg.seed)
        head = torch.nn.Linear(d, vocab, bias=False, device=dev).requires_grad_(False)
        if cfg.enabled("quantize"):
            head = QuantLinear.from_linear(
                head, cfg.quant.bits, cfg.quant.group_size, cfg.quant.symmetric
            )
        batch = benchmark_batch(dataclasses.replace(cfg, stack="logits_mask"), vocab, dev)
        del batch["input_ids"]
        batch["hidden"] = torch.randn(cfg.batch_size, cfg.seq_len, d, device=dev)
        batch["hidden"].requires_grad_(True)
        return measure_step(
            head, batch, meter, keep_outputs=False, loss_fn=lambda m, b: (loss_fn(m, b), None)
        )
