"""Random configuration values through every entry point: the CLI, the API, grid.yaml and
papermill parameters. Whatever comes in, the outcome is exit code 2 (or a ValueError from the
API) with one line, or a `failed` / `ok` record; no file appears outside results/ and the run
folder; nothing is left that would refuse the valid rerun."""

import dataclasses
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from lowmem import results
from lowmem.__main__ import main
from lowmem.config import StackConfig

FIELDS = [f.name for f in dataclasses.fields(StackConfig)]
WRONG_TYPES = ["false", "true", "1.5", "abc", "", "None", "[1]", "1e309", "nan", "-0"]
NUMBERS = ["-5", "0", "-1", "3", "1000000000000", "0.5", "2"]
PATHS = ["../x", "../../../../../../tmp/lowmem-escape", "/tmp/lowmem-escape", "a/b", "..", "~"]
POOL = WRONG_TYPES + NUMBERS + PATHS
CASES = 16


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """Relative paths resolve in tmp_path; results/ and the temp folder live there too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOWMEM_RESULTS", str(tmp_path / "results"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return tmp_path


def stray_files(root, allowed=("results", "tmp", "run")) -> list:
    """Files or folders outside the allowed top-level ones, and leftovers in the temp folder
    (the offload root may stay, empty of run folders)."""
    stray = [p for p in root.iterdir() if p.name not in allowed]
    stray += [p for p in (Path("/tmp/lowmem-escape"), root.parent / "x") if p.exists()]
    stray += [p for p in (root / "tmp").rglob("*") if p.name != "lowmem-offload"]
    return stray


def draws(seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(rng.choice(FIELDS), rng.choice(POOL)) for _ in range(CASES)]


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text
    assert "Traceback" not in text, text
    return lines[0]


@pytest.mark.parametrize("field, raw", draws(0))
def test_cli_measure(sandbox, capsys, field, raw):
    code = main(
        [
            "measure",
            "--model",
            "tiny-llama",
            "--seq-len",
            "16",
            "--stack",
            "best",
            "--meter",
            "cpu",
            "--set",
            f"{field}={raw}",
            "--experiment",
            "fuzz",
        ]
    )
    printed = capsys.readouterr()
    if code == 2:
        one_line(printed.err)
        assert not (sandbox / "results").exists()
    else:
        record = json.loads(printed.out)
        assert (code, record["status"]) in ((0, "ok"), (0, "oom"), (1, "failed"))
        assert results.record_path("fuzz", record["run_id"]).is_file()
    assert stray_files(sandbox) == []


@pytest.mark.parametrize("field, raw", draws(1))
def test_api(sandbox, field, raw):
    """The same values as Python objects (parsed as YAML would parse them) through the API."""
    value = yaml.safe_load(raw) if raw else raw
    try:
        cfg = StackConfig.from_flat(**{"stack": "best", "seq_len": 16, field: value})
    except ValueError as err:
        assert "\n" not in str(err)
        return
    from lowmem.bench import run_cell

    record = run_cell("tiny-llama", cfg, "cpu")
    assert record["status"] in ("ok", "failed")
    if record["status"] == "failed":
        assert record["error"]
    results.write_record("fuzz", record)
    assert stray_files(sandbox) == []


@pytest.mark.parametrize("field, raw", draws(2)[:8])
def test_cli_train_refuses_before_the_run_folder(sandbox, capsys, field, raw):
    """tiny-llama has no tokenizer, so no value makes this run start: each must end in one line
    before a run folder exists, whatever was wrong first."""
    code = main(
        [
            "train",
            "--model",
            "tiny-llama",
            "--task",
            "shakespeare",
            "--steps",
            "1",
            "--set",
            f"{field}={raw}",
            "--out",
            "run",
        ]
    )
    assert code == 2
    one_line(capsys.readouterr().err)
    assert not (sandbox / "run").exists()
    assert stray_files(sandbox) == []


@pytest.mark.parametrize("key, value", [(f, yaml.safe_load(r) if r else r) for f, r in draws(3)])
def test_grid_yaml(sandbox, capsys, key, value):
    """A grid whose override is not a valid value is refused before any cell runs."""
    try:
        StackConfig.from_flat(**{key: value})
    except ValueError:
        pass
    else:
        pytest.skip(f"{key}={value!r} is a valid value")  # a valid cell would run papermill
    folder = sandbox / "results" / "grid"
    folder.mkdir(parents=True)
    (folder / "grid.yaml").write_text(yaml.safe_dump({"overrides": {"seq_len": 16, key: value}}))
    assert main(["grid", str(folder)]) == 2
    one_line(capsys.readouterr().err)
    assert not (sandbox / "results" / "raw").exists()
    assert stray_files(sandbox) == []


def test_papermill_parameters(sandbox):
    """A quoted boolean and a path-like experiment through papermill: the notebook stops at
    its first code cell with the one-line error, and writes no record anywhere."""
    from lowmem.grid import RUN_NOTEBOOK

    for name, value in (("quant_symmetric", "false"), ("experiment", "../../escape")):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "papermill",
                str(RUN_NOTEBOOK),
                str(sandbox / "tmp" / "o.ipynb"),
                "-p",
                "model",
                "tiny-llama",
                "-p",
                "seq_len",
                "16",
                "-p",
                name,
                value,
            ],
            capture_output=True,
            text=True,
            cwd=sandbox,
        )
        assert done.returncode != 0
        assert "ValueError: bad " in done.stderr + done.stdout
        (sandbox / "tmp" / "o.ipynb").unlink(missing_ok=True)
    assert not (sandbox / "results").exists()
    assert stray_files(sandbox) == []
