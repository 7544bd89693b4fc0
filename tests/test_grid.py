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
    targets = {grid.config_from_parameters(c).lora.targets for c in cells}
    assert targets == {("q_proj", "v_proj"), ("all-linear",)}
    on_cpu = grid.load_grid(folder, meter="cpu")
    assert {c["meter"] for c in on_cpu} == {"cpu"} and {c["experiment"] for c in on_cpu} == {
        "mygrid_cpu"
    }


def _refused(folder, message):
    """load_grid's one-line error, which names the grid file and contains `message`."""
    with pytest.raises(ValueError) as err:
        grid.load_grid(folder)
    text = str(err.value)
    assert "\n" not in text and str(folder / "grid.yaml") in text and message in text, text
    return text


@pytest.mark.parametrize(
    "text, message",
    [
        ("axes:\n  model: [gpt-5]\n", "unknown model 'gpt-5'"),
        ("axes:\n  seq_len: [0]\n", "bad seq_len=0"),
        ("axes:\n  meter: [gpu]\n", "unknown meter 'gpu'"),
    ],
)
def test_bad_grids_are_refused_before_any_run(tmp_path, text, message):
    _refused(_grid(tmp_path, text), message)


@pytest.mark.parametrize("text", ["axis:\n  seq_len: [16]\n", "override:\n  seq_len: 16\n"])
def test_a_misspelt_top_level_key_is_refused_not_run_as_a_default_cell(tmp_path, monkeypatch, text):
    def run(*args, **kwargs):
        raise AssertionError("a cell ran")

    monkeypatch.setattr(papermill, "execute_notebook", run)
    folder = _grid(tmp_path, text)
    key = text.partition(":")[0]
    assert "allowed: axes, overrides" in _refused(folder, f"unknown top-level key {key!r}")
    with pytest.raises(ValueError):
        grid.run_grid(folder)


@pytest.mark.parametrize("text", ["- axes:\n    seq_len: [16]\n", "table1\n", "16\n"])
def test_a_top_level_that_is_not_a_mapping_is_refused(tmp_path, text):
    _refused(_grid(tmp_path, text), "the top level must be a mapping")


@pytest.mark.parametrize(
    "text, line",
    [
        ("axes:\n  seq_len: [16\n  stack: [lora]\n", 3),
        ("axes:\n\tseq_len: [16]\n", 2),
        ("overrides:\n  seq_len: 16\n stack: lora\n", 3),
    ],
)
def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, text, line):
    folder = _grid(tmp_path, text)
    _refused(folder, f"{folder / 'grid.yaml'}:{line}: YAML syntax error")


@pytest.mark.parametrize(
    "text", ["axes: lora\n", "axes:\n  - lora\n", "axes:\n", "axes: []\n", "axes: {}\n"]
)
def test_axes_that_are_not_a_mapping_or_a_list_of_mappings_are_refused(tmp_path, text):
    _refused(_grid(tmp_path, text), "axes must be a non-empty mapping")


@pytest.mark.parametrize(
    "text, key",
    [
        ("axes:\n  seq_len: 1024\n", "seq_len"),
        ("axes:\n  model: tiny-llama\n", "model"),  # not iterated as 't', 'i', ...
        ("axes:\n  - stack: [lora]\n  - seq_len: []\n", "seq_len"),
        ("axes:\n  quant_symmetric: true\n", "quant_symmetric"),
    ],
)
def test_an_axis_value_that_is_not_a_non_empty_list_is_refused(tmp_path, text, key):
    _refused(_grid(tmp_path, text), f"axes: {key} must be a non-empty list")


@pytest.mark.parametrize(
    "text, where",
    [
        ("axes:\n  colour: [red]\n", "'colour' under axes"),
        ("axes:\n  - seq_len: [16]\n  - force: [true]\n", "'force' under axes"),
        ("overrides:\n  colour: red\n", "'colour' under overrides"),
        ("overrides:\n  1: 2\n  colour: red\n", "1 under overrides"),
    ],
)
def test_a_key_that_is_not_a_cell_parameter_is_refused(tmp_path, text, where):
    message = _refused(_grid(tmp_path, text), f"unknown parameter {where}")
    assert "allowed: model, meter, experiment, stack, lora_r" in message


@pytest.mark.parametrize(
    "text", ["overrides: [stack, lora]\n", "overrides: lora\n", "overrides:\n"]
)
def test_overrides_that_are_not_a_mapping_are_refused(tmp_path, text):
    _refused(_grid(tmp_path, text), "overrides must be a mapping")


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "{}\n", "overrides: {}\n"])
def test_an_empty_grid_is_refused(tmp_path, text):
    _refused(_grid(tmp_path, text), "empty grid")


@pytest.mark.parametrize(
    "text, message",
    [
        ("overrides:\n  model: [tiny-llama]\n", "unknown model ['tiny-llama']"),
        ("axes:\n  model: [[tiny-llama]]\n", "unknown model ['tiny-llama']"),
        ("axes:\n  meter: [[cpu]]\n", "unknown meter ['cpu']"),
        ("axes:\n  experiment: [../escape]\n", "bad experiment '../escape'"),
        ("overrides:\n  experiment: a/b\n", "bad experiment 'a/b'"),
        ("overrides:\n  experiment: 7\n", "bad experiment 7"),
        ("overrides:\n  quant_symmetric: 'false'\n", "bad quant_symmetric='false'"),
        ("overrides:\n  seq_len: '16'\n", "bad seq_len='16'"),
    ],
)
def test_model_meter_experiment_and_values_are_checked_as_given(tmp_path, text, message):
    _refused(_grid(tmp_path, text), message)


def test_the_folder_name_must_be_a_slug_to_name_the_experiment(tmp_path):
    folder = tmp_path / "my grid"
    folder.mkdir()
    (folder / "grid.yaml").write_text("overrides:\n  seq_len: 16\n")
    _refused(folder, "bad experiment 'my grid'")


def test_cells_hold_the_yaml_values_unchanged(tmp_path):
    folder = _grid(
        tmp_path,
        "overrides:\n  quant_symmetric: false\n  trainable_fraction: 1\n"
        "axes:\n  lora_targets: [[q_proj, v_proj]]\n",
    )
    (cell,) = grid.load_grid(folder)
    assert cell["quant_symmetric"] is False and cell["trainable_fraction"] == 1
    assert cell["lora_targets"] == ["q_proj", "v_proj"]


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

    monkeypatch.setattr(papermill, "execute_notebook", crash)
    folder = _grid(tmp_path, "overrides:\n  model: tiny-llama\n  seq_len: 16\n")
    assert grid.run_grid(folder) == {"ran": 0, "skipped": 0, "failed": 1}
    (record,) = [json.loads(p.read_text()) for p in (results_tmp / "raw" / "mygrid").glob("*")]
    assert record["status"] == "failed" and "RuntimeError: kernel died" in record["error"]


def test_run_cell_refuses_a_quoted_force():
    from lowmem.grid import check_cell

    cell = {"model": "tiny-llama", "meter": "simulated", "experiment": "x", "force": "false"}
    with pytest.raises(ValueError, match="bad force='false': must be true or false"):
        check_cell(cell)
    check_cell({**cell, "force": False})
