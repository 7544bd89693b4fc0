"""The whole process beside the step: resident memory by kind, disk reads, time by region.

A step's tracked peak (`lowmem.memory.LiveStorageTracker`) counts tensor storages; the
operating system sees more: the interpreter and its libraries (torch, transformers: ~0.5 GB
before a model exists), pages of files the process maps (safetensors shards read through
mmap stay resident until unmapped: RssFile), and what glibc's malloc keeps after tensors die
(freed arenas not returned: part of RssAnon). `ProcessWatch` follows a training run:

- `ProcessRss` figures, none hidden by a reset: the baseline (RSS when the model begins to
  load: interpreter, libraries, tokenizer, data), the setup peak (loading and applying the
  stack), the step peak (the largest of the steps', each from a reset high-water mark) and the
  run peak (the largest of these and of every moment between them);
- per step: peak RSS, RSS anonymous / file-backed / shared at the step's end
  (/proc/self/status), bytes read from disk (/proc/self/io read_bytes: from the device, page
  cache misses only; rchar: every byte read() returned, page cache hits included; pages
  faulted in through mmap count in neither) and seconds spent in the named regions
  (`clock`): dequantization, recompute, waiting on the offload store.

Regions are timed by `lowmem.timers.clock` (dequantization) and by lowmem.checkpoint and the
offload stores (recompute, I/O wait).

Worked example, Llama-3.2 3B, `best`, 1024 tokens, converted directory, 1 thread (see
experiments/edge): tracked step peak ~0.26 GiB; the process's RSS and the shares of time are
in experiments/edge/README.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import statistics
import time
from collections.abc import Iterator

from lowmem.checkpoint import checkpointing_of
from lowmem.memory import (
    GiB,
    ProcessRss,
    _status_bytes,
    offload_stores,
    peak_rss,
    reset_peak_rss,
)
from lowmem.timers import REGION_S

RSS_KINDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")
IO_KEYS = ("rchar", "read_bytes", "wchar", "write_bytes")


def rss_kinds() -> dict[str, int]:
    """Resident bytes now, by kind: {"rss", "rss_anon", "rss_file", "rss_shmem"} (Linux)."""
    names = {"VmRSS": "rss", "RssAnon": "rss_anon", "RssFile": "rss_file", "RssShmem": "rss_shmem"}
    return {names[k]: _status_bytes(k) or 0 for k in RSS_KINDS}


def io_counters() -> dict[str, int]:
    """/proc/self/io (zeros where the kernel does not provide it)."""
    out = dict.fromkeys(IO_KEYS, 0)
    with contextlib.suppress(OSError):
        with open("/proc/self/io") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in out:
                    out[key] = int(value)
    return out


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 128 * 2**10  # bytes; glibc's initial value, here kept fixed


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve every allocation of `threshold` bytes or more with its own mmap, returned to
    the kernel when freed (as MALLOC_MMAP_THRESHOLD_=131072 does); False where there is no
    glibc, or where the environment already sets the threshold (it wins).

    glibc starts at 128 KiB but raises the threshold to the size of each mmapped block freed,
    up to 32 MiB, so from the first freed activation on, every tensor below 32 MiB (a layer
    input at 1024 tokens is 12 MiB) comes from the heap and stays there when freed: Llama-3.2
    3B, `best`, 1024 tokens, step peak RSS 1.63 GiB with the default, 1.00 GiB with the
    threshold fixed, against a tracked step peak of 0.29 GiB (experiments/edge)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    with contextlib.suppress(OSError, AttributeError):
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    return False


def trim_malloc() -> bool:
    """Return glibc's free heap memory to the kernel (malloc_trim(0)); False where there is
    no glibc."""
    with contextlib.suppress(OSError, AttributeError):
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    return False


@contextlib.contextmanager
def loading() -> Iterator[ProcessRss]:
    """`ProcessRss` around building or loading a model: baseline at entry, setup peak at exit.
    glibc's malloc keeps freed heap memory for reuse (RSS); it is handed back before the
    baseline (what tokenizing the data freed: 0.27 GB of a 0.88 GB process for Shakespeare
    at 1024 tokens) and after loading (row blocks, weights streamed to the offload store), and
    from here on large blocks are mapped on their own (`fix_mmap_threshold`): this changes the
    allocator of the whole process, which is what a training process wants."""
    trim_malloc()
    fix_mmap_threshold()
    rss = ProcessRss()
    rss.start()
    start = time.perf_counter()
    yield rss
    trim_malloc()
    rss.setup_done()
    rss.setup_s = time.perf_counter() - start


def settle(model) -> None:
    """Wait for a model's offload stores to finish writing what loading put there (the
    streamed weights), so that the setup figures include it rather than the first step."""
    for store in offload_stores(model):
        if hasattr(store, "flush"):
            store.flush()


def offload_stats(model) -> dict:
    """The cumulative counters of a model's checkpointing (recompute, offload stores)."""
    ckpt = checkpointing_of(model)
    return {} if ckpt is None else ckpt.stats()


