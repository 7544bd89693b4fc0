import json
import subprocess
import sys

import pytest

from lowmem import bench, paper, results, tables
from lowmem.config import MLP_TILE_ELEMENTS, StackConfig
from lowmem.grid import run_cells
from lowmem.models import load_config

# rows whose every cell is within +-10% of the paper (softmax_approx and logits_mask are not
# yet: experiments/LOG.md)
REPRODUCED = ("baseline", "lora", "quantize", "checkpoint")


def test_bad_input_is_refused_before_any_work():
    with pytest.raises(ValueError, match="unknown model 'gpt-5'"):
        bench.run_cell("gpt-5", StackConfig(), "simulated")
    with pytest.raises(ValueError, match="unknown meter 'abacus'"):
        bench.run_cell("tiny-llama", StackConfig(), "abacus")
    with pytest.raises(ValueError, match="simulated meter needs no weights"):
        bench.run_cell("tiny-llama", StackConfig(), "simulated", model_path="/some/dir")


def test_a_peak_above_the_a100_budget_is_an_oom_with_the_predicted_need():
    record = bench.run_cell("llama-3.2-3b", StackConfig(stack="lora", seq_len=16384), "simulated")
    assert record["status"] == "oom"
    assert record["metrics"]["peak_bytes"] > paper.A100_BYTES == record["metrics"]["budget_bytes"]
    assert record["metrics"]["trainable_parameters"] == 28 * 16 * (3072 * 3 + 1024)


def test_a_crash_becomes_a_failed_record(monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(bench, "build_model", explode)
    record = bench.run_cell("tiny-llama", StackConfig(), "cpu")
    assert record["status"] == "failed" and "RuntimeError: kaboom" in record["error"]


def test_a_record_carries_the_configuration_that_ran_with_no_auto_left():
    record = bench.run_cell("tiny-llama", StackConfig(stack="best", seq_len=16384), "simulated")
    resolved = record["resolved_config"]
    assert record["config"]["dequant_chunk"] == -1 and record["config"]["gqa"] == "auto"
    tile = MLP_TILE_ELEMENTS // load_config("tiny-llama").intermediate_size  # sized by F
    assert (resolved["dequant_chunk"], resolved["mlp_tile"]) == (2048, tile)
    assert (resolved["offload_prefetch"], resolved["gqa"]) == (0, "native")
    assert -1 not in resolved.values() and "auto" not in resolved.values()


def test_grid_skips_recorded_cells_unless_forced(results_tmp):
    cells = [(m, StackConfig(seq_len=16), "simulated") for m in ("tiny-llama", "tiny-qwen")]
    assert run_cells("g", cells, "in-process") == {"ran": 2, "skipped": 0, "failed": 0}
    assert run_cells("g", cells, "in-process") == {"ran": 0, "skipped": 2, "failed": 0}
    assert run_cells("g", cells[:1], "in-process", force=True)["ran"] == 1
    assert len(results.load_records("g")) == 2
    with pytest.raises(ValueError, match="bad executor='dask': must be one of papermill, in"):
        run_cells("g", cells, "dask")


@pytest.mark.slow  # ~90 s; the default tier checks the committed records (test_results.py)
def test_table1_grid_reproduces_every_paper_cell_from_scratch(results_tmp):
    cells = [(m, cfg, "simulated") for m, cfg in bench.table1_cells(REPRODUCED)]
    run_cells("table1", cells, "in-process")
    frame = tables.cell_frame(results.load_records("table1"))
    assert len(frame) == 2 * len(REPRODUCED) * len(paper.CONTEXTS)
    misses = frame[~frame["reproduced"].astype(bool)]
    assert misses.empty, misses[["model", "stack", "seq_len", "peak_gib", "paper_gib"]]


# run in a fresh process: in a long test session the kernel may reclaim cold file-backed pages
# (libraries loaded long ago; this machine runs DAMON) while the transient is resident, so the
# resident set could stay flat (seen once: setup peak == baseline after ~100 earlier tests)
_SETUP_TRANSIENT = """
import json, torch
import lowmem.bench
from lowmem.config import StackConfig
real_build = lowmem.bench.build_model
def build_with_a_transient(*args, **kwargs):
    transient = torch.ones(100 * 2**20)  # 400 MiB, touched, then freed
    del transient
    return real_build(*args, **kwargs)
lowmem.bench.build_model = build_with_a_transient
record = lowmem.bench.run_cell("tiny-llama", StackConfig(stack="lora", seq_len=16), "cpu")
print(json.dumps(record["metrics"]))
"""


def test_cpu_records_carry_the_setup_phase_the_step_reset_would_hide():
    """A 400 MB transient while the model is built shows in the record's setup peak, not in
    the step's: the step's reset of the high-water mark no longer hides it."""
    out = subprocess.run(
        [sys.executable, "-c", _SETUP_TRANSIENT], capture_output=True, text=True, check=True
    )
    metrics = json.loads(out.stdout.strip().splitlines()[-1])
    process = metrics["process"]
    assert process["setup_peak_rss_bytes"] - process["baseline_rss_bytes"] >= 350 * 2**20
    assert process["step_peak_rss_bytes"] < process["setup_peak_rss_bytes"] - 250 * 2**20
    assert process["run_peak_rss_bytes"] >= process["setup_peak_rss_bytes"]
    assert process["step_peak_rss_bytes"] == metrics["peak_rss_bytes"]
