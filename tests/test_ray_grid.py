"""The Ray executor (lowmem.ray_executor) on one local instance of 2 CPUs for the module.

Records of a Ray run equal the sequential executor's byte for byte once three fields are
removed, which differ by nature: `elapsed_s` (the cell's wall-clock time), `written_at` (when
the driver wrote it) and `host` (only Ray records name the worker's host). The grid's cells
have no offload (no checkpoint row), whose stats carry timings too.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from lowmem import grid, planner, ray_executor, results
from lowmem.__main__ import main
from lowmem.config import StackConfig

ray = pytest.importorskip("ray")

_NATURE = ("elapsed_s", "written_at", "host")  # fields that differ run to run (docstring)
_GRID = (
    "axes:\n  model: [tiny-llama, tiny-qwen]\n  stack: [baseline, quantize]\n"
    "overrides:\n  seq_len: 16\n"
)


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray instance for the module: 2 CPUs, no dashboard, a small object store."""
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=80 * 2**20,
        log_to_driver=False,
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "mygrid"
    path.mkdir()
    (path / "grid.yaml").write_text(_GRID)
    return path


def _records(root) -> dict:
    """Each record of results/raw/mygrid under `root`, without the fields that differ by
    nature, as the text write_record would write."""
    out = {}
    for path in sorted((root / "raw" / "mygrid").glob("*.json")):
        record = json.loads(path.read_text())
        for key in _NATURE:
            record.pop(key, None)
        out[path.name] = json.dumps(record, indent=2, sort_keys=True) + "\n"
    return out


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """The 4-cell grid's records from the sequential in-process executor."""
    root = tmp_path_factory.mktemp("sequential")
    (root / "mygrid").mkdir()
    (root / "mygrid" / "grid.yaml").write_text(_GRID)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOWMEM_RESULTS", str(root / "results"))
        assert grid.run_grid(root / "mygrid", executor="in-process")["ran"] == 4
    return _records(root / "results")


@pytest.mark.parametrize("cell", ["in-process", "papermill"])
def test_ray_records_equal_the_sequential_executors(
    ray_address, folder, results_tmp, sequential, cell
):
    cells = [
        (c["model"], grid.config_from_parameters(c), c["meter"]) for c in grid.load_grid(folder)
    ]
    counts = grid.run_cells("mygrid", cells, "ray", cell=cell)
    assert counts == {"ran": 4, "skipped": 0, "failed": 0}
    assert _records(results_tmp) == sequential  # byte for byte, but for _NATURE
    hosts = {r["host"] for r in results.load_records("mygrid")}
    assert hosts == {socket.gethostname()}
    if cell == "papermill":  # the command line, now that every cell is recorded
        assert main(["grid", str(folder), "--executor", "ray"]) == 0
        assert len(results.load_records("mygrid")) == 4


def test_a_cell_that_raises_or_kills_its_worker_becomes_a_failed_record(
    ray_address, folder, results_tmp
):
    def crashing(experiment, model, cfg, meter, cell):
        if cfg.stack == "quantize" and model == "tiny-llama":
            os._exit(3)  # the worker dies mid-task
        if cfg.stack == "quantize":
            raise RuntimeError("cell made to crash")
        return ray_executor.run_in_worker(experiment, model, cfg, meter, cell)

    cells = [
        (c["model"], grid.config_from_parameters(c), c["meter"]) for c in grid.load_grid(folder)
    ]
    counts = ray_executor.run_cells_ray("mygrid", cells, "in-process", runner=crashing)
    assert counts == {"ran": 2, "skipped": 0, "failed": 2}
    by_id = {r["run_id"]: r for r in results.load_records("mygrid")}
    dead = by_id["tiny-llama__quantize__T16__simulated"]
    raised = by_id["tiny-qwen__quantize__T16__simulated"]
    assert dead["status"] == raised["status"] == "failed"
    assert "WorkerCrashedError" in dead["error"] and dead["host"] == socket.gethostname()
    assert "RuntimeError: cell made to crash" in raised["error"]
    assert by_id["tiny-qwen__baseline__T16__simulated"]["status"] == "ok"


_DRIVER = """
import os, sys, time
import ray
from lowmem import grid, ray_executor

hold = sys.argv[3]  # a global of __main__: cloudpickle ships its value with `slow`

def slow(experiment, model, cfg, meter, cell):
    while cfg.stack == "quantize" and os.path.exists(hold):  # held until the test releases it
        time.sleep(0.1)
    return ray_executor.run_in_worker(experiment, model, cfg, meter, cell)

ray.init(address=sys.argv[1], log_to_driver=False)
cells = [(c["model"], grid.config_from_parameters(c), c["meter"])
         for c in grid.load_grid(sys.argv[2])]
with grid.grid_lock("mygrid"):
    ray_executor.run_cells_ray("mygrid", cells, "in-process", runner=slow)
"""


