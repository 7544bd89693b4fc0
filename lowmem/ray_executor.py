"""Grid cells as Ray tasks, each declaring the resources its cell needs.

`python -m lowmem grid experiments/<name> --executor ray` runs every cell not recorded yet as
one Ray task: on a local instance the command starts (all the machine's CPUs) or, with
`--address HOST:PORT`, on a running cluster (`ray start --head` prints the address). A task
runs its cell the way a sequential grid does, through papermill (notebooks/run_cell.ipynb,
which writes its record into a temporary results folder on the worker) or in process
(`lowmem.bench.run_cell`), and returns the record, stamped with the worker's host name; only
the driver writes records (atomically, `results.write_record`), so a cluster needs no shared
disk. The records are those of the sequential executors but for `elapsed_s`, `written_at` and
the added `host`.

What a task asks for, so that Ray never starts two cells that cannot fit together:

    every cell   1 CPU
    cuda cells   1 GPU
    cpu cells    memory = process baseline + max(setup, step peak)

The step peak is the configuration's simulated record (`planner.step_record`: measured once,
then read from results/raw/planner/), the setup term the planner's for a quantized row
(`planner.setup_peak`: the model built in FP32, its quantized copy, two FP32 temporaries of
the embedding) and 0 for a row without quantization (the FP32 weights it builds are the ones
its step holds, so the step peak covers them), the baseline a fresh interpreter's
RSS (`planner.process_baseline`, measured once per driver). Llama-3.2 3B `best` at 2048
tokens on the cpu meter: 0.47 GiB baseline + max(16.77 GiB setup, 0.35 GiB step) = 17.24 GiB,
so a 24 GiB, 2-CPU node (Ray offers 23.2 GiB of `memory` there) runs one such cell at a time,
not two. A cell that fits on no node becomes a `failed`
record naming what it needed. Simulated cells ask for a CPU only: they allocate no tensor data.

Failures: a cell whose code raises, or whose worker dies (a segfault, the OOM killer), becomes
a `failed` record with Ray's error, and the grid goes on (no retries: a crash is a result). A
driver that is killed loses only its cells in flight: records are written as cells finish, and
a rerun skips them. Two drivers never write one record: `grid.run_cells` holds the experiment
folder's lock around all of this. Progress is one tqdm bar: cells finished, with done /
running / failed / skipped counts; "running" counts tasks that have started on a worker (the
task's first message), not those waiting for resources.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import socket
import tempfile
from collections.abc import Callable

from tqdm.auto import tqdm

from lowmem import results
from lowmem.config import StackConfig

CELLS = ("papermill", "in-process")  # how a task runs its cell
_CONNECT_S = 5  # seconds to wait for a cluster's head to answer before refusing the address
_ADDRESS = re.compile(r"(?:ray://)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})")
_ALLOWED = (
    "HOST:PORT of a running head node (`ray start --head` prints it; port 6379 by default), "
    "ray://HOST:PORT (Ray Client), or auto; leave --address out to start a local instance"
)


def check_address(address: str | None) -> None:
    """Refuse, in one line, an address of the wrong form or where nothing answers (ray.init
    would retry for minutes instead)."""
    if address is None or address == "auto":
        return
    match = _ADDRESS.fullmatch(address) if isinstance(address, str) else None
    if match is None:
        raise ValueError(f"bad address {address!r}: must be {_ALLOWED}")
    host, port = match.group(1).strip("[]"), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=_CONNECT_S).close()
    except OSError as err:
        raise ValueError(
            f"bad address {address!r}: no Ray cluster answers there ({err.strerror or err}); "
            f"must be {_ALLOWED}"
        ) from None


def cell_resources(model: str, cfg: StackConfig, meter: str, baseline: int | None = None) -> dict:
    """Ray resources of one cell: a CPU, a GPU for `cuda`, and for `cpu` the bytes the cell's
    process will hold at most (module docstring), predicted by the simulated meter."""
    need: dict = {"num_cpus": 1}
    if meter == "cuda":
        need["num_gpus"] = 1
    if meter == "cpu":
        from lowmem import planner  # here: the planner imports the model code

        m = planner.step_record(model, cfg)["metrics"]
        # without quantization, the FP32 weights built are those the step holds: in its peak
        setup = planner.setup_peak(model, cfg, m, from_dir=False) if cfg.enabled("quantize") else 0
        base = _baseline() if baseline is None else baseline
        need["memory"] = base + max(setup, m["peak_bytes"])
    return need


@functools.cache
def _baseline() -> int:
    from lowmem.planner import process_baseline

    return process_baseline()


def run_in_worker(experiment: str, model: str, cfg: StackConfig, meter: str, cell: str) -> dict:
    """Run one cell here (in a Ray worker) and return its record, stamped with this host."""
    from lowmem import grid

    if cell == "in-process":
        from lowmem.bench import run_cell

        record = run_cell(model, cfg, meter)
    else:  # the notebook writes its record under LOWMEM_RESULTS, which its kernel inherits
        with tempfile.TemporaryDirectory() as tmp, _environ(LOWMEM_RESULTS=tmp):
            grid._papermill(experiment, model, cfg, meter, True)
            rid = results.run_id(model, cfg, meter)
            record = json.loads(results.record_path(experiment, rid).read_text())
    return {**record, "host": socket.gethostname()}


@contextlib.contextmanager
def _environ(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _task(runner: Callable, experiment: str, model: str, cfg: StackConfig, meter: str, cell):
    yield socket.gethostname()  # first message: started, and where
    yield runner(experiment, model, cfg, meter, cell)


def run_cells_ray(
    experiment: str,
    cells: list[tuple[str, StackConfig, str]],
    cell: str = "papermill",
    force: bool = False,
    desc: str | None = None,
    address: str | None = None,
    runner: Callable = run_in_worker,
) -> dict:
    """`grid.run_cells` on Ray (call that, which holds the experiment's lock): submit every
    cell not recorded yet with its resources, write each record as it comes back. `runner`
    is what a task calls (tests swap in one that crashes). A Ray instance this process has
    joined already (`ray.init`) is used as it is, and left running."""
    if cell not in CELLS:
        raise ValueError(f"bad cell={cell!r}: must be one of {', '.join(CELLS)}")
    check_address(address)
    import ray

    started_here = not ray.is_initialized()
    if started_here:  # "local" always starts a new instance, never joins a stray one
        local = {"address": "local", "include_dashboard": False}
        ray.init(log_to_driver=False, **(local if address is None else {"address": address}))
    try:
        return _drive(ray, experiment, cells, cell, force, desc, runner)
    finally:
        if started_here:
            ray.shutdown()


def _drive(ray, experiment, cells, cell, force, desc, runner) -> dict:
    counts = {"ran": 0, "skipped": 0, "failed": 0}
    remote = ray.remote(num_returns="streaming", max_retries=0)(_task)
    largest = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"]), default=0)
    bar = tqdm(total=len(cells), desc=desc or experiment, unit="cell")
    pending: dict = {}  # task -> [run id, model, cfg, meter, host once started]
    running = 0

    def finish(item: list, record: dict) -> None:
        results.write_record(experiment, record)
        counts["ran" if record["status"] != "failed" else "failed"] += 1
        bar.update()

    def failed(item: list, error: str, **extra) -> dict:
        rid, model, cfg, meter, host = item
        return results.cell_record(
            rid, model, cfg, meter, {}, "failed", None, error=error, host=host, **extra
        )

    for model, cfg, meter in cells:
        rid = results.run_id(model, cfg, meter)
        if results.record_path(experiment, rid).exists() and not force:
            counts["skipped"] += 1
            bar.update()
            continue
        item = [rid, model, cfg, meter, None]
        try:
            need = cell_resources(model, cfg, meter)
        except Exception as err:  # the prediction itself failed: say so in the cell's record
            finish(item, failed(item, f"predicting its memory failed: {err}"))
            continue
        if need.get("memory", 0) > largest:
            error = (
                f"needs {need['memory'] / 2**30:.2f} GiB (predicted), more than any node "
                f"offers ({largest / 2**30:.2f} GiB)"
            )
            finish(item, failed(item, error, requested=need))
            continue
        pending[remote.options(**need).remote(runner, experiment, model, cfg, meter, cell)] = item
    _postfix(bar, counts, running)
    while pending:
        (task,), _ = ray.wait(list(pending), num_returns=1)
        item = pending[task]
        try:
            message = ray.get(next(task))
        except StopIteration:  # the record came before: the task is over
            del pending[task]
            continue
        except ray.exceptions.RayError as err:  # the cell raised, or its worker died
            running -= item[4] is not None
            finish(item, failed(item, f"{type(err).__name__}: {err}"[-4000:]))
            del pending[task]
        else:
            if isinstance(message, str):  # started on host `message`
                item[4] = message
                running += 1
            else:
                running -= 1
                finish(item, message)
        _postfix(bar, counts, running)
    bar.close()
    return counts


def _postfix(bar, counts: dict, running: int) -> None:
    bar.set_postfix(
        done=counts["ran"], running=running, failed=counts["failed"], skipped=counts["skipped"]
    )
