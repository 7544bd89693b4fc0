"""Converting SmolLM2-135M (plain FP32 HF folder) under `best`: bytes per parameter of the
converted directory, the conversion's tracked and whole-process peaks beside the largest
tensor and the FP32 model; one record in results/raw/convert_check/.

    .venv/bin/python experiments/convert_check/measure.py   (needs `make assets`; ~20 s)
"""

import json
import tempfile
import time
from pathlib import Path

from lowmem import results
from lowmem.config import StackConfig
from lowmem.convert import convert
from lowmem.converted import MANIFEST
from lowmem.export import cached_base
from lowmem.loader import skeleton
from lowmem.memory import LiveStorageTracker, peak_rss, reset_peak_rss
from lowmem.models import read_config, weights_identity

MODEL = "smollm2-135m"
cfg = StackConfig(stack="best")
path = cached_base(MODEL)
shapes = [p.shape for p in skeleton(read_config(path)).parameters()]
fp32 = 4 * sum(s.numel() for s in shapes)
largest = 4 * max(s.numel() for s in shapes)
with tempfile.TemporaryDirectory() as tmp:
    baseline = reset_peak_rss()
    tracker = LiveStorageTracker()  # nothing registered: everything the conversion creates
    start = time.perf_counter()
    with tracker:
        out = convert(path, Path(tmp) / "converted", cfg.stack)
    elapsed = time.perf_counter() - start
    rss = peak_rss()
    manifest = json.loads((out / MANIFEST).read_text())
    files = sum(f.stat().st_size for f in out.iterdir())
    shards = len(list(out.glob("lowmem-*.safetensors")))
record = results.cell_record(
    results.run_id(MODEL, cfg, "cpu") + "__convert",
    MODEL,
    cfg,
    "cpu",
    {
        "parameters": manifest["parameters"],
        "tensor_bytes": manifest["tensor_bytes"],
        "bytes_per_parameter": manifest["bytes_per_parameter"],
        "directory_bytes": files,
        "directory_bytes_per_parameter": files / manifest["parameters"],
        "shards": shards,
        "convert_peak_bytes": tracker.peak,
        "convert_peak_op": tracker.peak_op,
        "convert_peak_tensors": tracker.peak_tensors,
        "largest_tensor_fp32_bytes": largest,
        "fp32_weight_bytes": fp32,
        "baseline_rss_bytes": baseline,
        "convert_peak_rss_bytes": rss,
        "convert_s": round(elapsed, 2),
    },
    weights=weights_identity(path),
)
print(results.write_record("convert_check", record))
m = record["metrics"]
print(
    f"{m['bytes_per_parameter']:.4f} B/parameter ({m['directory_bytes_per_parameter']:.4f} with "
    f"config, tokenizer, headers); convert peak {tracker.peak / 2**20:.1f} MiB tracked vs largest "
    f"tensor {largest / 2**20:.1f} MiB and FP32 weights {fp32 / 2**20:.1f} MiB; process peak RSS "
    f"{rss / 2**20:.0f} MiB over a {baseline / 2**20:.0f} MiB baseline"
)
