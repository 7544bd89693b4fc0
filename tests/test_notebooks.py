import json
from pathlib import Path

import papermill
import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    cells = json.loads(path.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)
    assert any("parameters" in c["metadata"].get("tags", []) for c in code)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_under_papermill_and_writes_ok_records(path, tmp_path, results_tmp):
    papermill.execute_notebook(
        str(path),
        str(tmp_path / path.name),
        parameters={"experiment": "nbtest"},
        cwd=str(tmp_path),
        progress_bar=False,
        kernel_name="python3",
    )
    records = list((results_tmp / "raw" / "nbtest").glob("*.json"))
    assert records
    statuses = {json.loads(p.read_text())["status"] for p in records}
    assert statuses <= {"ok", "oom"} and "ok" in statuses
