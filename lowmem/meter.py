"""The step meter: the peak memory of whole steps, one implementation for every caller.

`StepMeter` watches steps of a run (`lowmem.train`: forward, backward and the optimizer of
every accumulated micro-batch); `measure_step` runs one forward + loss + backward through it and
returns a record's metrics (`measure`, the grids, the notebooks, the Trainer test). Meters:
`lowmem.memory` (SPEC §4).

Memory in training: the meter watches the whole step, optimizer included. AdamW keeps two FP32
moments per trainable parameter, created in the first step and resident from then on.
Llama-3.2 3B, r = 16 on q_proj and v_proj: 4.59e6 x (4 B weight + 4 B gradient + 8 B moments) =
70 MiB, small beside the activations, so the peak usually falls in backward, which from step 2
on carries the moments too. `cpu`: one LiveStorageTracker for the whole run, its peak reset at
each step (storages that exist before it, parameters, batches, optimizer state loaded from a
checkpoint, are registered); `cuda`: torch.cuda.max_memory_allocated, reset at each step.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

from lowmem.checkpoint import checkpointing_of
from lowmem.memory import (
    GiB,
    LiveStorageTracker,
    module_tensors,
    offload_stores,
    peak_rss,
    reset_peak_rss,
)


class StepMeter:
    """Peak bytes of whole steps: the LiveStorageTracker (cpu, simulated; `tracked=True` on
    cuda too) or the CUDA allocator. One for a run: `with meter.step(batches): ...`, then
    `result()`; `steps` > 0 measures only the first `steps` steps (0: every step)."""

    def __init__(
        self,
        meter: str,
        model: torch.nn.Module,
        optimizer=None,
        steps: int = 0,
        tracked: bool | None = None,
    ) -> None:
        self.meter = meter
        self.remaining = steps or None  # None: measure every step
        self.measured = False
        tracked = meter != "cuda" if tracked is None else tracked
        self.tracker = LiveStorageTracker() if tracked else None
        if self.tracker is not None:  # what exists before the first measured step
            self.tracker.register(module_tensors(model))
            for state in optimizer.state.values() if optimizer is not None else ():
                self.tracker.register(state.values())  # loaded from a checkpoint

    @contextlib.contextmanager
    def step(self, batches: list[dict[str, torch.Tensor]]) -> Iterator[None]:
        self.measured = self.remaining != 0
        if not self.measured:
            yield
            return
        if self.remaining:
            self.remaining -= 1
        if self.tracker is None:
            torch.cuda.reset_peak_memory_stats()
            yield
            return
        t = self.tracker
        t.peak, t.peak_phase, t.phase_peaks = t.live, "start", {}
        for batch in batches:
            t.register(batch.values())
        with t:
            yield

    def mark(self, phase: str) -> None:
        if self.tracker is not None and self.measured:
            self.tracker.mark(phase)

    def result(self, attribution: bool = False) -> dict:
        """The last measured step's peak and its phase; with `attribution`, also the op that
        set it, the largest tensors then and each phase's peak (tracked meters only)."""
        if not self.measured:
            return {"peak_bytes": None, "peak_phase": None}
        if self.tracker is None:
            return {"peak_bytes": torch.cuda.max_memory_allocated(), "peak_phase": None}
        t = self.tracker
        out = {"peak_bytes": t.peak, "peak_phase": t.peak_phase}
        if attribution:
            out.update(
                peak_op=t.peak_op, peak_tensors=t.peak_tensors, phase_peak_bytes=dict(t.phase_peaks)
            )
        return out


def measure_step(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    meter: str,
    keep_outputs: bool = True,
    loss_fn=None,
) -> dict:
    """Run forward + loss + backward once; return the meter's peak and where it fell.

    Call inside `meter_context(meter)`, with `model` and `batch` built there. keep_outputs=True
    holds the model's output (logits: T x V) through backward, as `out = model(...);
    out.loss.backward()` does; False keeps only the loss. `loss_fn(model, batch)` returns
    (loss, output); the default calls the model with the batch (labels included).

    Under "cuda" the step runs twice: first plain, for the allocator's peak and the loss; then,
    from the same gradients (none), generator states and offload counters, under the tracker.
    The gradients left behind are one step's.
    """
    step = functools.partial(_one_step, model, batch, keep_outputs, loss_fn)
    if meter == "cuda":
        plain = _plain_cuda_step(model, batch, step)
    steps = StepMeter(meter, model, tracked=True)
    rss_start = reset_peak_rss()
    with steps.step([batch]):
        resident = steps.tracker.live  # parameters, buffers and the batch before the step
        loss = step(steps.mark)
    tracked = steps.result(attribution=True)
    metrics = {
        "peak_bytes": tracked["peak_bytes"],
        "peak_gib": tracked["peak_bytes"] / GiB,
        "peak_phase": tracked["peak_phase"],
        "peak_op": tracked["peak_op"],
        "peak_tensors": tracked["peak_tensors"],
        "phase_peak_bytes": tracked["phase_peak_bytes"],
        "resident_bytes": resident,
        "loss": None if meter == "simulated" else float(loss.detach()),
    }
    if meter == "cuda":
        metrics["tracked_peak_bytes"] = metrics["peak_bytes"]
        metrics.update(plain, peak_gib=plain["peak_bytes"] / GiB)
    if meter == "cpu":
        metrics["rss_start_bytes"] = rss_start
        metrics["peak_rss_bytes"] = peak_rss()
    return metrics


def _one_step(model, batch, keep_outputs, loss_fn, mark=lambda phase: None) -> torch.Tensor:
    """Forward + loss + backward; `mark(phase)` names what follows. Returns the loss."""
    mark("forward")
    loss, out = loss_fn(model, batch) if loss_fn else _model_loss(model, batch)
    if not keep_outputs:
        del out
    mark("backward")
    loss.backward()
    return loss


def _plain_cuda_step(model: torch.nn.Module, batch: dict, step) -> dict:
    """The allocator's peaks and the loss of `step()` run with no dispatch mode; then undo what
    the step left, so that a second run starts where this one did."""
    devices = sorted({t.device.index for t in batch.values() if t.device.type == "cuda"})
    counters = [(s, dict(s.stats)) for s in offload_stores(model)]
    state = checkpointing_of(model)
    recompute_s = state.recompute_s if state is not None else 0.0
    with torch.random.fork_rng(devices=devices):  # run 2 draws what run 1 drew (LoRA dropout)
        torch.cuda.reset_peak_memory_stats()
        loss = float(step().detach())
        peaks = {
            "peak_bytes": torch.cuda.max_memory_allocated(),
            "reserved_peak_bytes": torch.cuda.max_memory_reserved(),
        }
    # what a step leaves: gradients (parameters, LoRA or not, and a batch leaf such as
    # study.py's hidden states) and offload counters; a complete backward has consumed every
    # stored layer input and cached output, and streamed weights are kept by design
    for t in [*model.parameters(), *batch.values()]:
        t.grad = None
    for c, before in counters:
        c.stats.update(before)
    if state is not None:
        state.recompute_s = recompute_s
    return {**peaks, "loss": loss}


def _model_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, object]:
    out = model(**batch)
    return out.loss, out
