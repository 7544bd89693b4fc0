import shutil

import pytest
from test_results import _record

from lowmem import figures, results, tables
from lowmem.config import ROWS, StackConfig

COMMITTED = results.REPO_ROOT / "results" / "raw"


def _peak(records, model, stack, seq_len):
    (r,) = [
        r
        for r in records
        if (r["model"], r["config"]["stack"], r["config"]["seq_len"]) == (model, stack, seq_len)
    ]
    return r["metrics"]["peak_gib"]


def test_waterfall_is_the_step_between_consecutive_rows_ours_and_the_papers():
    records = results.load_records("table1")
    frame = figures.waterfall_frame(records).set_index(["model", "technique", "source"])
    saved = frame["saved_gib"]
    assert len(saved) == 2 * 5 * 2  # models x paper techniques after the baseline x sources
    for before, after in zip(ROWS[:5], ROWS[1:6], strict=True):
        label = figures.LABELS[after]
        ours = _peak(records, "llama-3.2-3b", before, 2048) - _peak(
            records, "llama-3.2-3b", after, 2048
        )
        assert saved["llama-3.2-3b", label, "ours"] == pytest.approx(ours)
    assert saved["llama-3.2-3b", figures.LABELS["lora"], "paper"] == pytest.approx(29.97 - 26.20)


def test_context_frame_keeps_our_oom_predictions_and_only_numeric_paper_cells():
    frame = figures.context_frame(results.load_records("table1"))
    ours, theirs = frame[frame["source"] == "ours"], frame[frame["source"] == "paper"]
    assert len(ours) == 70 and ours["peak_gib"].notna().all()
    assert len(theirs) == 60 - 9  # 60 paper cells, 9 of them OOM
    assert (ours[ours["seq_len"] == 16384]["peak_gib"] > 0).all()


def test_draw_all_writes_each_figure_whose_records_exist(results_tmp):
    shutil.copytree(COMMITTED / "table1", results_tmp / "raw" / "table1")
    for k in (100, 1000):
        cfg = StackConfig.from_flat(stack="softmax_approx", seq_len=2048, softmax_k=k)
        rec = {**_record(stack="softmax_approx", seq_len=2048, gib=1 + k / 1000)}
        rec.update(run_id=results.run_id("llama-3.2-3b", cfg, "simulated"), config=cfg.to_dict())
        results.write_record("softmax_k", rec)
    paths = figures.draw_all()
    assert sorted(p.name for p in paths) == ["context.png", "softmax_k.png", "waterfall.png"]
    folder = results_tmp / "figures"
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in paths)
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_an_ablation_table_lists_the_settings_that_vary(results_tmp):
    for k, gib in ((100, 1.5), (5000, 2.5)):
        cfg = StackConfig.from_flat(stack="softmax_approx", seq_len=2048, softmax_k=k)
        rec = _record(stack="softmax_approx", seq_len=2048, gib=gib)
        rec.update(run_id=results.run_id("llama-3.2-3b", cfg, "simulated"), config=cfg.to_dict())
        results.write_record("k", rec)
    csv, md = tables.write_tables("k")
    text = md.read_text()
    assert "| softmax_k | peak GiB | peak phase |" in text
    assert "| 100 | 1.500 |" in text and "| 5000 | 2.500 |" in text
    assert "stack=softmax_approx" in text and "paper" not in text.split("\n", 3)[3]
