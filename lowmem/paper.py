"""The paper's Table 1 (arXiv 2606.19528): peak GiB of one forward + backward, A100 80 GB.

Rows are cumulative (keys of lowmem.config.STACK); None is a cell the paper reports as OOM.
"""

from __future__ import annotations

CONTEXTS = (1024, 2048, 4096, 8192, 16384)
A100_BYTES = 80 * 2**30  # a peak above this is an OOM on the paper's GPU

_ROWS = ("baseline", "lora", "quantize", "checkpoint", "softmax_approx", "logits_mask")

_TABLE1 = {
    "llama-3.2-3b": (
        (27.60, 29.97, 47.96, None, None),
        (19.10, 26.20, 40.41, 68.83, None),
        (8.80, 14.68, 27.48, 53.07, None),
        (2.37, 3.33, 6.29, 12.21, 24.05),
        (1.30, 2.43, 5.41, 11.58, 23.79),
        (0.70, 1.02, 1.59, 3.24, 6.95),
    ),
    "qwen-2.5-3b": (
        (27.11, 35.25, 57.87, None, None),
        (21.68, 30.51, 48.38, None, None),
        (11.21, 19.46, 36.03, 69.17, None),
        (2.06, 3.79, 7.29, 14.27, 28.24),
        (1.26, 3.03, 6.58, 13.79, 27.98),
        (0.66, 1.01, 1.71, 3.90, 8.34),
    ),
}

# The headline "up to 26x (Llama) and 28x (Qwen)": + LoRA row / final row at one context.
HEADLINE = {"llama-3.2-3b": (2048, 25.7), "qwen-2.5-3b": (4096, 28.3)}


def paper_models() -> tuple[str, ...]:
    return tuple(_TABLE1)


def paper_gib(model: str, stack: str, seq_len: int) -> float | None:
    """The paper's cell in GiB, None for OOM; KeyError if the paper has no such cell."""
    if seq_len not in CONTEXTS or stack not in _ROWS or model not in _TABLE1:
        raise KeyError(f"the paper has no cell ({model}, {stack}, {seq_len})")
    return _TABLE1[model][_ROWS.index(stack)][CONTEXTS.index(seq_len)]
