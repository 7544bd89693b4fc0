import json

import pytest
from test_bench import REPRODUCED

from lowmem import results, tables
from lowmem.config import ROWS, StackConfig


def _record(model="llama-3.2-3b", stack="lora", seq_len=1024, status="ok", gib=19.0):
    return {
        "run_id": results.run_id(model, StackConfig(stack=stack, seq_len=seq_len), "simulated"),
        "status": status,
        "model": model,
        "config": StackConfig(stack=stack, seq_len=seq_len).to_dict(),
        "meter": "simulated",
        "device": "cpu",
        "metrics": {"peak_gib": gib},
    }


def test_records_are_written_atomically_and_read_back(results_tmp):
    path = results.write_record("exp", _record())
    assert path == results_tmp / "raw" / "exp" / "llama-3.2-3b__lora__T1024__simulated.json"
    (back,) = results.load_records("exp")
    assert back["experiment"] == "exp" and back["metrics"]["peak_gib"] == 19.0
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_failed_write_leaves_no_partial_record(results_tmp):
    bad = _record()
    bad["metrics"] = {"peak_gib": object()}  # not JSON-serialisable: fails mid-write
    with pytest.raises(TypeError):
        results.write_record("exp", bad)
    assert list((results_tmp / "raw" / "exp").iterdir()) == []


def test_a_record_needs_a_known_status(results_tmp):
    with pytest.raises(ValueError, match="record status 'done' must be one of"):
        results.write_record("exp", _record(status="done"))


def test_environment_names_versions_and_commit():
    env = results.environment()
    assert env["versions"]["torch"].startswith("2.13.0")
    assert set(env) >= {"python", "platform", "commit", "dirty"}


def test_a_record_names_the_code_the_process_runs_and_a_later_commit(monkeypatch):
    started = results.code_state()
    assert "changed_while_running" not in started  # nothing moved during this test run
    later = {"commit": "0" * 40, "dirty": False}
    monkeypatch.setattr(results, "_git_state", lambda: later)
    env = results.environment()
    assert (env["commit"], env["dirty"]) == (started["commit"], started["dirty"])
    assert env["changed_while_running"] == later


def test_tables_put_paper_values_and_ratios_beside_ours(results_tmp):
    for rec in (
        _record(gib=18.0),  # within 10%
        _record(seq_len=2048, gib=26.2 * 1.2),  # 20% high: a miss
        _record(seq_len=16384, status="oom", gib=125.7),  # paper OOM too
        _record(stack="baseline", seq_len=8192, gib=70.0),  # paper OOM, ours fits: a miss
    ):
        results.write_record("t1", rec)
    csv, md = tables.write_tables("t1")
    frame = tables.cell_frame(results.load_records("t1")).set_index(["stack", "seq_len"])
    assert frame.loc[("lora", 1024), "ratio"] == pytest.approx(18.0 / 19.1)
    assert list(frame["reproduced"].sort_index()) == [False, True, False, True]
    text = md.read_text()
    row = "| llama-3.2-3b | + LoRA (r=16) | 18.00 / 19.10 (0.94) | 31.44 / 26.20 (1.20) ✗ |  |"
    assert row in text
    assert "OOM (125.7) / OOM |" in text and "70.00 / OOM ✗" in text
    assert csv.read_text().splitlines()[0].startswith("model,stack,label,seq_len,meter,status")


def test_committed_table1_records_reproduce_every_paper_cell():
    frame = tables.cell_frame(results.load_records("table1"))
    assert len(frame) == 10 * len(ROWS) and set(frame["stack"]) == set(ROWS)
    assert (frame["status"] != "failed").all()
    frame = frame[frame["stack"].isin(REPRODUCED)]
    misses = frame[~frame["reproduced"].astype(bool)]
    assert misses.empty, misses[["model", "stack", "seq_len", "peak_gib", "paper_gib"]]
    for rec in results.load_records("table1"):
        assert rec["meter"] == "simulated" and rec["environment"]["commit"]
    assert (
        json.loads(
            results.record_path(
                "table1", frame.iloc[0]["model"] + "__baseline__T1024__simulated"
            ).read_text()
        )["status"]
        == "ok"
    )


@pytest.mark.parametrize("stack", ["lora", "checkpoint"])
def test_committed_3b_cpu_run_equals_its_simulation_to_the_byte(stack):
    records = [r for r in results.load_records("meter_check") if r["config"]["stack"] == stack]
    by_meter = {r["meter"]: r["metrics"] for r in records}
    assert by_meter["cpu"]["peak_bytes"] == by_meter["simulated"]["peak_bytes"]
    assert by_meter["cpu"]["phase_peak_bytes"] == by_meter["simulated"]["phase_peak_bytes"]
    # the process also holds the interpreter and libraries (~0.5 GiB) beside the tensors
    rss = by_meter["cpu"]["peak_rss_bytes"]
    assert by_meter["cpu"]["peak_bytes"] < rss < by_meter["cpu"]["peak_bytes"] + 2**30


def test_readme_table_and_headline_ratios_agree_with_the_records():
    readme = (results.REPO_ROOT / "README.md").read_text()
    block = readme.split(tables.README_START)[1].split(tables.README_END)[0]
    assert block.strip() == tables.readme_block("table1").strip()
    assert "Headline ratios" in block and "+ LoRA / best" in block


def test_committed_best_row_beats_the_papers_final_row_everywhere():
    frame = tables.cell_frame(results.load_records("table1")).set_index(
        ["model", "stack", "seq_len"]
    )
    for (model, stack, seq_len), row in frame.iterrows():
        if stack == "best":
            final = frame.loc[(model, "logits_mask", seq_len), "paper_gib"]
            assert row["status"] == "ok" and row["peak_gib"] < final, (model, seq_len)


@pytest.mark.parametrize(
    "experiment", ["../x", "a/b", "..", "/tmp/x", "", ".hidden", "a b", "a\\b", "x/../../y"]
)
def test_experiment_names_that_could_leave_results_are_refused(results_tmp, experiment):
    with pytest.raises(ValueError, match="bad experiment .*no path separators"):
        results.record_path(experiment, "r")
    record = {"run_id": "r", "status": "ok"}
    with pytest.raises(ValueError, match="bad experiment"):
        results.write_record(experiment, record)
    assert not results_tmp.exists()


def test_offload_dir_never_reaches_a_record_name(results_tmp):
    cfg = StackConfig.from_flat(stack="checkpoint", offload_dir="../../../../../../tmp/x")
    rid = results.run_id("tiny-llama", cfg, "simulated")
    assert rid == results.run_id("tiny-llama", StackConfig(stack="checkpoint"), "simulated")
    assert results.record_path("y", rid).parent == results_tmp / "raw" / "y"


def test_a_table_name_that_could_leave_results_is_refused(results_tmp):
    with pytest.raises(ValueError, match="bad experiment '../../x'"):
        tables.write_tables("../../x")
