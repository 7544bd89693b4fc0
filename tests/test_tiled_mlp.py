import pytest
import torch
from test_checkpoint import seeded_model

from lowmem.checkpoint import apply_checkpoint
from lowmem.config import StackConfig
from lowmem.memory import LiveStorageTracker
from lowmem.models import build_model
from lowmem.stack import benchmark_batch
from lowmem.tiled_mlp import apply_tiled_mlp


def _loss_and_grads(cfg, model_name="tiny-llama"):
    model = seeded_model(model_name, cfg)
    batch = benchmark_batch(cfg, model.config.vocab_size)
    loss = model(**{k: batch[k] for k in ("input_ids", "labels")}).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-qwen", "tiny-mistral"])
@pytest.mark.parametrize("tile", [1, 7, 64])
def test_tiled_mlp_equals_the_plain_mlp(model_name, tile):
    common = dict(stack="quantize", seq_len=40, lora_targets=("all-linear",))
    ref_loss, ref = _loss_and_grads(StackConfig.from_flat(mlp_tile=0, **common), model_name)
    loss, grads = _loss_and_grads(StackConfig.from_flat(mlp_tile=tile, **common), model_name)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_tiles_bound_the_mlp_intermediates():
    model = build_model("tiny-llama").requires_grad_(False)
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 512, 64, requires_grad=True)

    def peak(module_input):
        tracker = LiveStorageTracker()
        tracker.register([x])
        with tracker:
            mlp(module_input).sum().backward()
        return tracker.peak

    plain = peak(x)
    apply_tiled_mlp(model, 64)
    assert peak(x) < plain / 2  # 160-wide intermediates for 64 tokens, not 512


def test_bad_tile_and_conflicting_cache_policy_are_refused():
    with pytest.raises(ValueError, match="bad mlp_tile=0"):
        apply_tiled_mlp(build_model("tiny-llama"), 0)
    with pytest.raises(ValueError, match="bad cache_policy='mlp'"):
        StackConfig.from_flat(stack="best", cache_policy="mlp")


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-qwen", "tiny-mistral"])
def test_tiled_mlp_inside_a_checkpointed_layer_is_exact_with_dropout(model_name):
    # the recompute skips the MLP forward (its values are unused); gradients must not notice.
    # Same tiles in both (dropout draws its masks per tile)
    common = dict(seq_len=40, lora_targets=("all-linear",), lora_dropout=0.1, mlp_tile=16)
    ref_loss, ref = _loss_and_grads(StackConfig.from_flat("quantize", **common), model_name)
    loss, grads = _loss_and_grads(
        StackConfig.from_flat("checkpoint", offload="memory", **common), model_name
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_layer_recompute_runs_no_mlp_forward():
    cfg = StackConfig.from_flat("checkpoint", seq_len=40, mlp_tile=16, offload="memory")
    model = seeded_model("tiny-llama", cfg)
    calls = []
    for layer in model.get_base_model().model.layers:
        layer.mlp.down_proj.register_forward_hook(lambda *args: calls.append(1))
    batch = benchmark_batch(cfg, model.config.vocab_size)
    model(**batch).loss.backward()
    n_layers, n_tiles = len(model.get_base_model().model.layers), 3  # 40 tokens in tiles of 16
    assert len(calls) == 2 * n_layers * n_tiles  # forward + backward's tiles, no third pass


def test_the_tile_backward_skips_only_the_down_projection_values():
    cfg = StackConfig.from_flat("quantize", seq_len=40, mlp_tile=16)
    model = seeded_model("tiny-llama", cfg)
    needed = {"gate": [], "down": []}
    mlp = model.get_base_model().model.layers[0].mlp
    for name in needed:
        getattr(mlp, f"{name}_proj").register_forward_hook(
            lambda m, args, out, name=name: needed[name].append(m.values_needed)
        )
    batch = benchmark_batch(cfg, model.config.vocab_size)
    model(**batch).loss.backward()
    assert needed["gate"] == [True] * 6  # 3 tiles forward, 3 in backward
    assert needed["down"] == [True] * 3 + [False] * 3


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-qwen", "tiny-mistral"])
@pytest.mark.parametrize("mode", ["store", "recompute"])
@pytest.mark.parametrize(
    "extra",
    [
        dict(offload="memory"),
        dict(offload="disk", cache_policy="attention", lora_dropout=0.1),
        dict(offload="memory", lora_targets=("gate_proj", "up_proj")),  # no attention grads
    ],
)
def test_mlp_first_backward_gives_the_same_loss_and_gradients(model_name, mode, extra):
    common = dict(seq_len=40, mlp_tile=16, lora_targets=("all-linear",)) | extra
    ref_loss, ref = _loss_and_grads(StackConfig.from_flat("checkpoint", **common), model_name)
    cfg = StackConfig.from_flat("checkpoint", mlp_first=mode, **common)
    assert cfg.resolved().checkpoint.mlp_first == mode
    loss, grads = _loss_and_grads(cfg, model_name)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    assert grads.keys() == ref.keys()
    for name, g in grads.items():  # same sums in the same order: bit-identical
        torch.testing.assert_close(g, ref[name], rtol=0, atol=0, msg=name)


def test_mlp_first_is_best_s_default_and_drops_the_attention_tensors_from_the_mlp_peak():
    import functools

    from transformers import AutoModelForCausalLM, LlamaConfig

    from lowmem.loss import compute_loss
    from lowmem.meter import measure_step
    from lowmem.stack import apply_stack

    resolved = {
        (stack, offload): StackConfig.from_flat(stack, offload=offload).resolved()
        for stack in ("best", "checkpoint")
        for offload in ("disk", "memory")
    }
    assert {k: c.checkpoint.mlp_first for k, c in resolved.items()} == {
        ("best", "disk"): "store",
        ("best", "memory"): "off",  # the layer inputs stay resident: no second T x D each
        ("checkpoint", "disk"): "off",
        ("checkpoint", "memory"): "off",
    }
    # a Llama whose MLP is wide next to D and whose vocabulary is small, so that (as on
    # Llama-3.2 3B at 1024-4096 tokens) the step peaks in a layer's tiled MLP backward
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=True,
    )
    peaks = {}
    for first in ("off", "store", "recompute"):
        cfg = StackConfig.from_flat(
            "best",
            seq_len=512,
            offload="disk",
            offload_async=False,
            mlp_first=first,
            mlp_tile=256,  # two tiles, as on Llama-3.2 3B at 512 tokens
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
        model = apply_stack(model, cfg)
        batch = benchmark_batch(cfg, config.vocab_size)
        loss_fn = functools.partial(compute_loss, cfg=cfg)
        peaks[first] = measure_step(model, batch, "cpu", keep_outputs=False, loss_fn=loss_fn)
    held = {
        first: {tuple(t["shape"]): t["count"] for t in peak["peak_tensors"]}
        for first, peak in peaks.items()
    }
    # off: x, h, dh, the layer output's gradient and the normalised x (5 x T x D), q and the
    # attention output (T x D each) live at the MLP backward; recompute: x, h / dh and the
    # gradient; store: h / dh and the gradient (x is read once the MLP is done)
    assert held["off"][(1, 512, 128)] == 5 and held["off"][(1, 4, 512, 32)] == 2
    assert held["recompute"][(1, 512, 128)] == 3 and (1, 4, 512, 32) not in held["recompute"]
    assert held["store"][(1, 512, 128)] == 2 and (1, 4, 512, 32) not in held["store"]
    td = 512 * 128 * 4
    assert peaks["off"]["peak_bytes"] - peaks["recompute"]["peak_bytes"] >= 4 * td
    assert peaks["recompute"]["peak_bytes"] - peaks["store"]["peak_bytes"] >= td


def test_a_trainable_norm_inside_the_tiles_gets_its_gradient():
    def grads(tile):
        cfg = StackConfig.from_flat("quantize", seq_len=40, mlp_tile=tile)
        model = seeded_model("tiny-llama", cfg)
        norms = [layer.post_attention_layernorm for layer in model.get_base_model().model.layers]
        for norm in norms:
            norm.weight.requires_grad_(True)
        batch = benchmark_batch(cfg, model.config.vocab_size)
        model(**batch).loss.backward()
        return [norm.weight.grad for norm in norms]

    for g, ref in zip(grads(16), grads(0), strict=True):
        assert g is not None
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)


