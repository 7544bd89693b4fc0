"""Peak memory of one training step, measured three ways (SPEC §4).

Peak memory = the maximum, over one forward + loss + backward, of the bytes held by live tensor
storages on the compute device: weights, LoRA parameters and gradients, activations saved for
backward, temporaries. It is what `torch.cuda.max_memory_allocated` reports on a GPU.

- `cuda`: the CUDA caching allocator's peak, allocated and reserved (the paper's meter), from a
  plain step with no dispatch mode active (under one, some backward formulas run out of place
  and the allocator would see their extra copies); the tracker's attribution (phase, op, largest
  tensors) comes from a second, tracked run of the same step on the same model.
- `cpu`: `LiveStorageTracker` on real tensors: a TorchDispatchMode that adds each new output
  storage's bytes the first time it sees it and subtracts them when the storage dies. It is
  deterministic; the process's peak RSS is reported beside it as a cross-check.
- `simulated`: the same tracker under FakeTensorMode. Fake tensors carry shape, dtype and a
  storage size but no data, so a 3B model at 16384 tokens is measured on a laptop in seconds;
  on models small enough to run for real, `simulated` equals `cpu` to the byte.

Worked example (simulated, Llama-3.2 3B, full FP32 fine-tuning, 1024 tokens): weights 11.97 GiB,
peak 27.58 GiB at the end of backward, when every weight has its gradient (another 11.97 GiB) and
the tied embedding's two gradient contributions (1.47 GiB each) are being summed.
"""

from __future__ import annotations

import contextlib
import resource
import threading
import weakref
from collections.abc import Iterable, Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import masking_utils

from lowmem.checkpoint import checkpointing_of

METERS = ("cuda", "cpu", "simulated")
GiB = 2**30


class LiveStorageTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages; remembers the peak and the phase it fell in.

    Storages created before the tracker is entered (parameters, inputs) or outside the
    dispatcher (torch.load, from_numpy) must be passed to `register`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.phase = "setup"
        self.peak_phase = "setup"
        self.peak_op = ""  # the op whose output set the peak, e.g. "aten.mm.default"
        self.phase_peaks: dict[str, int] = {}
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._shape: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.peak_tensors: list[dict] = []  # the largest live storages near the peak
        self._snapshot_at = 0
        self._lock = threading.Lock()  # storages may die on an offload worker thread

    def register(self, tensors: Iterable[object]) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t)

    def mark(self, phase: str) -> None:
        """Name the phase that the following allocations belong to."""
        self.phase = phase
        self.phase_peaks.setdefault(phase, self.live)

    def _add(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":  # shapes only, no memory (e.g. a model built to read names)
            return
        storage = t.untyped_storage()
        if storage in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen[storage] = nbytes
        self._shape[storage] = (tuple(t.shape), str(t.dtype).removeprefix("torch."))
        weakref.finalize(storage, self._free, nbytes)
        with self._lock:
            self.live += nbytes
        if self.live > self.phase_peaks.get(self.phase, 0):
            self.phase_peaks[self.phase] = self.live
        if self.live > self.peak:
            self.peak, self.peak_phase = self.live, self.phase
            if self.live > 1.01 * self._snapshot_at:  # within 1% of the peak, cheaply
                self._snapshot()

    def _snapshot(self, top: int = 8) -> None:
        """Group live storages by (shape, dtype); keep the `top` groups by bytes."""
        self._snapshot_at = self.live
        groups: dict[tuple, list[int]] = {}
        for storage, nbytes in list(self._seen.items()):
            g = groups.setdefault(self._shape.get(storage, ((), "?")), [0, 0])
            g[0], g[1] = g[0] + 1, g[1] + nbytes
        ranked = sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]
        self.peak_tensors = [
            {"shape": list(shape), "dtype": dtype, "count": c, "bytes": b}
            for (shape, dtype), (c, b) in ranked
        ]

    def _free(self, nbytes: int) -> None:
        with self._lock:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        peak = self.peak
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        if self.peak > peak:
            self.peak_op = str(func)
        return out


def module_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """What a model holds on its device: parameters, buffers, and what its checkpointing keeps
    in an in-memory offload store (streamed weights with offload="memory")."""
    yield from module.parameters()
    yield from module.buffers()
    for store in offload_stores(module):
        yield from store.resident()


def offload_stores(model: torch.nn.Module) -> list:
    """The offload stores of a model `lowmem.checkpoint` changed (none otherwise)."""
    state = checkpointing_of(model)
    return [s for s in (state.store, state.weights) if s is not None] if state else []


@contextlib.contextmanager
def meter_context(meter: str) -> Iterator[torch.device]:
    """Where a meter's model and batch live: enter it around building and running the step."""
    if meter not in METERS:
        raise ValueError(f"unknown meter {meter!r}; choose one of {', '.join(METERS)}")
    if meter == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("meter 'cuda' needs a CUDA GPU; none is visible to torch")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        yield torch.device("cuda")
    elif meter == "simulated":
        with FakeTensorMode(), _module_to_is_noop(), _unpacked_sequences():
            yield torch.device("cpu")
    else:
        yield torch.device("cpu")


@contextlib.contextmanager
def _module_to_is_noop() -> Iterator[None]:
    # torch 2.13: nn.Module.to() cannot swap parameters for fake tensors ("Couldn't swap"), and
    # peft calls it while injecting adapters. Under the simulated meter everything already sits
    # on the one fake CPU device in FP32, so `.to` has nothing to do.
    original = torch.nn.Module.to
    torch.nn.Module.to = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.nn.Module.to = original


@contextlib.contextmanager
def _unpacked_sequences() -> Iterator[None]:
    # Without a KV cache, transformers looks at position_ids to detect packed sequences; the
    # check reads data, which fake tensors lack, so it would assume packing and build a T x T
    # FP32 mask (1 GiB at 16384 tokens) that a real run never builds. Our batches are never
    # packed, so under the simulated meter the answer is known: no packing.
    original = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


def allocator_peak_bytes(step) -> int:
    """Peak bytes the CPU allocator itself reports while `step()` runs, above where it started.

    Read from the profiler's memory events: no TorchDispatchMode is active, so PyTorch takes
    the paths a plain run takes. (Under any dispatch mode, and on fake tensors, some of its
    backward formulas switch to out-of-place variants; `tests/test_memory.py` checks that the
    tracker's peak equals this one for every row.)
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


class ProcessRss:
    """The whole process's resident memory around a measured step, no phase hidden by a reset.

    `start()`: the baseline (interpreter and libraries, before the model exists) and the peak
    so far; `setup_done()`: the peak of building / loading / applying the stack. The step's own
    peak follows (`measure_step` resets the high-water mark first); `figures(step_peak)` puts
    the three beside the run's peak (the largest of them)."""

    def start(self) -> None:
        self.before_peak = peak_rss()
        self.baseline = reset_peak_rss()

    def setup_done(self) -> None:
        self.setup_peak = peak_rss()

    def figures(self, step_peak: int) -> dict:
        return {
            "baseline_rss_bytes": self.baseline,
            "setup_peak_rss_bytes": self.setup_peak,
            "step_peak_rss_bytes": step_peak,
            "run_peak_rss_bytes": max(self.before_peak, self.setup_peak, step_peak),
        }


def reset_peak_rss() -> int:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0) and return the current RSS."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    return _status_bytes("VmRSS") or 0


def peak_rss() -> int:
    hwm = _status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_bytes(key: str) -> int | None:
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    return None
