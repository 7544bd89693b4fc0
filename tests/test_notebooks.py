import ast
import json
from pathlib import Path

import papermill
import pytest

from lowmem.config import StackConfig
from lowmem.options import RUN_NOTEBOOK, field_parameters
from lowmem.settings import flat_fields

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
# one study notebook per technique (STYLE.md: one technique = one module = one notebook)
STUDIES = (
    "01_lora",
    "02_quantize",
    "03_checkpoint",
    "04_softmax_approx",
    "05_logits_mask",
    "06_fused_loss",
)
# a parameters cell names config fields, plus what says where and how a notebook measures
PARAMETER_NAMES = set(flat_fields(StackConfig)) | {
    "model",
    "meter",
    "experiment",
    "force",
    "paper_model",
    "n_contexts",
    "budgets_gib",
    "contexts",
}
# parameters that keep a notebook's test run small where its defaults are paper-scale
TEST_PARAMETERS = {"08_budget": {"model": "tiny-llama", "seq_len": 64, "contexts": "64,128"}}
# notebooks that only read committed records (and say so when there are none)
READERS = ("09_quality",)


def _parameters_cell(path: Path) -> dict:
    cells = json.loads(path.read_text())["cells"]
    return next(c for c in cells if "parameters" in c["metadata"].get("tags", []))


def test_every_technique_has_a_study_notebook():
    assert set(STUDIES) <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    cells = json.loads(path.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)
    assert any("parameters" in c["metadata"].get("tags", []) for c in code)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_are_flat_scalars_named_like_config_fields(path):
    tree = ast.parse("".join(_parameters_cell(path)["source"]))
    for stmt in tree.body:
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1, ast.unparse(stmt)
        target = stmt.targets[0]
        assert isinstance(target, ast.Name) and target.id in PARAMETER_NAMES, ast.unparse(stmt)
        value = ast.literal_eval(stmt.value)  # raises unless a literal (-1 included)
        assert isinstance(value, str | int | float | bool), ast.unparse(stmt)


# the two slowest notebook runs (35 s and 27 s on 2 cores) in the slow tier: the default tier
# was at 9 min 25 s of its 10 (session 11); the other notebooks cover the papermill path
SLOW_NOTEBOOKS = ("04_softmax_approx", "07_your_model")


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW_NOTEBOOKS else p for p in NOTEBOOKS],
    ids=lambda p: p.stem,
)
def test_notebook_runs_under_papermill_and_writes_ok_records(path, tmp_path, results_tmp):
    papermill.execute_notebook(
        str(path),
        str(tmp_path / path.name),
        parameters={"experiment": "nbtest", **TEST_PARAMETERS.get(path.stem, {})},
        cwd=str(tmp_path),
        progress_bar=False,
        kernel_name="python3",
    )
    records = list((results_tmp / "raw" / "nbtest").glob("*.json"))
    if path.stem in READERS:
        assert not records
        return
    assert records
    statuses = {json.loads(p.read_text())["status"] for p in records}
    assert statuses <= {"ok", "oom"} and "ok" in statuses
    if path.stem in STUDIES:  # a study writes one record: its technique's row, status ok
        assert len(records) == 1 and statuses == {"ok"}


def test_the_run_notebook_lists_every_config_field_at_its_default():
    """A grid cell that does not set a field must get StackConfig's default, not the
    notebook's: the run notebook names every field, with the default as its value."""
    tree = ast.parse(
        "".join(
            _parameters_cell(Path(__file__).parents[1] / "notebooks" / "run_cell.ipynb")["source"]
        )
    )
    values = {n.targets[0].id: ast.literal_eval(n.value) for n in tree.body}
    for f in flat_fields(StackConfig).values():
        default = ",".join(f.default) if isinstance(f.default, tuple) else f.default
        assert values.get(f.name, "missing") == default, f.name
    # and those lines are the ones generated from StackConfig's fields, docstrings included
    source = "".join(_parameters_cell(RUN_NOTEBOOK)["source"])
    assert source.endswith(field_parameters(StackConfig)), "rerun `python -m lowmem.options`"


def test_papermill_reads_every_parameter_of_the_run_notebook():
    """papermill skips a parameter line holding two "=" (its doc comment's) and then warns that
    the parameter passed is unknown: it must infer every StackConfig field from the cell."""
    inferred = papermill.inspect_notebook(str(RUN_NOTEBOOK))
    assert sorted(set(flat_fields(StackConfig)) - set(inferred)) == []