def process_summary(entries: list[dict], watch: ProcessWatch) -> dict:
    """A run summary's whole-process part: the RSS figures and, per step (median over the
    steps of the log), disk reads and the seconds of each region and their share of the step."""
    steps = [e["process"] for e in entries if "process" in e]
    out = {"process": watch.figures()}
    out["process"]["run_peak_rss_gib"] = out["process"]["run_peak_rss_bytes"] / GiB
    if steps:
        med = {k: statistics.median(s[k] for s in steps) for k in steps[-1]}
        seconds = med["timed_step_s"] or float("nan")
        shares = {
            f"{k.removesuffix('_s')}_share": med[k] / seconds
            for k in ("dequantize_s", "recompute_s", "io_wait_s")
        }
        out["process_step_median"] = med | shares
    return out


class ProcessWatch:
    """Whole-process figures of a run: `ProcessRss` (started before loading, or now), then
    `with watch.step(): ...` around each step, `step_result()` after it, `figures()` at the
    end."""

    def __init__(self, rss: ProcessRss | None = None) -> None:
        if rss is None:  # nothing measured before the run: its baseline and setup are now
            rss = ProcessRss()
            rss.start()
            rss.setup_done()
        self.rss = rss
        self.between = 0  # the peak of every moment outside setup and the steps
        self.step_peaks: list[int] = []
        self.last: dict = {}

    @contextlib.contextmanager
    def step(self, stats=lambda: {}) -> Iterator[None]:
        """Watch one step; `stats()` gives cumulative counters (offload store, recompute)
        read before and after."""
        self.between = max(self.between, peak_rss())
        reset_peak_rss()
        io, regions, before = io_counters(), dict(REGION_S), stats()
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        peak = peak_rss()
        self.step_peaks.append(peak)
        after, io_after = stats(), io_counters()
        delta = {k: after[k] - before.get(k, 0) for k in after}
        self.last = {
            "peak_rss_bytes": peak,
            **{f"{k}_bytes": v for k, v in rss_kinds().items()},
            **{f"io_{k}": io_after[k] - io[k] for k in IO_KEYS},
            "dequantize_s": REGION_S["dequantize"] - regions.get("dequantize", 0.0),
            "recompute_s": delta.get("recompute_s", 0.0),
            "io_wait_s": sum(v for k, v in delta.items() if k.endswith("io_wait_s")),
            "offload_read_bytes": sum(v for k, v in delta.items() if k.endswith("bytes_read")),
            "timed_step_s": seconds,
        }

    def step_result(self) -> dict:
        return dict(self.last)

    def figures(self) -> dict:
        """Baseline, setup, step and run peaks (bytes), as `ProcessRss.figures`, plus now."""
        step_peak = max(self.step_peaks, default=0)
        out = self.rss.figures(step_peak)
        out["run_peak_rss_bytes"] = max(out["run_peak_rss_bytes"], self.between, peak_rss())
        out["setup_s"] = getattr(self.rss, "setup_s", 0.0)
        return {**out, **{f"end_{k}_bytes": v for k, v in rss_kinds().items()}}
