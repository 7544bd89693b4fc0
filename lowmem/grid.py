"""Grids of runs: an experiment folder's grid.yaml -> cells -> one record per cell.

`experiments/<name>/grid.yaml` names its axes (every combination is a cell) and overrides of
`experiments/defaults.yaml`; `axes` may also be a list of such blocks, and the grid is then the
union of their products (e.g. one block on the 3B models, one on a small model). A cell is the
flat parameter set of `notebooks/run_cell.ipynb` (model, meter, experiment and the fields of
`StackConfig`). Every cell is validated before any runs: a grid.yaml has only the keys
`axes` and `overrides`, and a wrong shape, an unknown key, a YAML syntax error or a value of
the wrong type (a quoted "false") is refused in one line that names the file. Values reach
the notebook as YAML gave them, never coerced. Cells whose record exists are skipped unless
forced; a cell that crashes the notebook becomes a `failed` record with the error, and the
grid carries on. `run_cells` is the one cell runner: it skips recorded cells and runs the rest
through papermill (the grids, `make reproduce`), in process (`python -m lowmem table1`,
`make gpu-check`), or as Ray tasks on a local instance or a cluster (`lowmem.ray_executor`,
`--executor ray`). One driver at a time writes an experiment's records: `run_cells` holds an
exclusive `flock` on results/raw/<experiment>/ while it runs (the kernel drops it when the
driver exits or is killed), and a second driver is refused in one line, so no record is
written twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from lowmem import results
from lowmem.config import StackConfig
from lowmem.memory import METERS
from lowmem.models import REGISTRY
from lowmem.settings import flat_fields

DEFAULTS = results.REPO_ROOT / "experiments" / "defaults.yaml"
RUN_NOTEBOOK = results.REPO_ROOT / "notebooks" / "run_cell.ipynb"
_FIELDS = tuple(flat_fields(StackConfig))
_KEYS = ("model", "meter", "experiment", *_FIELDS)
_SECTIONS = ("axes", "overrides")  # a grid.yaml's top-level keys
_EG = "{stack: [lora, best], seq_len: [1024, 2048]}"


def config_from_parameters(params: dict) -> StackConfig:
    """The StackConfig of a cell's (or a notebook namespace's) flat parameters."""
    return StackConfig.from_flat(**{k: params[k] for k in _FIELDS if k in params})


def check_cell(params: dict) -> StackConfig:
    """The StackConfig of a cell's flat parameters, after checking its model, meter and
    experiment; values are taken as given (no coercion), so a quoted "false" is refused."""
    model, meter, experiment = (params.get(k) for k in ("model", "meter", "experiment"))
    if not isinstance(model, str) or model not in REGISTRY:
        raise ValueError(f"unknown model {model!r}; known models: {', '.join(REGISTRY)}")
    if not isinstance(meter, str) or meter not in METERS:
        raise ValueError(f"unknown meter {meter!r}; choose one of {', '.join(METERS)}")
    results.check_slug("experiment", experiment)
    force = params.get("force", False)
    if not isinstance(force, bool):  # papermill's -p force false arrives as the string 'false'
        raise ValueError(f"bad force={force!r}: must be true or false (a boolean, not a string)")
    return config_from_parameters(params)


def load_grid(folder: str | Path, meter: str | None = None) -> list[dict]:
    """Every cell of the grid, validated: a bad shape, key, model or value raises one line
    naming the file, before any cell runs.

    `meter` (e.g. "cuda") replaces every cell's meter; cells whose meter it changes write to
    the experiment `<name>_<meter>`, so real measurements never mix with the committed ones.
    """
    folder = Path(folder)
    path = folder / "grid.yaml"
    if not path.is_file():
        raise ValueError(f"{path} does not exist; a grid folder needs a grid.yaml")
    if meter is not None and meter not in METERS:
        raise ValueError(f"unknown meter {meter!r}; choose one of {', '.join(METERS)}")
    blocks, overrides = _read_spec(path)
    base = {**_read_yaml(DEFAULTS), "experiment": folder.name, **overrides}
    cells = [
        {**base, **dict(zip(axes, combo, strict=True))}
        for axes in blocks
        for combo in itertools.product(*axes.values())
    ]
    for cell in cells:
        if meter and meter != cell["meter"]:
            cell.update(meter=meter, experiment=f"{cell['experiment']}_{meter}")
        try:
            check_cell(cell)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    return cells


def _read_spec(path: Path) -> tuple[list[dict], dict]:
    """A grid.yaml's axis blocks and overrides, every shape and key checked (values are
    StackConfig's to check)."""
    spec = _read_yaml(path)
    spec = {} if spec is None else spec  # an empty file, or only comments
    if not isinstance(spec, dict):
        raise ValueError(
            f"{path}: the top level must be a mapping with keys {' and/or '.join(_SECTIONS)}, "
            f"not a {type(spec).__name__}"
        )
    for key in spec:
        if key not in _SECTIONS:
            raise ValueError(
                f"{path}: unknown top-level key {key!r}; allowed: {', '.join(_SECTIONS)}"
            )
    overrides = spec.get("overrides", {})
    if not isinstance(overrides, dict):
        raise ValueError(
            f"{path}: overrides must be a mapping of parameter: value (e.g. seq_len: 2048), "
            f"not {overrides!r}"
        )
    _check_keys(path, "overrides", overrides)
    if "axes" not in spec:
        if not overrides:
            raise ValueError(
                f"{path}: empty grid; write axes: and/or overrides: (e.g. axes: {_EG})"
            )
        return [{}], overrides  # one cell: the defaults with the overrides
    blocks = spec["axes"] if isinstance(spec["axes"], list) else [spec["axes"]]
    if not blocks or not all(isinstance(b, dict) and b for b in blocks):
        raise ValueError(
            f"{path}: axes must be a non-empty mapping of parameter: [values] (e.g. {_EG}) "
            f"or a list of such mappings, not {spec['axes']!r}"
        )
    for axes in blocks:
        _check_keys(path, "axes", axes)
        for key, values in axes.items():
            if not (isinstance(values, list) and values):
                hint = "" if isinstance(values, list) else f" (one value: {key}: [{values}])"
                raise ValueError(
                    f"{path}: axes: {key} must be a non-empty list of values, one cell each, "
                    f"not {values!r}{hint}"
                )
    return blocks, overrides


