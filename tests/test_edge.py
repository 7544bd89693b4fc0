"""The whole process beside the step (lowmem.process): what a training run reports about RSS,
disk reads and where the time goes; tiny models only."""

from __future__ import annotations

import contextlib
import time

import torch
from datasets import Dataset
from test_loader import save_checkpoints

import lowmem
from lowmem import process
from lowmem.api import plan
from lowmem.loader import DISK_DTYPES, load_quantized, open_shards, skeleton
from lowmem.memory import ProcessRss
from lowmem.models import read_config
from lowmem.timers import REGION_S, clock
from lowmem.train import make_config, train, training_model


def dataset(rows: int = 8, T: int = 16) -> Dataset:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (rows, T), generator=gen)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def test_the_summary_carries_the_whole_process_figures(tmp_path):
    cfg = make_config("best", steps=2, eval_every=0, batch_size=2, seq_len=16)
    with training_model("tiny-llama", cfg.stack) as model:
        assert isinstance(model.lowmem_process, ProcessRss)  # started before the model existed
        summary = train(model, cfg, dataset(), None, tmp_path / "run", progress=False)
    p = summary["process"]
    for key in ("baseline_rss_bytes", "setup_peak_rss_bytes", "step_peak_rss_bytes"):
        assert 0 < p[key] <= p["run_peak_rss_bytes"], key
    assert p["setup_s"] > 0
    assert p["end_rss_anon_bytes"] + p["end_rss_file_bytes"] <= p["end_rss_bytes"] + 2**20
    step = summary["process_step_median"]
    assert step["dequantize_s"] > 0  # best quantizes: every linear dequantizes its rows
    assert 0 < step["dequantize_share"] < 1
    assert step["io_wait_s"] >= 0 and step["recompute_s"] > 0  # best checkpoints, offloads
    assert step["offload_read_bytes"] > 0  # layer inputs and weights come back from disk
    for key in ("io_rchar", "io_read_bytes", "peak_rss_bytes"):
        assert key in step


def test_training_model_returns_once_the_streamed_weights_are_written(tmp_path):
    cfg = make_config("best", steps=1, eval_every=0, seq_len=16, offload_dir=str(tmp_path))
    with training_model("tiny-llama", cfg.stack) as model:
        stores = lowmem.memory.offload_stores(model)
        assert stores and all(f.done() for s in stores for f in s._writes.values())


def test_a_model_built_elsewhere_is_watched_from_the_start_of_train(tmp_path):
    cfg = make_config("lora", steps=1, eval_every=0, batch_size=2, seq_len=16)
    with training_model("tiny-llama", cfg.stack) as model:
        del model.lowmem_process  # as a caller's own model has none
        summary = train(model, cfg, dataset(), None, tmp_path / "run", progress=False)
    p = summary["process"]
    assert p["baseline_rss_bytes"] > 0 and p["step_peak_rss_bytes"] > 0
    assert summary["process_step_median"]["recompute_s"] == 0.0  # no checkpointing in lora


def test_io_counters_count_a_file_read(tmp_path):
    f = tmp_path / "blob"
    f.write_bytes(b"x" * 2**20)
    before = process.io_counters()
    assert f.read_bytes() == b"x" * 2**20
    after = process.io_counters()
    assert after["rchar"] - before["rchar"] >= 2**20  # read_bytes: page cache hits do not count


def test_clock_adds_the_time_of_its_block():
    before = REGION_S["test-region"]
    with clock("test-region"):
        sum(range(10000))
    assert REGION_S["test-region"] > before


def test_rss_kinds_trim_and_threshold(monkeypatch):
    kinds = process.rss_kinds()
    assert kinds["rss"] > 0 and kinds["rss_anon"] > 0
    assert isinstance(process.trim_malloc(), bool)
    assert process.fix_mmap_threshold() is True  # glibc here
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert process.fix_mmap_threshold() is False  # the environment's setting wins


def mapped_files() -> set[str]:
    """Paths of the files this process maps now."""
    with open("/proc/self/maps") as f:
        return {line.split(maxsplit=5)[5].strip() for line in f if len(line.split()) == 6}


def mapping_of(t: torch.Tensor) -> str:
    """The file (or "" for anonymous memory) that holds the first byte of `t`."""
    addr = t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= addr < hi:
                return fields[5].strip() if len(fields) == 6 else ""
    return ""


def test_shard_reads_are_copies_and_views_are_mapped(tmp_path_factory):
    path = save_checkpoints(tmp_path_factory)["tiny-llama"]
    config = read_config(path)
    shapes = {n: (tuple(p.shape), DISK_DTYPES) for n, p in skeleton(config).named_parameters()}
    key = "model.layers.0.mlp.down_proj.weight"
    with contextlib.ExitStack() as files:
        shards = open_shards(path, shapes, files)
        copy, rows, view = shards.read(key), shards.read(key, 3, 7), shards.view(key)
        assert mapping_of(copy) == "" or not mapping_of(copy).endswith(".safetensors")
        assert mapping_of(view).endswith(".safetensors")  # the old path: pages stay mapped
        assert torch.equal(copy, view) and torch.equal(rows, view[3:7])
        assert torch.equal(shards.rows(key, 3, 7), view[3:7].float())
    assert torch.equal(copy, view)  # both alive after the files close


def test_loading_a_converted_directory_leaves_no_shard_mapped(tmp_path_factory, tmp_path):
    """Under best the packed weights are viewed through the maps and streamed to the offload
    store; once loaded, no converted shard stays mapped (resident) in the process."""
    source = save_checkpoints(tmp_path_factory)["tiny-llama"]
    out = lowmem.convert(source, tmp_path / "converted", "best")
    cfg = plan("best", offload_dir=str(tmp_path))
    model = load_quantized(out, cfg)
    try:
        for _ in range(100):  # the store's writer thread holds each layer until it is written
            left = {f for f in mapped_files() if f.startswith(str(out))}
            if not left:
                break
            time.sleep(0.05)
        assert not left, left
    finally:
        lowmem.checkpoint.checkpointing_of(model).close()
