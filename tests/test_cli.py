import json

import pytest

from lowmem.__main__ import main
from lowmem.config import StackConfig
from lowmem.settings import flat_fields


def test_measure_prints_a_record_and_can_save_it(capsys, results_tmp):
    code = main(
        [
            "measure",
            "--model",
            "tiny-qwen",
            "--stack",
            "baseline",
            "--seq-len",
            "32",
            "--meter",
            "cpu",
            "--experiment",
            "cli",
        ]
    )
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["status"] == "ok" and record["meter"] == "cpu"
    assert record["metrics"]["trainable_parameters"] == record["metrics"]["parameters"]
    assert (results_tmp / "raw" / "cli" / f"{record['run_id']}.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seq-len", "0"], "error: bad seq_len=0: must be an integer > 0"),
        (["--lora-targets", "q_proj,foo"], "error: bad lora_targets='q_proj,foo'"),
        (["--lora-r", "-1"], "error: bad lora_r=-1"),
    ],
)
def test_bad_options_exit_2_with_one_clear_line(capsys, args, message):
    assert main(["measure", "--model", "tiny-llama", *args]) == 2
    assert message in capsys.readouterr().err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["measure", "--help"])
    out = capsys.readouterr().out
    for option in (
        "--model",
        "--stack",
        "--seq-len",
        "--meter",
        "--lora-targets",
        "--model-path",
        "--experiment",
    ):
        assert option in out


