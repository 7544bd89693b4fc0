"""Grids of runs: an experiment folder's grid.yaml -> cells -> one papermill run per cell.

`experiments/<name>/grid.yaml` names its axes (every combination is a cell) and overrides of
`experiments/defaults.yaml`; `axes` may also be a list of such blocks, and the grid is then the
union of their products (e.g. one block on the 3B models, one on a small model). A cell is the
flat parameter set of `notebooks/run_cell.ipynb` (model, meter, experiment and the fields of
`StackConfig`). Every cell is validated before any
runs. Cells whose record exists are skipped unless forced; a cell that crashes the notebook
becomes a `failed` record with the error, and the grid carries on.
"""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
from pathlib import Path

import papermill
import yaml
from tqdm.auto import tqdm

from lowmem import results
from lowmem.config import StackConfig
from lowmem.memory import METERS
from lowmem.models import get_spec

DEFAULTS = results.REPO_ROOT / "experiments" / "defaults.yaml"
RUN_NOTEBOOK = results.REPO_ROOT / "notebooks" / "run_cell.ipynb"
_FIELDS = tuple(f.name for f in dataclasses.fields(StackConfig))
_KEYS = ("model", "meter", "experiment", *_FIELDS)


def config_from_parameters(params: dict) -> StackConfig:
    """The StackConfig of a cell's (or a notebook namespace's) flat parameters."""
    return StackConfig(**{k: params[k] for k in _FIELDS if k in params})


def load_grid(folder: str | Path, meter: str | None = None) -> list[dict]:
    """Every cell of the grid, validated: unknown keys, models or config values raise.

    `meter` (e.g. "cuda") replaces every cell's meter; cells whose meter it changes write to
    the experiment `<name>_<meter>`, so real measurements never mix with the committed ones.
    """
    folder = Path(folder)
    path = folder / "grid.yaml"
    if not path.is_file():
        raise ValueError(f"{path} does not exist; a grid folder needs a grid.yaml")
    spec = yaml.safe_load(path.read_text()) or {}
    base = {
        **yaml.safe_load(DEFAULTS.read_text()),
        "experiment": folder.name,
        **(spec.get("overrides") or {}),
    }
    blocks = spec.get("axes") or {}
    blocks = blocks if isinstance(blocks, list) else [blocks]
    cells = [
        {**base, **dict(zip(axes, combo, strict=True))}
        for axes in blocks
        for combo in itertools.product(*axes.values())
    ]
    for cell in cells:
        if meter and meter != cell["meter"]:
            cell.update(meter=meter, experiment=f"{cell['experiment']}_{meter}")
    for cell in cells:
        unknown = sorted(set(cell) - set(_KEYS))
        if unknown:
            raise ValueError(f"{path}: unknown parameter(s) {unknown}; allowed: {list(_KEYS)}")
        get_spec(cell["model"])
        if cell["meter"] not in METERS:
            raise ValueError(f"unknown meter {cell['meter']!r}; choose one of {', '.join(METERS)}")
        config_from_parameters(cell)
    return cells


def run_grid(folder: str | Path, force: bool = False, meter: str | None = None) -> dict:
    """Execute the run notebook for each cell not recorded yet; count what happened."""
    counts = {"ran": 0, "skipped": 0, "failed": 0}
    cells = load_grid(folder, meter)
    for cell in tqdm(cells, desc=Path(folder).name, unit="cell"):
        cfg = config_from_parameters(cell)
        rid = results.run_id(cell["model"], cfg, cell["meter"])
        if results.record_path(cell["experiment"], rid).exists() and not force:
            counts["skipped"] += 1
            continue
        params = {**cell, "force": force}
        if isinstance(params.get("lora_targets"), list | tuple):
            params["lora_targets"] = ",".join(params["lora_targets"])
        try:
            with tempfile.TemporaryDirectory() as tmp:
                papermill.execute_notebook(
                    str(RUN_NOTEBOOK),
                    str(Path(tmp) / "out.ipynb"),
                    parameters=params,
                    kernel_name="python3",
                    progress_bar=False,
                )
            counts["ran"] += 1
        except papermill.PapermillExecutionError as err:
            results.write_record(
                cell["experiment"],
                {
                    "run_id": rid,
                    "status": "failed",
                    "model": cell["model"],
                    "config": cfg.to_dict(),
                    "meter": cell["meter"],
                    "device": None,
                    "metrics": {},
                    "error": f"{err.ename}: {err.evalue}",
                    "environment": results.environment(),
                },
            )
            counts["failed"] += 1
    return counts
