"""`make gpu-check`: the `cuda` meter beside the `simulated` one, on one GPU, in a few minutes.

Every number in the tables is the simulated meter's; this check measures the same cells on a
real GPU and prints the two side by side. Cells: both paper models (llama-3.2-3b,
qwen-2.5-3b) x every Table 1 row and `best` x 2048 tokens = 14, each under both meters, one
record per cell and meter in results/raw/gpu_check/ (the meter is part of the run id; recorded
cells are skipped unless --force). The cuda meter builds each model with random weights on the
GPU and reports the allocator's peak from a plain step; its `tracked` figure is the live-storage
tracker's from a second run of the same step (`lowmem.meter.measure_step`).

Memory: the largest cell is Qwen's FP32 full fine-tuning, 34.05 GiB simulated (the paper's
A100: 35.25 GiB), so an 80 GB GPU holds every cell with room. Time (expected, not yet
measured): the 14 simulated cells took 90 s in all in the committed table1 records; a GPU step
of a 3B model at 2048 tokens takes seconds, so model building and `best`'s chunk loops
dominate: well under 8 minutes on an H200.

A cell that leaves memory allocated after its record is written would inflate the next cell's
peak: the check says so, with the bytes, when it happens.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

from lowmem import paper, results
from lowmem.config import ROWS, StackConfig
from lowmem.grid import run_cells

EXPERIMENT = "gpu_check"
SEQ_LEN = 2048
METERS = ("cuda", "simulated")  # the GPU first: it is the scarce resource
GiB = 2**30


def cells() -> list[tuple[str, StackConfig]]:
    """Both paper models x every Table 1 row and `best`, at SEQ_LEN tokens."""
    return [(m, StackConfig(stack=s, seq_len=SEQ_LEN)) for m in paper.paper_models() for s in ROWS]


def comparison_table(records: list[dict]) -> str:
    """Markdown: one row per (model, row, T), the cuda allocator's peak (and the tracker's, on
    the GPU) beside the simulated peak, in GiB, and their ratio; a status where not ok."""
    by_cell: dict[tuple, dict[str, dict]] = {}
    for r in records:
        key = (r["model"], ROWS.index(r["config"]["stack"]), r["config"]["seq_len"])
        by_cell.setdefault(key, {})[r["meter"]] = r
    lines = [
        "| model | row | T | cuda GiB | tracked GiB | simulated GiB | cuda / simulated |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (model, row, seq_len), meters in sorted(by_cell.items()):
        cuda, sim = meters.get("cuda"), meters.get("simulated")
        cuda_gib, sim_gib = _gib(cuda, "peak_bytes"), _gib(sim, "peak_bytes")
        ratio = f"{cuda_gib / sim_gib:.3f}" if _ok(cuda) and _ok(sim) else "-"
        lines.append(
            f"| {model} | {ROWS[row]} | {seq_len} | {_shown(cuda, cuda_gib)} | "
            f"{_shown(cuda, _gib(cuda, 'tracked_peak_bytes'))} | {_shown(sim, sim_gib)} | "
            f"{ratio} |"
        )
    return "\n".join(lines)


def _ok(record: dict | None) -> bool:
    return record is not None and record["status"] == "ok"


def _gib(record: dict | None, key: str) -> float | None:
    value = record["metrics"].get(key) if _ok(record) else None
    return None if value is None else value / GiB


def _shown(record: dict | None, gib: float | None) -> str:
    if record is None:
        return "-"
    return f"{gib:.2f}" if gib is not None else record["status"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lowmem.gpu_check", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--force", action="store_true", help="re-measure recorded cells")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "gpu-check needs a CUDA GPU and torch sees none; run it on a GPU machine",
            file=sys.stderr,
        )
        return 1
    start = time.perf_counter()
    for meter in METERS:
        for cell in cells():
            model, cfg = cell
            run_cells(EXPERIMENT, [(model, cfg, meter)], "in-process", force=args.force)
            if meter == "cuda":
                _say_what_is_left(cell)
    wanted = {results.run_id(m, cfg, meter) for m, cfg in cells() for meter in METERS}
    records = [r for r in results.load_records(EXPERIMENT) if r["run_id"] in wanted]
    print(comparison_table(records))
    print(
        f"{len(records)} records in results/raw/{EXPERIMENT}/, {time.perf_counter() - start:.0f} s"
    )
    return 0 if len(records) == len(wanted) and all(_ok(r) for r in records) else 1


def _say_what_is_left(cell: tuple[str, StackConfig]) -> None:
    gc.collect()  # a reference cycle may still hold the model
    torch.cuda.empty_cache()
    left = torch.cuda.memory_allocated()
    if left:
        print(f"after {cell[0]} {cell[1].stack}: {left / 2**20:.1f} MiB still allocated")


if __name__ == "__main__":
    sys.exit(main())
