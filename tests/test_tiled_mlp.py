import pytest
import torch
from test_checkpoint import seeded_model

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
