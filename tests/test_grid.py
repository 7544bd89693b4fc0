import json

import papermill
import pytest

from lowmem import grid


def _grid(tmp_path, text):
    folder = tmp_path / "mygrid"
    folder.mkdir()
    (folder / "grid.yaml").write_text(text)
    return folder


def test_grid_cells_expand_axes_over_the_defaults(tmp_path):
    folder = _grid(
        tmp_path,
        "axes:\n  stack: [lora, best]\n  seq_len: [16, 32]\noverrides:\n  model: tiny-qwen\n",
    )
    cells = grid.load_grid(folder)
    assert len(cells) == 4 and {c["model"] for c in cells} == {"tiny-qwen"}
    assert {(c["stack"], c["seq_len"]) for c in cells} == {
        ("lora", 16),
        ("lora", 32),
        ("best", 16),
        ("best", 32),
    }
    assert all(c["experiment"] == "mygrid" and c["meter"] == "simulated" for c in cells)
    assert len(grid.load_grid(grid.results.REPO_ROOT / "experiments" / "table1")) == 70


def test_a_list_of_axis_blocks_is_the_union_of_their_products(tmp_path):
    folder = _grid(
        tmp_path,
        "overrides:\n  stack: checkpoint\naxes:\n"
        "  - cache_policy: [none, mlp]\n    offload: [disk, memory]\n"
        "  - model: [tiny-llama]\n    lora_targets: [[q_proj, v_proj], [all-linear]]\n",
    )
    cells = grid.load_grid(folder)
    assert len(cells) == 6 and all(c["stack"] == "checkpoint" for c in cells)
    assert sum(c["model"] == "tiny-llama" for c in cells) == 2
    targets = {grid.config_from_parameters(c).lora_targets for c in cells}
    assert targets == {("q_proj", "v_proj"), ("all-linear",)}
    on_cpu = grid.load_grid(folder, meter="cpu")
    assert {c["meter"] for c in on_cpu} == {"cpu"} and {c["experiment"] for c in on_cpu} == {
        "mygrid_cpu"
    }


@pytest.mark.parametrize(
    "text, message",
    [
        ("axes:\n  colour: [red]\n", "unknown parameter(s) ['colour']"),
        ("axes:\n  model: [gpt-5]\n", "unknown model 'gpt-5'"),
        ("axes:\n  seq_len: [0]\n", "bad seq_len=0"),
        ("axes:\n  meter: [gpu]\n", "unknown meter 'gpu'"),
    ],
)
def test_bad_grids_are_refused_before_any_run(tmp_path, text, message):
    with pytest.raises(ValueError) as err:
        grid.load_grid(_grid(tmp_path, text))
    assert message in str(err.value)


def test_grid_runs_the_notebook_once_per_cell_and_skips_recorded_ones(tmp_path, results_tmp):
    folder = _grid(
        tmp_path,
        "axes:\n  stack: [baseline, quantize]\noverrides:\n  model: tiny-llama\n  seq_len: 16\n",
    )
    assert grid.run_grid(folder) == {"ran": 2, "skipped": 0, "failed": 0}
    records = [json.loads(p.read_text()) for p in (results_tmp / "raw" / "mygrid").glob("*")]
    assert sorted(r["config"]["stack"] for r in records) == ["baseline", "quantize"]
    assert all(r["status"] == "ok" for r in records)
    assert grid.run_grid(folder) == {"ran": 0, "skipped": 2, "failed": 0}


def test_a_crashing_cell_becomes_a_failed_record(tmp_path, results_tmp, monkeypatch):
    def crash(*args, **kwargs):
        raise papermill.PapermillExecutionError(0, 1, "boom", "RuntimeError", "kernel died", [])

    monkeypatch.setattr(grid.papermill, "execute_notebook", crash)
    folder = _grid(tmp_path, "overrides:\n  model: tiny-llama\n  seq_len: 16\n")
    assert grid.run_grid(folder) == {"ran": 0, "skipped": 0, "failed": 1}
    (record,) = [json.loads(p.read_text()) for p in (results_tmp / "raw" / "mygrid").glob("*")]
    assert record["status"] == "failed" and "RuntimeError: kernel died" in record["error"]