def test_every_config_field_has_its_own_flag_with_its_docstring(capsys):
    """The flags are generated from StackConfig: none to keep in sync by hand."""
    with pytest.raises(SystemExit):
        main(["measure", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name, f in flat_fields(StackConfig).items():
        if name != "stack":
            assert f"--{name.replace('_', '-')}" in out
            assert f.doc and f.doc.split(".")[0] in out, name


def test_a_boolean_flag_takes_true_or_false_and_refuses_anything_else(capsys):
    args = ["measure", "--model", "tiny-llama", "--stack", "checkpoint", "--seq-len", "16"]
    assert main([*args, "--stream-weights", "false", "--offload", "memory"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["stream_weights"] is False
    assert main([*args, "--stream-weights", "maybe"]) == 2
    assert "error: bad stream_weights='maybe': must be true or false" in capsys.readouterr().err


def test_table_rebuilds_tables_from_records(capsys, results_tmp):
    main(["measure", "--model", "tiny-llama", "--seq-len", "16", "--experiment", "x"])
    capsys.readouterr()
    assert main(["table", "x"]) == 0
    assert "| tiny-llama | + LoRA (r=16) |" in capsys.readouterr().out
    assert (results_tmp / "tables" / "x.md").is_file()


def test_non_default_options_reach_the_config_and_the_run_id(capsys, results_tmp):
    code = main(
        [
            "measure",
            "--model",
            "tiny-llama",
            "--stack",
            "quantize",
            "--seq-len",
            "16",
            "--quant-bits",
            "8",
            "--quant-group-size",
            "0",
            "--gqa",
            "repeat_kv",
        ]
    )
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["status"] == "ok"
    assert record["config"]["quant_bits"] == 8 and record["config"]["gqa"] == "repeat_kv"
    assert record["run_id"] == (
        "tiny-llama__quantize__T16__simulated__quant_bits=8__quant_group_size=0__gqa=repeat_kv"
    )


def test_set_reaches_any_config_field(capsys):
    code = main(
        [
            "measure",
            "--model",
            "tiny-llama",
            "--stack",
            "logits_mask",
            "--seq-len",
            "32",
            "--set",
            "softmax_k=50",
            "--set",
            "softmax_rule=target_neighbors",
        ]
    )
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["status"] == "ok", record["error"]
    assert record["config"]["softmax_k"] == 50
    assert record["config"]["softmax_rule"] == "target_neighbors"
    assert main(["measure", "--model", "tiny-llama", "--set", "colour=red"]) == 2


def _measure(*extra: str) -> list[str]:
    return ["measure", "--model", "tiny-llama", "--seq-len", "16", "--meter", "cpu", *extra]


def test_records_of_different_weights_never_share_a_name(tmp_path, capsys, results_tmp):
    import torch

    from lowmem.models import build_model

    for seed, folder in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        build_model("tiny-llama").save_pretrained(tmp_path / folder)
    ids = []
    for extra in ([], ["--model-path", str(tmp_path / "a")], ["--model-path", str(tmp_path / "b")]):
        assert main(_measure("--experiment", "x", *extra)) == 0
        record = json.loads(capsys.readouterr().out)
        ids.append(record["run_id"])
        if extra:
            assert record["weights"]["path"] == str((tmp_path / extra[1][-1]).resolve())
            assert record["run_id"].endswith("__w" + record["weights"]["sha256"][:16])
        else:
            assert record["weights"]["path"] is None
    assert len(set(ids)) == 3
    assert len(list((results_tmp / "raw" / "x").glob("*.json"))) == 3


def test_a_failed_measurement_says_why_on_stderr_in_one_line(capsys, results_tmp, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the step broke")

    monkeypatch.setattr("lowmem.bench.measure_step", broken)
    assert main(_measure()) == 1
    printed = capsys.readouterr()
    assert json.loads(printed.out)["status"] == "failed"
    assert printed.err.strip().splitlines()[-1] == "error: RuntimeError: the step broke"


def test_a_path_in_offload_dir_or_experiment_writes_nothing_outside_results(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("LOWMEM_RESULTS", str(tmp_path / "results"))
    escape = "../" * 12 + str(tmp_path / "escaped").lstrip("/")
    args = _measure("--stack", "checkpoint", "--offload-dir", escape, "--experiment", "y")
    main(args)  # refused or measured: either way, only results/ may change
    assert main(_measure("--experiment", escape)) == 2
    assert "bad experiment" in capsys.readouterr().err
    assert [p for p in tmp_path.rglob("*") if "results" not in p.parts] == []


@pytest.mark.parametrize(
    "argv",
    [
        ["measure", "--model", "tiny-llama", "--seq-len", "16", "--experiment", "../../esc"],
        ["speed", "--model", "tiny-llama", "--stacks", "lora", "--experiment", "/tmp/esc"],
        ["speed", "--model", "tiny-llama", "--stacks", "checkpoint:offload_dir=../../esc"],
        ["table", "../esc"],
    ],
)
def test_no_command_takes_a_path_into_a_record_or_table_name(argv, capsys, results_tmp):
    """Every configuration string that reaches a file name: experiment names are refused before
    any work; offload_dir never reaches a name (it is only checked as a folder)."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not results_tmp.exists()


def test_quality_seeds_reach_the_protocol_and_a_negative_one_is_refused(capsys, monkeypatch):
    from lowmem import quality, quality_table

    calls = []
    monkeypatch.setattr(quality, "run", lambda tasks, rows, protocol, force: calls.append(protocol))
    monkeypatch.setattr(
        quality_table, "write_table", lambda: (None, type("P", (), {"read_text": str})())
    )
    assert main(["quality", "--rows", "lora", "--tasks", "shakespeare", "--seeds", "2", "0"]) == 0
    assert [p.seeds for p in calls] == [(2, 0)]
    assert main(["quality", "--seeds", "-1"]) == 2 and not calls[1:]
    assert "seed -1 is negative" in capsys.readouterr().err


def test_lowmem_and_its_non_table_commands_leave_heavy_modules_unimported():
    """Process memory is what a small machine lives with: `import lowmem` (a user's own loop),
    `convert`, `budget` and `measure` load no table or JIT library (pandas +64 MiB RSS, numba
    +54 MiB and more once it compiles; experiments/LOG.md, session 16)."""
    import subprocess
    import sys

    code = (
        "import sys, lowmem, lowmem.__main__, lowmem.convert, lowmem.planner, lowmem.bench;"
        "print(sorted(m for m in ('pandas', 'numba', 'datasets', 'seaborn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
