"""Step time on real tensors: how much a technique costs in time, and where that time goes.

`time_stacks` builds one model per stack row, runs `warmup` + `steps` forward + loss + backward
steps on the same benchmark batch, and reports the median step time of each row relative to the
first (e.g. `+ Quantization` relative to `+ LoRA`). One extra profiled step per row attributes
time to the regions lowmem names with `torch.profiler.record_function` (e.g.
"lowmem.dequantize"), so a record says whether dequantization dominates. `paired` compares two
rows timed in the same rounds (experiments/peers/speed.py) round by round.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from tqdm.auto import tqdm

from lowmem.checkpoint import checkpointing_of
from lowmem.config import StackConfig, describe
from lowmem.loss import compute_loss
from lowmem.models import build_model
from lowmem.stack import apply_stack, benchmark_batch

REGIONS = ("lowmem.dequantize",)


def paired(steps_s: list[float], reference_s: list[float]) -> dict:
    """A row's step times against a reference's from the same rounds (interleaved runs): the
    per-round ratios, their median, in how many rounds the row was slower, and the two-sided
    exact sign test's p-value for "neither is faster" (small: one is faster in most rounds;
    a tie counts for neither). Per-round ratios cancel the drift that both rows of a round
    share, which min and median of each row alone do not."""
    if len(steps_s) != len(reference_s) or not steps_s:
        raise ValueError(
            f"bad rounds: {len(steps_s)} step times against {len(reference_s)} of the "
            "reference; need the same number, at least one"
        )
    ratios = [t / r for t, r in zip(steps_s, reference_s, strict=True)]
    slower = sum(x > 1 for x in ratios)
    decided = slower + sum(x < 1 for x in ratios)
    tail = sum(math.comb(decided, k) for k in range(min(slower, decided - slower) + 1))
    return {
        "ratios": ratios,
        "median": statistics.median(ratios),
        "slower_in": slower,
        "rounds": len(ratios),
        "sign_test_p": min(1.0, 2 * tail / 2**decided),
    }


def time_stacks(model_name: str, cfgs: list[StackConfig], steps: int = 3, warmup: int = 1) -> dict:
    """Median step seconds per config, ratio to the first, and profiled region shares."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"bad steps={steps}, warmup={warmup}: need steps >= 1, warmup >= 0")
    rows = {}
    for cfg in tqdm(cfgs, desc=f"timing {model_name}", unit="row"):
        torch.manual_seed(cfg.seed)
        model = apply_stack(build_model(model_name), cfg)
        batch = benchmark_batch(cfg, model.config.vocab_size)
        ckpt = checkpointing_of(model)
        try:
            times = [_step(model, batch, cfg) for _ in range(warmup + steps)][warmup:]
            shares = _region_shares(model, batch, cfg)
        finally:
            if ckpt is not None:
                ckpt.close()
        extra = {} if ckpt is None else {"offload": ckpt.stats()}
        rows[describe(cfg)] = {
            "step_s": statistics.median(times),
            "steps_s": times,
            **shares,
            **extra,
        }
        del model
    first = rows[describe(cfgs[0])]["step_s"]
    for row in rows.values():
        row["ratio"] = row["step_s"] / first
    return rows


def _step(model: torch.nn.Module, batch: dict, cfg: StackConfig) -> float:
    start = time.perf_counter()
    compute_loss(model, batch, cfg)[0].backward()  # the row's own head and loss
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _region_shares(model: torch.nn.Module, batch: dict, cfg: StackConfig) -> dict:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds = _step(model, batch, cfg)
    events = {e.key: e for e in prof.key_averages()}
    shares = {}
    for region in REGIONS:
        total_us = events[region].cpu_time_total if region in events else 0.0
        shares[f"{region}_s"] = total_us / 1e6
        shares[f"{region}_share"] = total_us / 1e6 / seconds
    shares["profiled_step_s"] = seconds
    return shares
