"""Block attention (lowmem.block_attention) equals SDPA, alone and inside the best step.

Tolerance: FP32, the sums run in another order than SDPA's; every output and gradient within
1e-5 of the reference's largest magnitude (seen: below 1e-6 both alone and in a model step).
"""

import pytest
import torch
import torch.nn.functional as F

from lowmem.bench import run_cell
from lowmem.block_attention import block_attention
from lowmem.config import ROWS, StackConfig
from lowmem.loss import compute_loss
from lowmem.models import build_model
from lowmem.stack import apply_stack
from lowmem.study import loss_and_grads

TINY_MODELS = ["tiny-llama", "tiny-qwen", "tiny-mistral"]


def _close(x: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    assert torch.isfinite(x).all(), name
    assert (x - ref).abs().max() <= 1e-5 * ref.abs().max(), name


def _mask(kind: str, b: int, t: int):
    """None, or transformers' 4-D causal + padding mask (bool, or additive float)."""
    if kind == "none":
        return None
    keep = torch.ones(b, t, dtype=torch.bool)
    if kind.startswith("left"):
        keep[1, : t // 2] = False  # the first rows of sequence 1 attend to nothing
    else:
        keep[1, t - t // 2 :] = False
    mask = keep[:, None, None, :] & torch.ones(t, t, dtype=torch.bool).tril()
    if kind.endswith("float"):
        return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask


@pytest.mark.parametrize(
    "heads, kv_heads, t, block, mask",
    [
        (4, 4, 13, 4, "none"),  # GQA group 1, T not a multiple of the block
        (4, 2, 13, 32, "none"),  # group 2, block larger than T
        (8, 2, 1, 4, "none"),  # group 4, one token
        (8, 2, 16, 4, "none"),  # T a multiple of the block
        (4, 2, 10, 3, "left"),  # left padding: rows that attend to nothing
        (4, 2, 10, 3, "right"),
        (8, 2, 11, 4, "right-float"),  # an additive mask (no row masked entirely: see
        # lowmem.block_attention, Numerics)
    ],
)
def test_output_and_gradients_equal_sdpa(heads, kv_heads, t, block, mask):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, t, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, t, 8, generator=gen, requires_grad=True) for _ in "kv")
    attn_mask = _mask(mask, 2, t)
    causal = attn_mask is None and t > 1
    out = block_attention(q, k, v, attn_mask, scale=0.3, causal=causal, block=block)
    g = heads // kv_heads  # the reference copies K/V per query head
    ref = F.scaled_dot_product_attention(
        q,
        k.repeat_interleave(g, 1),
        v.repeat_interleave(g, 1),
        attn_mask=attn_mask,
        scale=0.3,
        is_causal=causal,
    ).transpose(1, 2)
    grad_out = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    _close(out, ref, "out")
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        _close(got, want, f"d{name}")


def test_saves_inputs_and_log_sum_exp_only():
    """What backward keeps: q, k, v and H x T floats; no output, no T x T probabilities."""
    q = torch.randn(1, 4, 64, 8, requires_grad=True)
    k, v = (torch.randn(1, 2, 64, 8, requires_grad=True) for _ in "kv")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, id):
        block_attention(q, k, v, causal=True, block=16)
    assert sorted(saved) == sorted([q.numel(), k.numel(), v.numel(), 4 * 64])


def test_bad_arguments_name_the_value_and_what_is_allowed():
    q, k = torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="bad heads: 3 query heads, 2 K/V heads"):
        block_attention(q, k, k)
    with pytest.raises(ValueError, match="bad block=0: must be an integer > 0"):
        block_attention(k, k, k, block=0)


@pytest.mark.parametrize("model_name", TINY_MODELS)
def test_best_step_equals_best_with_sdpa(model_name):
    """Loss and every LoRA gradient of best with 16-token blocks (3 at 48 tokens, recomputed
    in backward by checkpointing) equal best on SDPA."""
    cfg = StackConfig.from_flat(
        "best", seq_len=48, offload="memory", loss_chunk=100, mlp_tile=16, attention_block=16
    )
    ref_loss, ref_grads = loss_and_grads(model_name, cfg.with_settings(attention_block=0))
    loss, grads = loss_and_grads(model_name, cfg)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        _close(g, ref_grads[name], name)


def test_a_padded_best_step_equals_best_with_sdpa(padded_batch):
    """transformers' padding mask reaches the blocks: a padded batch of two sequences."""
    batch = padded_batch
    cfg = StackConfig.from_flat("best", seq_len=12, offload="memory", attention_block=4)

    def loss(cfg):
        torch.manual_seed(0)
        return compute_loss(apply_stack(build_model("tiny-llama"), cfg), batch, cfg)[0]

    assert loss(cfg).item() == pytest.approx(loss(cfg.with_settings(attention_block=0)).item())


def test_simulated_equals_cpu_to_the_byte_with_blocks():
    cfg = StackConfig.from_flat(
        "best", seq_len=48, loss_chunk=100, offload_async=False, attention_block=16
    )
    real = run_cell("tiny-llama", cfg, "cpu")
    fake = run_cell("tiny-llama", cfg, "simulated")
    assert real["status"] == fake["status"] == "ok", (real["error"], fake["error"])
    for key in ("peak_bytes", "peak_phase", "phase_peak_bytes", "resident_bytes"):
        assert fake["metrics"][key] == real["metrics"][key], key


def test_auto_resolves_to_sdpa_and_an_explicit_block_turns_blocks_on():
    for row in ROWS:  # off by default until Table 1's best is re-measured with blocks
        assert StackConfig(stack=row, seq_len=1024).resolved().kernels.attention_block == 0, row
    lora = StackConfig.from_flat("lora", attention_block=64).resolved().kernels
    assert (lora.attention_block, lora.gqa) == (64, "native")  # blocks never copy K/V
    model = apply_stack(
        build_model("tiny-llama"), StackConfig.from_flat("best", attention_block=256)
    )
    assert model.config._attn_implementation == "lowmem_blocks_256"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"attention_block": -2}, "bad attention_block=-2: must be >= -1"),
        (
            {"attention_block": 64, "gqa": "repeat_kv"},
            "bad gqa='repeat_kv': must be auto or native",
        ),
    ],
)
def test_bad_settings_fail_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StackConfig.from_flat(**kwargs)
