"""Tensor stores: where checkpoints, cached activations and streamed weights wait off-device.

One interface (`put`, `prefetch`, `get`, `close`), three backends:

- `MemoryStore` keeps the tensors themselves: the reference, and what "no offload" means.
- `DiskStore` writes each entry as a safetensors file in a per-run temporary directory. Writes
  run on a background thread so compute continues; `prefetch` starts a read early (backward
  asks for the next entries in reverse order); an entry read with `keep=False` is deleted as it
  is consumed. Buffers for reads are allocated on the caller's thread, so a memory meter sees
  them; the worker only fills them. The store writes the files itself (the safetensors
  layout, each tensor's memory written as it is, where `safetensors.torch.save_file` first
  copies it to bytes) and keeps each entry's layout, so a read opens its file once and parses
  no header.
- `SimulatedStore` keeps only shapes and dtypes (the `simulated` meter has no data to write);
  `get` hands back new empty (fake) tensors of the same shape.

Memory arithmetic: on Llama-3.2 3B at 16384 tokens, one layer input is 16384 x 3072 x 4 B =
192 MiB; 28 of them (5.25 GiB) sit on disk instead of in memory, and the INT4 weights of the 28
layers (1.62 GiB) are read back one layer at a time.

The root folder is `offload_dir`, or the system temp folder's `lowmem-offload` when it is ""
(created on demand). `check_offload_root` refuses an `offload_dir` that does not exist, is not
a folder or is not writable, with one line, before anything is written; nothing creates it.

A run's directory is `lowmem-run-<pid>-<start>-<random>` (start: the owner's start time in
clock ticks since boot, from /proc where there is one). It is removed on close, on exceptions
and on Ctrl-C (the owner closes the store in a `finally`). One left behind by `kill -9` is
reclaimed by `remove_stale_dirs`: when checkpointing sets up its stores (every run that uses a
store root: any meter, memory or disk offload), when a DiskStore is created, and on demand by
`python -m lowmem clean`. Only this user's directories whose owner is gone go; a PID reused by
another process does not keep a directory alive, since that process started at another time.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from lowmem.tensor_files import NAMES, as_bytes, pread_into

OFFLOADS = ("memory", "disk")
_PREFIX = "lowmem-run-"

Entry = dict[str, torch.Tensor]
Layout = dict[str, tuple[torch.dtype, tuple[int, ...], int]]  # name: dtype, shape, file offset


class OffloadError(RuntimeError, ValueError):
    """The store cannot hold what it was given (no space, unwritable directory, ...).

    Also a ValueError: a bad `offload_dir` is bad input, refused with one line like the rest."""


class MemoryStore:
    """Keeps entries as they are."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self.stats = {"bytes_written": 0, "bytes_read": 0, "io_wait_s": 0.0}

    def put(self, key: str, entry: Entry) -> None:
        self._entries[key] = entry
        self.stats["bytes_written"] += _nbytes(entry)

    def prefetch(self, key: str) -> None:
        """Nothing to fetch: every entry is already in memory."""

    def get(self, key: str, keep: bool = False) -> Entry:
        entry = self._entries[key] if keep else self._entries.pop(key)
        self.stats["bytes_read"] += _nbytes(entry)
        return entry

    def close(self) -> None:
        self._entries.clear()

    def resident(self) -> list[torch.Tensor]:
        """The tensors this store keeps on the device: a meter counts them as resident."""
        return [t for entry in self._entries.values() for t in entry.values()]


