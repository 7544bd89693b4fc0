import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AttentionInterface
from transformers.integrations import sdpa_attention

from lowmem import attention
from lowmem.attention import IMPLEMENTATIONS, math_path_for_gqa, set_gqa
from lowmem.attention import sdpa_attention as lowmem_sdpa
from lowmem.config import StackConfig
from lowmem.models import build_model
from lowmem.stack import apply_stack


class _Ops(TorchDispatchMode):
    """The aten ops a call runs, in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _Attention(torch.nn.Module):  # what the forward reads off a Llama attention module
    num_key_value_groups, is_causal = 3, True


def _inputs(q_length: int, mask: str):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, q_length, 8, generator=gen)
    k, v = (torch.randn(2, 2, 12, 8, generator=gen) for _ in range(2))
    if mask == "none":
        return q, k, v, None
    keep = torch.rand(2, 1, q_length, 12, generator=gen) > 0.3
    return q, k, v, keep if mask == "bool" else torch.zeros(keep.shape).masked_fill(~keep, -1e9)


@pytest.mark.parametrize("gqa", ["repeat_kv", "native"])
@pytest.mark.parametrize("q_length, mask", [(12, "none"), (12, "bool"), (12, "float"), (1, "bool")])
def test_each_path_runs_the_ops_of_transformers_sdpa_with_that_path_forced(
    monkeypatch, gqa, q_length, mask
):
    """Same aten ops in the same order and bit-identical outputs, so peaks cannot move."""
    module = _Attention()
    args = _inputs(q_length, mask)
    kwargs = dict(dropout=0.0, scaling=0.3, sliding_window=None)
    with _Ops() as ours:
        out, _ = lowmem_sdpa(module, *args, gqa=gqa, **kwargs)
    monkeypatch.setattr(sdpa_attention, "use_gqa_in_sdpa", lambda *a, **k: gqa == "native")
    with _Ops() as theirs:
        expected, _ = sdpa_attention.sdpa_attention_forward(module, *args, **kwargs)
    assert ours.ops == theirs.ops
    assert torch.equal(out, expected)


@pytest.mark.parametrize("q_length, mask", [(12, "none"), (12, "bool"), (1, "bool")])
def test_native_copies_kv_where_sdpa_would_take_its_math_path(monkeypatch, q_length, mask):
    """Where no fused CUDA kernel takes GQA (FP32 on a GPU), "native" runs as "repeat_kv" does
    (the ops and output of that path), never SDPA's math path with its T x S probabilities."""
    module, args, kwargs = _Attention(), _inputs(q_length, mask), dict(dropout=0.0, scaling=0.3)
    with _Ops() as copies:
        expected, _ = lowmem_sdpa(module, *args, gqa="repeat_kv", **kwargs)
    monkeypatch.setattr(attention, "math_path_for_gqa", lambda *a: True)
    with _Ops() as native:
        out, _ = lowmem_sdpa(module, *args, gqa="native", **kwargs)
    assert native.ops == copies.ops
    assert torch.equal(out, expected)


def test_the_math_path_is_never_predicted_off_cuda():
    q, k, v, mask = _inputs(12, "bool")
    assert not math_path_for_gqa(q, k, v, mask, 0.0, False)


def test_rows_set_their_path_on_their_own_model_and_nothing_process_wide():
    original = sdpa_attention.use_gqa_in_sdpa
    lora = apply_stack(build_model("tiny-llama"), StackConfig("lora"))
    quantized = apply_stack(build_model("tiny-llama"), StackConfig("quantize"))
    assert lora.config._attn_implementation == IMPLEMENTATIONS["repeat_kv"]
    assert quantized.config._attn_implementation == IMPLEMENTATIONS["native"]
    assert sdpa_attention.use_gqa_in_sdpa is original
    assert AttentionInterface()["sdpa"] is sdpa_attention.sdpa_attention_forward
    assert build_model("tiny-llama").config._attn_implementation == "sdpa"


def test_a_saved_model_records_no_lowmem_attention(tmp_path):
    model = build_model("tiny-qwen")
    set_gqa(model, "repeat_kv")
    model.save_pretrained(tmp_path)
    assert "lowmem" not in (tmp_path / "config.json").read_text()


def test_an_unknown_path_is_refused_with_the_allowed_ones():
    with pytest.raises(ValueError, match="bad gqa='auto': must be one of repeat_kv, native"):
        set_gqa(build_model("tiny-llama"), "auto")
