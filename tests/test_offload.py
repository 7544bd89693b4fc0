import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lowmem import offload
from lowmem.offload import DiskStore, MemoryStore, OffloadError, SimulatedStore


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


def test_an_unwritable_root_is_refused_clearly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OffloadError, match="cannot create an offload directory under"):
        DiskStore(blocker / "offload")


def test_directories_of_dead_runs_are_removed_but_never_a_live_one(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = tmp_path / f"lowmem-run-{int(dead.stdout)}-abc"
    live = tmp_path / f"lowmem-run-{os.getpid()}-def"
    stranger = tmp_path / "someone-elses"
    for d in (stale, live, stranger):
        d.mkdir()
        (d / "x.safetensors").write_bytes(b"1")
    store = DiskStore(tmp_path)
    assert not stale.exists() and live.exists() and stranger.exists()
    store.close()


def test_bad_offload_target_is_refused():
    with pytest.raises(ValueError, match="bad offload='ssd'"):
        offload.make_store("ssd", "cpu")
