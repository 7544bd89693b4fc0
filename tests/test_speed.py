import pytest

from lowmem.speed import time_stacks
from lowmem.stack import StackConfig


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
