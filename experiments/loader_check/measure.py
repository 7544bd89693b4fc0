"""Tracked peak of loading SmolLM2-135M (plain FP32 HF folder) tensor by tensor under `best`,
beside the FP32 size of its weights; one record in results/raw/loader_check/.

    .venv/bin/python experiments/loader_check/measure.py   (needs `make assets`; ~10 s)
"""

import time

import torch

from lowmem import results
from lowmem.config import StackConfig
from lowmem.export import cached_base
from lowmem.loader import load_quantized
from lowmem.memory import LiveStorageTracker
from lowmem.models import read_config, weights_identity

MODEL = "smollm2-135m"
cfg = StackConfig.from_flat(stack="best", offload="memory")
path = cached_base(MODEL)
config = read_config(path)
with torch.device("meta"):
    from transformers import AutoModelForCausalLM

    fp32 = 4 * sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
tracker = LiveStorageTracker()  # nothing registered: everything the load creates counts
start = time.perf_counter()
with tracker:
    model = load_quantized(path, cfg)
elapsed = time.perf_counter() - start
record = results.cell_record(
    results.run_id(MODEL, cfg, "cpu") + "__load",
    MODEL,
    cfg,
    "cpu",
    {
        "load_peak_bytes": tracker.peak,
        "load_peak_op": tracker.peak_op,
        "load_peak_tensors": tracker.peak_tensors,
        "fp32_weight_bytes": fp32,
        "load_s": round(elapsed, 2),
    },
    weights=weights_identity(path),
)
print(results.write_record("loader_check", record))
print(f"load peak {tracker.peak / 2**20:.1f} MiB vs FP32 weights {fp32 / 2**20:.1f} MiB")
