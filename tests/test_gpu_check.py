"""`make gpu-check` on a machine without a GPU: the cells, the refusal, the table."""

import pytest
import torch

from lowmem import gpu_check, results
from lowmem.config import ROWS, StackConfig

GiB = 2**30


def _record(model, stack, meter, status="ok", cfg=None, **metrics):
    cfg = cfg or StackConfig(stack=stack, seq_len=2048)
    return {
        "run_id": results.run_id(model, cfg, meter),
        "status": status,
        "model": model,
        "config": cfg.to_dict(),
        "meter": meter,
        "metrics": metrics if status == "ok" else {},
    }


@pytest.fixture
def gpu(monkeypatch):
    """torch as it is on a GPU machine, for the parts of main that ask it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 0)


def test_the_cells_are_both_paper_models_times_every_row_at_2048():
    cells = gpu_check.cells()
    assert len(cells) == 14
    assert [(m, c.stack) for m, c in cells] == [
        (m, s) for m in ("llama-3.2-3b", "qwen-2.5-3b") for s in ROWS
    ]
    assert {c.seq_len for _, c in cells} == {2048}
    assert all(c == StackConfig(stack=c.stack, seq_len=2048) for _, c in cells)  # defaults


def test_without_cuda_it_refuses_with_one_line_and_writes_nothing(monkeypatch, capsys, results_tmp):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "CUDA GPU" in err
    assert not results_tmp.exists()


def test_the_table_puts_cuda_beside_simulated():
    table = gpu_check.comparison_table(
        [
            _record("llama-3.2-3b", "lora", "simulated", peak_bytes=2 * GiB),
            _record(
                "llama-3.2-3b",
                "lora",
                "cuda",
                peak_bytes=int(2.5 * GiB),
                reserved_peak_bytes=3 * GiB,
                tracked_peak_bytes=2 * GiB,
            ),
            _record("qwen-2.5-3b", "baseline", "cuda", status="oom"),
        ]
    )
    lines = table.splitlines()
    assert lines[0].startswith(
        "| model | row | T | cuda GiB | reserved GiB | tracked GiB | simulated GiB |"
    )
    assert lines[2] == "| llama-3.2-3b | lora | 2048 | 2.50 | 3.00 | 2.00 | 2.00 | 1.250 | -, - |"
    assert lines[3] == "| qwen-2.5-3b | baseline | 2048 | oom | oom | oom | - | - | -, - |"


def test_main_measures_each_cell_under_both_meters_and_prints_the_table(
    gpu, monkeypatch, capsys, results_tmp
):
    ran = []

    def fake_grid(experiment, cells, executor, force=False):
        for model, cfg, meter in cells:
            ran.append((model, cfg.stack, meter))
            record = _record(model, cfg.stack, meter, peak_bytes=GiB, tracked_peak_bytes=GiB)
            results.write_record(experiment, record)

    monkeypatch.setattr(gpu_check, "run_cells", fake_grid)
    assert gpu_check.main([]) == 0
    assert sorted(ran) == sorted(
        (m, c.stack, t) for m, c in gpu_check.cells() for t in ("cuda", "simulated")
    )
    assert len(list((results_tmp / "raw" / "gpu_check").glob("*.json"))) == 28
    out = capsys.readouterr().out
    assert out.count("| 1.00 | - | 1.00 | 1.00 | 1.000 |") == 14


def test_long_adds_the_two_rows_below_the_paper_at_long_contexts():
    extra = [c for c in gpu_check.cells(long=True) if c not in gpu_check.cells()]
    assert sorted((m, c.stack, c.seq_len) for m, c in extra) == sorted(
        (m, s, t)
        for m in ("llama-3.2-3b", "qwen-2.5-3b")
        for s in ("softmax_approx", "logits_mask")
        for t in (4096, 8192, 16384)
    )


def test_cuda_alone_takes_the_simulated_figure_from_table1(gpu, monkeypatch, capsys, results_tmp):
    results.write_record("table1", _record("llama-3.2-3b", "lora", "simulated", peak_bytes=GiB))
    ran = []

    def fake_grid(experiment, cells, executor, force=False):
        for model, cfg, meter in cells:
            ran.append(meter)
            results.write_record(experiment, _record(model, cfg.stack, meter, peak_bytes=2 * GiB))

    monkeypatch.setattr(gpu_check, "run_cells", fake_grid)
    assert gpu_check.main(["--meters", "cuda"]) == 0
    assert set(ran) == {"cuda"} and len(ran) == 14
    row = [x for x in capsys.readouterr().out.splitlines() if "| llama-3.2-3b | lora |" in x]
    assert row == ["| llama-3.2-3b | lora | 2048 | 2.00 | - | - | 1.00 | 2.000 | -, - |"]


def test_bad_meters_are_refused_naming_the_value(capsys):
    try:
        gpu_check.main(["--meters", "cuda,rocm"])
    except SystemExit as stop:
        assert stop.code == 2
    assert "rocm" in capsys.readouterr().err


def test_table_measures_nothing_and_writes_the_table(monkeypatch, capsys, results_tmp):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "run_cells", lambda *a, **k: pytest.fail("measured"))
    record = _record("qwen-2.5-3b", "best", "cuda", peak_bytes=GiB)
    results.write_record("gpu_check", {**record, "environment": {"commit": "660b8e2e3f0a"}})
    assert gpu_check.main(["--table"]) == 0
    table = (results_tmp / "tables" / "gpu_check.md").read_text()
    assert "| qwen-2.5-3b | best | 2048 | 1.00 | - | - | - | - | 660b8e2, - |" in table


def test_rows_and_seq_lens_pick_the_cells(gpu, monkeypatch, results_tmp):
    ran = []

    def fake_grid(experiment, cells, executor, force=False):
        for model, cfg, meter in cells:
            ran.append((model, cfg.stack, cfg.seq_len, cfg.to_dict()["gqa"]))
            record = _record(model, cfg.stack, meter, cfg=cfg, peak_bytes=2 * GiB)
            results.write_record(experiment, record)

    monkeypatch.setattr(gpu_check, "run_cells", fake_grid)
    # the default path's cell is recorded too: the table shows both, each on its own row
    results.write_record("gpu_check", _record("llama-3.2-3b", "best", "cuda", peak_bytes=GiB))
    argv = ["--meters", "cuda", "--long", "--models", "llama-3.2-3b", "--gqa", "repeat_kv"]
    assert gpu_check.main([*argv, "--rows", "logits_mask,best", "--seq-lens", "2048,16384"]) == 0
    assert sorted(ran) == [
        ("llama-3.2-3b", "best", 2048, "repeat_kv"),
        ("llama-3.2-3b", "logits_mask", 2048, "repeat_kv"),
        ("llama-3.2-3b", "logits_mask", 16384, "repeat_kv"),
    ]
    table = (results_tmp / "tables" / "gpu_check.md").read_text()
    assert "| llama-3.2-3b | best | 2048 | 1.00 |" in table
    assert "| llama-3.2-3b | best, gqa=repeat_kv | 2048 | 2.00 |" in table
    assert "| llama-3.2-3b | logits_mask, gqa=repeat_kv | 16384 | 2.00 |" in table


@pytest.mark.parametrize(
    "argv, bad",
    [
        (["--rows", "lora,flash"], "lora,flash"),
        (["--seq-lens", "4096"], "4096"),  # a long length without --long
        (["--long", "--seq-lens", "4k"], "4k"),
    ],
)
def test_bad_rows_or_seq_lens_are_refused_naming_the_value(argv, bad, capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--meters", "cuda", *argv])
    assert stop.value.code == 2
    assert bad in capsys.readouterr().err