class SimulatedStore(MemoryStore):
    """Keeps (shape, dtype) only: what leaves the device costs nothing, as on a real disk.

    Buffers appear when a `DiskStore` would allocate them: at `prefetch`, or at `get`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._prefetched: dict[str, Entry] = {}

    def put(self, key: str, entry: Entry) -> None:
        self._entries[key] = {k: (tuple(t.shape), t.dtype) for k, t in entry.items()}
        self.stats["bytes_written"] += _nbytes(entry)

    def prefetch(self, key: str) -> None:
        if key in self._entries and key not in self._prefetched:
            meta = self._entries[key]
            self._prefetched[key] = {k: torch.empty(s, dtype=d) for k, (s, d) in meta.items()}

    def get(self, key: str, keep: bool = False) -> Entry:
        self.prefetch(key)
        entry = self._prefetched.pop(key)
        if not keep:
            del self._entries[key]
        self.stats["bytes_read"] += _nbytes(entry)
        return entry

    def close(self) -> None:
        super().close()
        self._prefetched.clear()

    def resident(self) -> list[torch.Tensor]:
        return []  # shapes only: what a disk holds costs no device memory


class DiskStore:
    """Entries as safetensors files in a private temporary directory, written asynchronously."""

    def __init__(self, root: str | os.PathLike | None = None, async_writes: bool = True) -> None:
        self.async_writes = async_writes  # False: all I/O on the calling thread, in order
        root = check_offload_root(root)
        remove_stale_dirs(root)
        try:
            self.dir = Path(tempfile.mkdtemp(prefix=_run_prefix(), dir=root))
        except OSError as err:
            raise OffloadError(f"cannot create an offload directory under {root}: {err}") from err
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowmem-offload")
        self._writes: dict[str, Future] = {}
        self._reads: dict[str, tuple[Entry, Future]] = {}
        self._devices: dict[str, dict[str, torch.device]] = {}
        self._layouts: dict[str, Layout] = {}
        self.stats = {"bytes_written": 0, "bytes_read": 0, "io_wait_s": 0.0}

    def put(self, key: str, entry: Entry) -> None:
        need = _nbytes(entry)
        free = shutil.disk_usage(self.dir).free
        if need > free:
            raise OffloadError(
                f"not enough space in {self.dir}: an entry needs {need} bytes, "
                f"{free} are free; pass another offload_dir"
            )
        # files hold host copies; `get` moves each tensor back to the device it came from
        tensors = {k: t.detach().contiguous().cpu() for k, t in entry.items()}
        header, self._layouts[key] = _layout(tensors)  # refuses a dtype before anything is kept
        self._devices[key] = {k: t.device for k, t in entry.items()}
        self.stats["bytes_written"] += need
        if self.async_writes:
            self._writes[key] = self._pool.submit(_write, self._path(key), header, tensors)
            return
        # on this thread: the tensors are released before put() returns, deterministically
        done: Future = Future()
        try:
            _write(self._path(key), header, tensors)
            done.set_result(None)
        except OSError as err:
            raise OffloadError(f"offload I/O failed in {self.dir}: {err}") from err
        self._writes[key] = done

    def prefetch(self, key: str) -> None:
        self._start_read(key, self.async_writes)

    def _start_read(self, key: str, background: bool) -> None:
        if key in self._reads or key not in self._writes:
            return
        write = self._writes[key]
        self._wait(write)  # a read can only start once its file is complete
        layout = self._layouts[key]
        entry = {k: torch.empty(shape, dtype=dtype) for k, (dtype, shape, _) in layout.items()}
        if background:
            read = self._pool.submit(_fill, self._path(key), layout, entry)
        else:  # a failure is raised by `get`, as one on the worker would be
            read = Future()
            try:
                _fill(self._path(key), layout, entry)
                read.set_result(None)
            except OSError as err:
                read.set_exception(err)
        self._reads[key] = (entry, read)

    def get(self, key: str, keep: bool = False) -> Entry:
        if key not in self._writes:
            raise KeyError(f"no entry {key!r} in the offload store {self.dir}")
        # not prefetched: read on this thread, which would only wait for the writer's thread
        # (the same buffers, without a hand-off: best reads every entry this way)
        self._start_read(key, background=False)
        entry, read = self._reads.pop(key)
        self._wait(read)
        self.stats["bytes_read"] += _nbytes(entry)
        devices = self._devices[key]
        if not keep:
            del self._writes[key], self._devices[key], self._layouts[key]
            self._path(key).unlink()
        return {k: t.to(devices[k]) for k, t in entry.items()}  # a no-op on the CPU

    def resident(self) -> list[torch.Tensor]:
        return []  # entries wait in files, not on the device

    def flush(self) -> None:
        """Wait until every entry put so far is in its file (the writer thread holds each
        one until then)."""
        for write in list(self._writes.values()):
            self._wait(write)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._writes.clear()
        self._reads.clear()
        self._layouts.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.safetensors"

    def _wait(self, future: Future) -> None:
        start = time.perf_counter()
        try:
            future.result()
        except OSError as err:
            raise OffloadError(f"offload I/O failed in {self.dir}: {err}") from err
        finally:
            self.stats["io_wait_s"] += time.perf_counter() - start


def make_store(offload: str, meter: str, root: str | None = None, async_writes: bool = True):
    """The store for an offload target under a meter (fake tensors cannot be written)."""
    if offload not in OFFLOADS:
        raise ValueError(f"bad offload={offload!r}: must be one of {OFFLOADS}")
    if offload == "memory":
        return MemoryStore()
    return SimulatedStore() if meter == "simulated" else DiskStore(root, async_writes)


def offload_root(offload_dir: str | os.PathLike | None = "") -> Path:
    """The root folder of run directories: `offload_dir`, or temp/lowmem-offload for ""."""
    return Path(offload_dir) if offload_dir else Path(tempfile.gettempdir()) / "lowmem-offload"


def check_offload_root(offload_dir: str | os.PathLike | None = "") -> Path:
    """The root for `offload_dir`, checked: an existing, writable folder. Only the default root
    ("" = the system temp folder) is created; raises OffloadError (a ValueError) otherwise."""
    root = offload_root(offload_dir)
    if not offload_dir:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OffloadError(f"cannot create the offload folder {root}: {err}") from err
        return root
    if not root.exists():
        problem, fix = "does not exist", "create it"
    elif not root.is_dir():
        problem, fix = "is not a folder", "pass a folder"
    elif not os.access(root, os.W_OK | os.X_OK):
        problem, fix = "is not writable", "pass a writable folder"
    else:
        return root
    raise OffloadError(
        f"offload_dir {str(offload_dir)!r} {problem}; {fix} or pass '' for the system temp folder"
    )


def reclaim(offload_dir: str | os.PathLike | None = "") -> dict[Path, int]:
    """`remove_stale_dirs` under the root of `offload_dir`, if it is a folder (never created)."""
    root = offload_root(offload_dir)
    return remove_stale_dirs(root) if root.is_dir() else {}


def remove_stale_dirs(root: Path) -> dict[Path, int]:
    """Remove run directories under `root` whose owner process is gone; only this user's.

    Returns {directory: bytes freed}. Costs one listing of `root`, plus a walk of each dead one.
    """
    removed = {}
    for path in Path(root).glob(f"{_PREFIX}*"):
        try:
            parts = path.name[len(_PREFIX) :].split("-")
            pid, start = int(parts[0]), parts[1] if len(parts) == 3 else None
            info = path.lstat()  # a symlink is never followed, nor removed
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            if _alive(pid) and (start is None or _start_time(pid) in (start, None)):
                continue
            size = sum(
                os.lstat(os.path.join(folder, name)).st_size
                for folder, _, names in os.walk(path)  # links are not followed
                for name in names
            )
        except (ValueError, OSError):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed[path] = size
    return removed


def _run_prefix() -> str:
    start = _start_time(os.getpid())
    return f"{_PREFIX}{os.getpid()}-{start}-" if start else f"{_PREFIX}{os.getpid()}-"


def _start_time(pid: int) -> str | None:
    """When `pid` started, in clock ticks since boot (Linux); None where unknown.

    Ticks, not wall time: the boot time derived from the wall clock moves when it is set."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()  # after the command name
        return fields[19].decode()  # field 22 of proc(5), counted from field 3
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _layout(tensors: Entry) -> tuple[bytes, Layout]:
    """The safetensors header of `tensors` (in their order, back to back) and where each one's
    bytes lie in the file."""
    header, spans, begin = {}, {}, 0
    for name, t in tensors.items():
        if t.dtype not in NAMES:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in NAMES)
            raise ValueError(
                f"cannot offload {name!r} of dtype {t.dtype}: must be one of {allowed}"
            )
        end = begin + t.numel() * t.element_size()
        header[name] = {
            "dtype": NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [begin, end],
        }
        spans[name] = (t.dtype, tuple(t.shape), begin)
        begin = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    start = 8 + len(text)
    layout = {k: (dtype, shape, start + b) for k, (dtype, shape, b) in spans.items()}
    return struct.pack("<Q", len(text)) + text, layout


def _write(path: Path, header: bytes, tensors: Entry) -> None:
    with open(path, "wb") as f:
        f.write(header)
        for t in tensors.values():
            f.write(as_bytes(t))


def _fill(path: Path, layout: Layout, entry: Entry) -> None:
    """Read each tensor's bytes straight into its preallocated buffer."""
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, (_, _, begin) in layout.items():
            try:
                pread_into(fd, entry[name], begin)
            except ValueError as err:
                raise OSError(f"{path}: short read for {name}: {err}") from err
    finally:
        os.close(fd)


def _nbytes(entry: Entry) -> int:
    return sum(t.numel() * t.element_size() for t in entry.values())
