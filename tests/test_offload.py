import os
import subprocess
import sys
import tempfile

import pytest
import torch
from safetensors.torch import load_file

from lowmem import offload
from lowmem.__main__ import main
from lowmem.bench import run_cell
from lowmem.config import StackConfig
from lowmem.models import build_model
from lowmem.offload import DiskStore, MemoryStore, OffloadError, SimulatedStore
from lowmem.stack import apply_stack


def _entry():
    return {"h": torch.randn(3, 5), "codes": torch.randint(0, 255, (4, 2), dtype=torch.uint8)}


@pytest.mark.parametrize("async_writes", [True, False])
def test_disk_store_round_trips_and_deletes_files_as_they_are_consumed(tmp_path, async_writes):
    store = DiskStore(tmp_path, async_writes=async_writes)
    a, b = _entry(), _entry()
    store.put("a", a)
    store.put("b", b)
    store.prefetch("b")
    got_b = store.get("b")
    assert all(torch.equal(got_b[k], b[k]) for k in b)
    kept = store.get("a", keep=True)
    assert torch.equal(kept["codes"], a["codes"])
    assert sorted(p.name for p in store.dir.iterdir()) == ["a.safetensors"]
    on_disk = load_file(store.dir / "a.safetensors")  # a plain safetensors file
    assert torch.equal(on_disk["h"], a["h"])
    assert torch.equal(store.get("a")["h"], a["h"])
    assert list(store.dir.iterdir()) == []
    n = sum(t.numel() * t.element_size() for t in a.values())
    assert store.stats["bytes_written"] == 2 * n and store.stats["bytes_read"] == 3 * n
    with pytest.raises(KeyError, match="no entry 'a'"):
        store.get("a")
    store.close()
    assert not store.dir.exists()


def test_disk_store_files_are_safetensors_for_every_dtype_and_shape(tmp_path):
    """The store writes its files itself; safetensors must read them back as they were put."""
    entry = {
        "z": torch.randn(2, 3, 4),
        "h": torch.randn(5).half(),
        "b": torch.randn(3, 1).bfloat16(),
        "ids": torch.arange(7, dtype=torch.int64),
        "i32": torch.arange(-3, 3, dtype=torch.int32).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "odd": torch.randint(0, 255, (3,), dtype=torch.uint8),  # 3 bytes: later data unaligned
        "i8": torch.tensor([-3, 7], dtype=torch.int8),
        "i16": torch.tensor([-300, 7], dtype=torch.int16),
        "f64": torch.randn(2, dtype=torch.float64),
        "t": torch.randn(4, 3).T,  # not contiguous
    }
    store = DiskStore(tmp_path)
    store.put("e", entry)
    store.flush()
    on_disk = load_file(store.dir / "e.safetensors")
    got = store.get("e", keep=True)
    for name, t in entry.items():
        for other in (on_disk[name], got[name]):
            assert other.dtype == t.dtype and other.shape == t.shape, name
            assert torch.equal(other, t), name
    with pytest.raises(ValueError, match="cannot offload 'c' of dtype torch.complex64: must be"):
        store.put("c", {"c": torch.zeros(2, dtype=torch.complex64)})
    assert sorted(p.name for p in store.dir.iterdir()) == ["e.safetensors"]  # nothing written
    with pytest.raises(KeyError, match="no entry 'c'"):  # and nothing kept
        store.get("c")
    store.close()


def test_memory_and_simulated_stores_keep_what_they_promise():
    e = _entry()
    mem = MemoryStore()
    mem.put("x", e)
    assert mem.get("x")["h"] is e["h"]
    sim = SimulatedStore()
    sim.put("x", e)
    got = sim.get("x", keep=True)
    assert got["h"].shape == (3, 5) and got["codes"].dtype == torch.uint8
    assert sim.get("x")["h"] is not got["h"]


def test_a_full_disk_is_refused_with_the_path_and_the_bytes_needed(tmp_path, monkeypatch):
    store = DiskStore(tmp_path)
    full = offload.shutil._ntuple_diskusage(total=100, used=100, free=0)
    monkeypatch.setattr(offload.shutil, "disk_usage", lambda path: full)
    with pytest.raises(OffloadError, match=r"not enough space in .*: an entry needs 68 bytes, 0"):
        store.put("a", _entry())
    assert list(store.dir.iterdir()) == []
    store.close()