def _check_keys(path: Path, section: str, mapping: dict) -> None:
    for key in mapping:
        if key not in _KEYS:
            raise ValueError(
                f"{path}: unknown parameter {key!r} under {section}; allowed: {', '.join(_KEYS)}"
            )


def _read_yaml(path: Path) -> object:
    """The YAML document in `path`; a syntax error or a non-UTF-8 byte names file and line."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        mark, context = getattr(err, "problem_mark", None), getattr(err, "context", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(
            f"{where}: YAML syntax error: {problem}" + (f" ({context})" if context else "")
        ) from None


def run_grid(
    folder: str | Path,
    force: bool = False,
    meter: str | None = None,
    executor: str = "papermill",
    address: str | None = None,
) -> dict:
    """Run each cell of the folder's grid not recorded yet through `executor` (`run_cells`)."""
    _check_executor(executor, address)
    cells = load_grid(folder, meter)
    if not cells:
        return {"ran": 0, "skipped": 0, "failed": 0}
    experiment = cells[0]["experiment"]
    todo = [(c["model"], config_from_parameters(c), c["meter"]) for c in cells]
    return run_cells(experiment, todo, executor, force, Path(folder).name, address)


EXECUTORS = ("papermill", "in-process", "ray")


def run_cells(
    experiment: str,
    cells: list[tuple[str, StackConfig, str]],
    executor: str = "papermill",
    force: bool = False,
    desc: str | None = None,
    address: str | None = None,
    cell: str = "papermill",
) -> dict:
    """Measure each (model, config, meter) cell not recorded yet, one record per cell, through
    `executor`: "papermill" (one run of notebooks/run_cell.ipynb per cell, as `make
    reproduce` does), "in-process" (`lowmem.bench.run_cell`, faster), or "ray" (each cell a
    Ray task running `cell`, "papermill" or "in-process", on a local instance or the cluster
    at `address`: `lowmem.ray_executor`); the same records. Returns how many ran, were
    skipped (recorded already) and failed."""
    _check_executor(executor, address)
    results.check_slug("experiment", experiment)
    if executor == "ray":
        from lowmem import ray_executor  # here: ray is imported only when asked for

        ray_executor.check_address(address)  # before the lock: nothing half-done
        with grid_lock(experiment):
            return ray_executor.run_cells_ray(experiment, cells, cell, force, desc, address)
    run = _papermill if executor == "papermill" else _in_process
    counts = {"ran": 0, "skipped": 0, "failed": 0}
    with grid_lock(experiment):
        bar = tqdm(cells, desc=desc or experiment, unit="cell")
        for model, cfg, meter in bar:
            rid = results.run_id(model, cfg, meter)
            bar.set_postfix_str(rid)
            if results.record_path(experiment, rid).exists() and not force:
                counts["skipped"] += 1
                continue
            counts["ran" if run(experiment, model, cfg, meter, force) else "failed"] += 1
    return counts


def _check_executor(executor: str, address: str | None) -> None:
    if executor not in EXECUTORS:
        raise ValueError(f"bad executor={executor!r}: must be one of {', '.join(EXECUTORS)}")
    if address is not None and executor != "ray":
        raise ValueError(f"address={address!r} is for the ray executor, not {executor!r}")


@contextlib.contextmanager
def grid_lock(experiment: str) -> Iterator[Path]:
    """Hold an exclusive flock on results/raw/<experiment>/ (created if missing); a second
    holder, in this process or another, is refused at once. No lock file is left behind, and a
    killed driver's lock goes with its process."""
    folder = results.record_path(experiment, "lock").parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)  # close-on-exec: kernels and Ray workers do not inherit it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"another grid driver is writing {folder} (it holds the folder's lock); "
                "wait for it to finish: a rerun skips the cells it recorded"
            ) from None
        yield folder
    finally:
        os.close(fd)  # closing the descriptor drops the lock


def _in_process(experiment: str, model: str, cfg: StackConfig, meter: str, force: bool) -> bool:
    from lowmem.bench import run_cell  # here: bench builds models, the grid's loader does not

    record = run_cell(model, cfg, meter)
    results.write_record(experiment, record)
    return record["status"] != "failed"


def _papermill(experiment: str, model: str, cfg: StackConfig, meter: str, force: bool) -> bool:
    import papermill  # here: in-process and Ray grids (and a bare GPU machine) need no Jupyter

    params = {**cfg.to_dict(), "model": model, "meter": meter, "experiment": experiment}
    params["lora_targets"] = ",".join(cfg.lora.targets)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            papermill.execute_notebook(
                str(RUN_NOTEBOOK),
                str(Path(tmp) / "out.ipynb"),
                parameters={**params, "force": force},
                kernel_name="python3",
                progress_bar=False,
            )
        return True
    except papermill.PapermillExecutionError as err:
        rid = results.run_id(model, cfg, meter)
        error = f"{err.ename}: {err.evalue}"
        record = results.cell_record(rid, model, cfg, meter, {}, "failed", None, error=error)
        results.write_record(experiment, record)
        return False
