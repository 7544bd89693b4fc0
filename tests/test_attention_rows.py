"""The attention half in blocks of query rows (lowmem.attention_rows): the same step, less held."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lowmem.attention_rows import AttentionRows
from lowmem.bench import run_cell
from lowmem.config import StackConfig
from lowmem.loss import compute_loss
from lowmem.models import build_model
from lowmem.stack import apply_stack
from lowmem.study import loss_and_grads

# best's MLP-first backward with the layer inputs in memory (the default, disk, is slower)
ROWS = dict(offload="memory", mlp_first="store", loss_chunk=100, mlp_tile=16)


def _close(x: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    # FP32: the blocks sum dK, dV and dx in another order than the whole-tensor backward
    assert (x - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-9, name


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-qwen", "tiny-mistral"])
@pytest.mark.parametrize("mlp_first", ["store", "recompute"])
def test_best_step_equals_the_whole_attention(model_name, mlp_first):
    """Loss and every LoRA gradient with 16-row blocks (3 at 48 tokens) equal best's."""
    cfg = StackConfig.from_flat(
        "best", seq_len=48, **{**ROWS, "mlp_first": mlp_first}, attention_rows=16
    )
    ref_loss, ref_grads = loss_and_grads(model_name, cfg.with_settings(attention_rows=0))
    loss, grads = loss_and_grads(model_name, cfg)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        _close(g, ref_grads[name], name)


def test_a_padded_step_equals_the_whole_attention(padded_batch):
    """transformers' padding mask reaches every block, in forward and backward."""
    batch = padded_batch
    cfg = StackConfig.from_flat("best", seq_len=12, **{**ROWS, "mlp_tile": 4}, attention_rows=5)

    def step(cfg):
        torch.manual_seed(0)
        model = apply_stack(build_model("tiny-llama"), cfg)
        loss = compute_loss(model, batch, cfg)[0]
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return loss, grads

    (loss, grads), (ref, ref_grads) = step(cfg), step(cfg.with_settings(attention_rows=0))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for name, g in grads.items():
        _close(g, ref_grads[name], name)


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-qwen"])
def test_the_blocked_forward_equals_the_module(model_name):
    """Under no_grad the attention module runs in blocks: same output as its own forward."""
    model = build_model(model_name).eval()
    layer = model.model.layers[0]
    x = torch.randn(2, 37, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(37)[None].expand(2, -1)
    emb = model.model.rotary_emb(x, pos)
    with torch.no_grad():
        whole, _ = layer.self_attn(x, emb, None)
        rows = AttentionRows(layer, "self_attn", 8)
        rows.install()
        blocked, _ = layer.self_attn(x.clone(), emb, None)  # written over its input
        short, _ = layer.self_attn(x[:, :8], tuple(e[:, :8] for e in emb), None)
    _close(blocked, whole, "output")
    _close(short, whole[:, :8], "one block: the module's own forward")


def test_simulated_equals_cpu_to_the_byte_with_rows():
    cfg = StackConfig.from_flat(
        "best", seq_len=48, loss_chunk=100, offload_async=False, mlp_tile=16, attention_rows=16
    )
    real = run_cell("tiny-llama", cfg, "cpu")
    fake = run_cell("tiny-llama", cfg, "simulated")
    assert real["status"] == fake["status"] == "ok", (real["error"], fake["error"])
    for key in ("peak_bytes", "peak_phase", "phase_peak_bytes", "resident_bytes"):
        assert fake["metrics"][key] == real["metrics"][key], key


def test_auto_turns_rows_on_in_best_from_4096_tokens_only():
    def rows(stack, seq_len, **kw):
        return StackConfig.from_flat(stack, seq_len=seq_len, **kw).resolved().kernels

    assert rows("best", 4096).attention_rows == 512
    assert rows("best", 16384).attention_rows == 512
    assert rows("best", 2048).attention_rows == 0
    assert rows("best", 4096, offload="memory").attention_rows == 0  # no MLP-first backward
    assert rows("checkpoint", 8192).attention_rows == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(stack="checkpoint", attention_rows=64), "attention_rows=64"),
        (dict(stack="best", attention_rows=64, offload="memory"), "MLP-first backward is on"),
        (dict(stack="best", attention_rows=64, cache_policy="attention"), "cache_policy=none"),
        (dict(stack="best", attention_rows=64, attention_block=32), "attention_block=0"),
        (dict(stack="best", attention_rows=64, gqa="repeat_kv"), "gqa='repeat_kv'"),
        (dict(stack="best", attention_rows=-2), ">= -1"),
    ],
)
def test_bad_settings_fail_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        StackConfig.from_flat(seq_len=4096, **kwargs)


def test_lora_dropout_is_refused_by_name():
    model = build_model("tiny-llama")
    peft = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj"]))
    layer = peft.base_model.model.model.layers[0]
    with pytest.raises(ValueError, match=r"bad dropout p=0.1 in q_proj.lora_dropout"):
        AttentionRows(layer, "self_attn", 16)