def test_an_offload_dir_that_is_missing_a_file_or_unwritable_is_refused_not_created(tmp_path):
    missing = tmp_path / "nope"
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError) as err:  # OffloadError is a ValueError: bad input
        offload.check_offload_root(str(missing))
    assert str(err.value) == (
        f"offload_dir '{missing}' does not exist; create it or pass '' for the system temp folder"
    )
    with pytest.raises(OffloadError, match=f"offload_dir '{blocker}' is not a folder"):
        DiskStore(blocker)
    with pytest.raises(OffloadError, match="does not exist"):
        DiskStore(blocker / "offload")
    if os.getuid() != 0:  # root may write anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        with pytest.raises(OffloadError, match="is not writable; pass a writable folder"):
            DiskStore(tmp_path / "ro")
    cfg = StackConfig.from_flat("checkpoint", seq_len=8, offload_dir=str(missing))
    with pytest.raises(OffloadError, match="does not exist"):
        apply_stack(build_model("tiny-llama"), cfg)
    assert not missing.exists() and not (blocker / "offload").exists()


def test_the_default_root_is_created_in_the_temp_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert offload.check_offload_root("") == tmp_path / "lowmem-offload"
    assert (tmp_path / "lowmem-offload").is_dir()


def start_ticks(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot."""
    try:
        return open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[19]
    except OSError:
        return None


@pytest.fixture
def run_dirs(tmp_path):
    """Run folders as DiskStores name them: a dead run's (92 bytes), a live one's, another
    file; where start times are known, a live one's with its start, and one of a reused PID."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid, start = os.getpid(), start_ticks(os.getpid())
    dirs = {
        "dead": tmp_path / f"lowmem-run-{int(dead.stdout)}-abc",
        "live": tmp_path / f"lowmem-run-{pid}-def",
        "stranger": tmp_path / "someone-elses",
    }
    if start is not None:
        dirs["live_started"] = tmp_path / f"lowmem-run-{pid}-{start}-ghi"
        dirs["reused_pid"] = tmp_path / f"lowmem-run-{pid}-{int(start) + 1}-jkl"
    for d in dirs.values():
        d.mkdir()
        (d / "h0.safetensors").write_bytes(b"1" * 92)
    return dirs


def left(dirs) -> set[str]:
    return {name for name, d in dirs.items() if d.exists()}


KEPT = {"live", "stranger", "live_started"}


def test_directories_of_dead_runs_are_removed_but_never_a_live_one(tmp_path, run_dirs):
    store = DiskStore(tmp_path)
    assert left(run_dirs) == KEPT & run_dirs.keys()
    start = start_ticks(os.getpid())
    assert store.dir.name.startswith(f"lowmem-run-{os.getpid()}-{start + '-' if start else ''}")
    store.close()


@pytest.mark.parametrize("meter, offload_to", [("simulated", "disk"), ("cpu", "memory")])
def test_any_checkpointed_run_reclaims_dead_runs_under_its_root(
    tmp_path, run_dirs, meter, offload_to
):
    cfg = StackConfig.from_flat(
        "checkpoint", seq_len=8, offload=offload_to, offload_dir=str(tmp_path)
    )
    if meter == "simulated":  # a measurement, end to end
        assert run_cell("tiny-llama", cfg, meter)["status"] == "ok"
    else:  # the library API
        model = apply_stack(build_model("tiny-llama"), cfg, meter)
        model.get_base_model().lowmem_checkpointing.close()
    assert left(run_dirs) == KEPT & run_dirs.keys()


def test_clean_removes_dead_runs_and_says_what_it_freed(tmp_path, run_dirs, capsys):
    assert main(["clean", "--offload-dir", str(tmp_path)]) == 0
    assert left(run_dirs) == KEPT & run_dirs.keys()
    out = capsys.readouterr().out.strip().splitlines()
    n = len(run_dirs) - len(KEPT & run_dirs.keys())
    assert f"removed {run_dirs['dead']} (92 bytes)" in out
    assert out[-1].startswith(f"removed {n} folder(s), {92 * n} bytes (0.0 MB), under {tmp_path}")
    assert main(["clean", "--offload-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("removed 0 folder(s), 0 bytes")
    assert main(["clean", "--offload-dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: offload_dir '{tmp_path / 'nope'}' does not exist; create it or pass "
        "'' for the system temp folder"
    ]
    assert not (tmp_path / "nope").exists()


def test_bad_offload_target_is_refused():
    with pytest.raises(ValueError, match="bad offload='ssd'"):
        offload.make_store("ssd", "cpu")


@pytest.mark.parametrize("async_writes", [True, False])
def test_a_file_cut_short_on_disk_is_refused_with_the_store_and_the_tensor(tmp_path, async_writes):
    store = DiskStore(tmp_path, async_writes=async_writes)
    store.put("a", _entry())
    store.flush()
    path = store.dir / "a.safetensors"
    os.truncate(path, path.stat().st_size - 4)  # the last tensor loses its last 4 bytes
    with pytest.raises(OffloadError, match=f"{store.dir}.*short read for codes"):
        store.get("a")
    store.close()
