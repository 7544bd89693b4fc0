import pytest

from lowmem import speed
from lowmem.config import StackConfig
from lowmem.speed import time_stacks


def test_timing_reports_ratios_and_dequantization_time():
    cfgs = [StackConfig(stack="lora", seq_len=32), StackConfig(stack="quantize", seq_len=32)]
    rows = time_stacks("tiny-llama", cfgs, steps=2, warmup=0)
    assert rows["lora"]["ratio"] == 1.0 and len(rows["quantize"]["steps_s"]) == 2
    assert rows["quantize"]["ratio"] == rows["quantize"]["step_s"] / rows["lora"]["step_s"]
    assert rows["lora"]["lowmem.dequantize_s"] == 0.0
    assert 0 < rows["quantize"]["lowmem.dequantize_share"] < 1


def test_bad_step_counts_are_refused():
    with pytest.raises(ValueError, match="bad steps=0"):
        time_stacks("tiny-llama", [StackConfig()], steps=0)


def test_each_row_is_timed_on_its_own_loss(monkeypatch):
    """best is timed with its fused loss, not with the model's full-logits head."""
    seen, real = [], speed.compute_loss
    monkeypatch.setattr(
        speed, "compute_loss", lambda m, b, cfg: seen.append(cfg.stack) or real(m, b, cfg)
    )
    cfgs = [StackConfig("lora", seq_len=16), StackConfig("best", seq_len=16)]
    speed.time_stacks("tiny-llama", cfgs, steps=1, warmup=0)
    assert set(seen) == {"lora", "best"}


def test_paired_rounds_give_ratios_their_median_and_an_exact_sign_test():
    row, ref = [2.0, 3.0, 1.0, 4.0], [1.0, 2.0, 2.0, 4.0]
    got = speed.paired(row, ref)
    assert got["ratios"] == [2.0, 1.5, 0.5, 1.0]
    assert got["median"] == 1.25 and got["slower_in"] == 2 and got["rounds"] == 4
    assert got["sign_test_p"] == 1.0  # 2 slower, 1 faster, 1 tie: no evidence either way
    slower = speed.paired([1.1] * 10, [1.0] * 10)
    assert slower["slower_in"] == 10 and slower["sign_test_p"] == 2 / 2**10
    nine = speed.paired([0.9] + [1.1] * 9, [1.0] * 10)
    assert nine["sign_test_p"] == 2 * (1 + 10) / 2**10
    with pytest.raises(ValueError, match="bad rounds: 2 step times against 3"):
        speed.paired([1.0, 2.0], [1.0, 2.0, 3.0])