def test_mlp_first_without_tiles_is_refused():
    with pytest.raises(ValueError, match="bad mlp_first='store'"):
        StackConfig.from_flat("checkpoint", mlp_first="store", mlp_tile=0)
    with pytest.raises(ValueError, match="bad mlp_first='on': must be one of auto, off"):
        StackConfig.from_flat("best", mlp_first="on")
    model = seeded_model("tiny-llama", StackConfig.from_flat("quantize", seq_len=40))
    with pytest.raises(ValueError, match="bad mlp_first='store' for a LlamaDecoderLayer"):
        apply_checkpoint(model, offload="memory", mlp_first="store")


def test_a_gradient_is_written_into_only_where_autograd_gave_it_to_one_node_alone():
    from lowmem.tiled_mlp import sole_owner

    seen = []

    class Double(torch.autograd.Function):  # doubles its gradient in place where allowed
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            seen.append(sole_owner(g))
            return g.mul_(2) if seen[-1] else g * 2

    x = torch.randn(6, requires_grad=True)
    w = torch.randn(6)
    (Double.apply(x) * w).sum().backward()
    assert seen == [True]
    torch.testing.assert_close(x.grad, 2 * w, rtol=0, atol=0)
    # an add's backward hands one tensor to both branches: the first to run must not write
    seen.clear()
    x.grad = None
    y = x * 3
    ((Double.apply(x) + Double.apply(y)) * w).sum().backward()
    assert seen[0] is False
    torch.testing.assert_close(x.grad, 2 * w + 3 * 2 * w, rtol=0, atol=0)
    seen.clear()  # a view (an expanded gradient) is never written into
    Double.apply(x).sum().backward()
    assert seen == [False]


def test_mlp_first_is_exact_when_a_layer_output_feeds_the_loss_twice():
    def grads(mode):
        cfg = StackConfig.from_flat("best", seq_len=40, offload="memory", mlp_first=mode)
        model = seeded_model("tiny-llama", cfg)
        batch = benchmark_batch(cfg, model.config.vocab_size)
        out = model(**batch, output_hidden_states=True)
        hs = out.hidden_states  # layer 0's output also feeds a second term, through an add
        (out.loss + ((hs[1] + hs[2]) * 1e-3).square().sum()).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    ref = grads("off")
    for mode in ("store", "recompute"):
        for name, g in grads(mode).items():
            torch.testing.assert_close(g, ref[name], rtol=0, atol=0, msg=f"{mode} {name}")