@pytest.mark.slow  # ~50 s: a second driver process starts Ray's client, then is killed
def test_a_killed_driver_rerun_completes_the_grid_without_rerunning_finished_cells(
    ray_address, folder, results_tmp, tmp_path
):
    hold = tmp_path / "hold"
    hold.touch()
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, ray_address, str(folder), str(hold)],
        env={**os.environ, "LOWMEM_RESULTS": str(results_tmp)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    raw = results_tmp / "raw" / "mygrid"
    deadline = time.monotonic() + 120
    while len(list(raw.glob("*.json"))) < 2 and driver.poll() is None:
        assert time.monotonic() < deadline, "the driver recorded nothing in 120 s"
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    hold.unlink()
    before = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in raw.glob("*.json")}
    assert sorted(before) == [
        "tiny-llama__baseline__T16__simulated.json",
        "tiny-qwen__baseline__T16__simulated.json",
    ]
    # the killed driver's lock went with it; its two finished cells are not run again
    assert grid.run_grid(folder, executor="ray") == {"ran": 2, "skipped": 2, "failed": 0}
    after = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in raw.glob("*.json")}
    assert len(after) == 4 and all(after[name] == before[name] for name in before)


def test_a_second_driver_on_the_same_grid_is_refused(ray_address, folder, results_tmp):
    with grid.grid_lock("mygrid"):
        for executor in ("ray", "in-process"):
            with pytest.raises(ValueError, match="another grid driver is writing .*mygrid"):
                grid.run_grid(folder, executor=executor)
    assert results.load_records("mygrid") == []


def test_resources_come_from_the_simulated_prediction(results_tmp):
    cfg = StackConfig(stack="quantize", seq_len=16)
    assert ray_executor.cell_resources("tiny-llama", cfg, "simulated") == {"num_cpus": 1}
    assert ray_executor.cell_resources("tiny-llama", cfg, "cuda") == {"num_cpus": 1, "num_gpus": 1}
    need = ray_executor.cell_resources("tiny-llama", cfg, "cpu", baseline=10**9)
    (record,) = results.load_records("planner")  # the simulated record, cached
    m = record["metrics"]
    assert record["meter"] == "simulated" and 0 < m["peak_bytes"]
    setup = planner.setup_peak("tiny-llama", cfg, m, from_dir=False)
    assert setup > m["peak_bytes"]  # a tiny model: building it in FP32 is the larger term
    assert need == {"num_cpus": 1, "memory": 10**9 + setup}
    lora = StackConfig(stack="lora", seq_len=16)  # no quantization: the step holds the weights
    need = ray_executor.cell_resources("tiny-llama", lora, "cpu", baseline=10**9)
    peak = planner.step_record("tiny-llama", lora)["metrics"]["peak_bytes"]  # read, cached
    assert len(results.load_records("planner")) == 2
    assert need == {"num_cpus": 1, "memory": 10**9 + peak}


def test_a_cell_that_fits_on_no_node_becomes_a_failed_record(ray_address, results_tmp, monkeypatch):
    monkeypatch.setattr(ray_executor, "cell_resources", lambda *a: {"num_cpus": 1, "memory": 2**60})
    cells = [("tiny-llama", StackConfig(seq_len=16), "cpu")]
    assert grid.run_cells("fits", cells, "ray") == {"ran": 0, "skipped": 0, "failed": 1}
    (record,) = results.load_records("fits")
    assert "more than any node offers" in record["error"] and record["requested"]["memory"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--executor", "dask"], "invalid choice: 'dask' (choose from"),
        (["--executor", "ray", "--address", "nowhere"], "bad address 'nowhere': must be HOST:PORT"),
        (["--executor", "ray", "--address", "127.0.0.1:{port}"], "no Ray cluster answers there"),
        (["--address", "127.0.0.1:6379"], "is for the ray executor, not 'papermill'"),
    ],
)
def test_bad_executor_or_address_is_refused_in_one_line_before_anything_runs(
    folder, results_tmp, capsys, argv, message
):
    argv = [a.format(port=_free_port()) for a in argv]
    try:
        code = main(["grid", str(folder), *argv])
    except SystemExit as exit:  # argparse refuses an unknown choice
        code = exit.code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and message in err, err
    assert not (results_tmp / "raw").exists()  # nothing half-written


@pytest.mark.slow  # ~60 s: four notebook runs one after another, then a fresh interpreter
def test_the_command_starts_its_own_instance_and_matches_sequential_papermill(
    folder, tmp_path, monkeypatch, sequential
):
    """`python -m lowmem grid --executor ray` with no address (a local instance of its own)
    and the sequential papermill grid write the in-process executor's records."""
    monkeypatch.setenv("LOWMEM_RESULTS", str(tmp_path / "papermill"))
    assert grid.run_grid(folder) == {"ran": 4, "skipped": 0, "failed": 0}
    assert _records(tmp_path / "papermill") == sequential
    env = {**os.environ, "LOWMEM_RESULTS": str(tmp_path / "ray")}
    command = [sys.executable, "-m", "lowmem", "grid", str(folder), "--executor", "ray"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "4 ran, 0 skipped, 0 failed" in done.stderr
    assert _records(tmp_path / "ray") == sequential
