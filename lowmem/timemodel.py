"""A simple step-time model for the planner, fitted from the committed speed records.

Step seconds = step FLOPs / rate x the measured cost of quantization, of checkpointing with
its offload target and weight streaming, and of best over checkpoint, each a ratio of two
step times of one `python -m lowmem speed` run (SmolLM2-135M, 256 tokens, one thread:
`results/raw/{quant,checkpoint,best}_speed/`). The rate is the `lora` step's FLOPs per second.
Knobs the records do not time apart (MLP tile, loss and dequantization chunks, cache policy)
cost nothing in this model; at 256 tokens the offload and streaming ratios differ by less than
the run-to-run spread (experiments/LOG.md), so the model mostly ranks by work. Its purpose is
to order candidates that fit, not to promise seconds.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lowmem import results
from lowmem.config import StackConfig
from lowmem.models import load_config


@dataclasses.dataclass(frozen=True)
class TimeModel:
    """Step seconds = step FLOPs / rate x the measured cost of checkpointing, disk and
    streaming, fitted from the committed `*_speed` records (SmolLM2-135M, one thread)."""

    flops_per_s: float
    factors: dict

    @staticmethod
    def fit(raw: Path | None = None) -> TimeModel:
        raw = raw or results.REPO_ROOT / "results" / "raw"  # the committed speed records
        quant = _speed(raw, "quant_speed")
        ckpt = _speed(raw, "checkpoint_speed")
        best = _speed(raw, "best_speed")
        seq_len = 256
        rate = _step_flops("smollm2-135m", seq_len, 1) / quant["lora"]["step_s"]
        q = quant["quantize"]["step_s"]
        factors = {
            ("memory", False): ckpt["checkpoint:offload=memory,stream_weights=false"]["step_s"] / q,
            ("memory", True): ckpt["checkpoint:offload=memory"]["step_s"] / q,
            ("disk", True): ckpt["checkpoint"]["step_s"] / q,
            "quantize": q / quant["lora"]["step_s"],
            "best_vs_checkpoint": best["best"]["step_s"] / best["checkpoint"]["step_s"],
        }
        factors[("disk", False)] = factors[("disk", True)]  # not measured apart: disk as streamed
        return TimeModel(rate, factors)

    def predict(self, model: str, cfg: StackConfig) -> float:
        f = self.factors
        ckpt = f[(cfg.checkpoint.offload, cfg.checkpoint.stream_weights)]
        work = _step_flops(model, cfg.seq_len, cfg.batch_size) / self.flops_per_s
        return work * f["quantize"] * ckpt * f["best_vs_checkpoint"]


def _speed(raw: Path, experiment: str) -> dict:
    files = sorted((raw / experiment).glob("*.json"))
    if not files:
        raise ValueError(f"no speed record under {str(raw / experiment)!r}: make experiments")
    rows = json.loads(files[0].read_text())["metrics"]
    return {k.lower(): v for k, v in rows.items()}  # older records wrote False, not false


def _step_flops(model: str, seq_len: int, batch: int) -> float:
    """Forward + backward FLOPs of a step: 6 N T for the weights, 12 L T^2 d for attention."""
    c = load_config(model)
    d, L, f, V = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size
    kv = d * c.num_key_value_heads // c.num_attention_heads
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f
    n = L * per_layer + V * d
    return batch * (6 * n * seq_len + 12 * L * seq_len**2 * d / 2)  # causal: half of T^2
