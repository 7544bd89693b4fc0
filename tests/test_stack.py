import dataclasses

import pytest
import torch

from lowmem import reference
from lowmem.bench import run_cell
from lowmem.config import ROWS, STACK, StackConfig
from lowmem.models import build_model, count_parameters, load_config
from lowmem.stack import apply_stack, benchmark_batch
from lowmem.study import loss_and_grads

TINY_MODELS = ["tiny-llama", "tiny-qwen", "tiny-mistral"]  # one per supported family


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seq_len": 0}, "bad seq_len=0: must be an integer > 0"),
        ({"seq_len": -5}, "bad seq_len=-5"),
        (
            {"stack": "lora_plus"},
            "bad stack='lora_plus': must be one of baseline, lora, quantize, checkpoint, "
            "softmax_approx, logits_mask, best",
        ),
        ({"softmax_k": 0}, "bad softmax_k=0"),
        ({"softmax_rule": "random"}, "bad softmax_rule='random'"),
        ({"softmax_variant": "fast"}, "bad softmax_variant='fast'"),
        ({"quant_bits": 3}, "bad quant_bits=3: must be one of (4, 8)"),
        ({"quant_group_size": 48}, "bad quant_group_size=48"),
        ({"lora_r": 0}, "bad lora_r=0"),
        ({"lora_targets": ("q_proj", "qkv")}, "bad lora_targets='q_proj,qkv'"),
        ({"lora_targets": ()}, "bad lora_targets=''"),
        ({"trainable_fraction": 0.0}, "bad trainable_fraction=0.0"),
        ({"gqa": "flash"}, "bad gqa='flash'"),
    ],
)
def test_bad_configs_fail_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        StackConfig.from_flat(**kwargs)


def test_every_row_is_a_prefix_of_the_stack():
    cfg = StackConfig(stack="lora")
    assert [cfg.enabled(t) for t in STACK] == [True, True, False, False, False, False]
    assert cfg.resolved().kernels.gqa == "repeat_kv"
    assert StackConfig(stack="quantize").resolved().kernels.gqa == "native"
    best = StackConfig(stack="best")
    assert [best.enabled(t) for t in STACK] == [False, True, True, True, False, True]
    assert best.enabled("fused_loss") and not cfg.enabled("fused_loss")
    assert StackConfig.from_flat(lora_targets="q_proj,k_proj").lora.targets == ("q_proj", "k_proj")


def test_benchmark_batch_marks_the_last_30_percent_trainable():
    batch = benchmark_batch(StackConfig(seq_len=100), vocab_size=50)
    labels = batch["labels"]
    assert labels.shape == (1, 100)
    assert (labels[0, :70] == -100).all() and (labels[0, 70:] == batch["input_ids"][0, 70:]).all()
    assert reference.trainable_positions(labels) == 30


def test_lora_row_trains_only_the_adapters_and_matches_the_formula():
    config = load_config("tiny-llama")
    d, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    model = apply_stack(build_model("tiny-llama"), StackConfig.from_flat(stack="lora", lora_r=4))
    total, trainable = count_parameters(model)
    # q_proj: A (r x d) + B (d x r); v_proj: A (r x d) + B (kv x r), in every layer
    assert trainable == config.num_hidden_layers * 4 * (d + d + d + kv)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    base = apply_stack(build_model("tiny-llama"), StackConfig(stack="baseline"))
    assert count_parameters(base)[1] == count_parameters(base)[0] == total - trainable


def test_lora_layer_equals_the_reference_computation():
    torch.manual_seed(0)
    model = apply_stack(build_model("tiny-qwen"), StackConfig.from_flat(stack="lora", lora_r=4))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # peft starts B at zero
    x = torch.randn(3, 5, layer.in_features)
    expected = reference.lora_linear(
        x,
        layer.base_layer.weight,
        layer.lora_A["default"].weight,
        layer.lora_B["default"].weight,
        layer.scaling["default"],
        layer.base_layer.bias,
    )
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_model_loss_equals_the_reference_loss():
    torch.manual_seed(0)
    model = build_model("tiny-llama")
    batch = benchmark_batch(StackConfig(seq_len=40), model.config.vocab_size)
    out = model(**batch)
    torch.testing.assert_close(out.loss, reference.causal_lm_loss(out.logits, batch["labels"]))


def test_repeat_kv_costs_what_the_arithmetic_says():
    config, T = load_config("tiny-llama"), 256
    peaks = {
        g: run_cell("tiny-llama", StackConfig.from_flat(seq_len=T, gqa=g), "simulated")["metrics"]
        for g in ("repeat_kv", "native")
    }
    # repeat_kv keeps a K and a V copy with all query heads per layer for backward
    extra = 2 * config.num_attention_heads * config.head_dim * 4 * T * config.num_hidden_layers
    assert peaks["repeat_kv"]["peak_bytes"] - peaks["native"]["peak_bytes"] == extra


# the plain computation each row is checked against: the same weights (FP32 up to lora, INT4
# from quantize on), full logits, lowmem.reference.causal_lm_loss
REFERENCE_ROW = {"baseline": "baseline", "lora": "lora"}


@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("model_name", TINY_MODELS)
def test_every_row_gives_the_reference_loss_and_gradients(model_name, row):
    """Every trainable gradient (LoRA's; all weights in baseline) and the loss of a row equal
    the plain computation's. Through checkpoint the arithmetic is the same, so bit-identical;
    the K = V softmax subset, the logits mask and best sum in another order: the loss within
    rel 1e-6, each gradient within 1e-5 of its largest magnitude (seen: <= 6e-7)."""
    cfg = StackConfig.from_flat(
        row, seq_len=48, offload="memory", softmax_k=512, loss_chunk=100, mlp_tile=16
    )
    ref = dataclasses.replace(cfg, stack=REFERENCE_ROW.get(row, "quantize"))
    ref_loss, ref_grads = loss_and_grads(model_name, ref, plain_loss=True)
    loss, grads = loss_and_grads(model_name, cfg)
    assert grads.keys() == ref_grads.keys()
    if row in STACK[: STACK.index("checkpoint") + 1]:
        assert torch.equal(loss, ref_loss)
        assert all(torch.equal(g, ref_grads[name]) for name, g in grads.items())
    else:
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
        for name, g in grads.items():
            assert (g - ref_grads[name]).abs().max() <= 1e-5 * ref_grads[name].abs().max(), name


def test_specs_parse_typed_fields_and_round_trip():
    from lowmem.config import describe, parse_spec

    cfg = parse_spec(
        "checkpoint:offload=memory,stream_weights=false,lora_targets=q_proj+k_proj", seq_len=64
    )
    assert (cfg.stack, cfg.seq_len, cfg.checkpoint.offload, cfg.checkpoint.stream_weights) == (
        "checkpoint",
        64,
        "memory",
        False,
    )
    assert cfg.lora.targets == ("q_proj", "k_proj")
    assert parse_spec(describe(cfg), seq_len=64) == cfg
    with pytest.raises(ValueError, match="'colour=red' is not setting=value with a setting"):
        parse_spec("lora:colour=red")


def test_best_profile_trains_like_the_quantized_row():
    """The exact techniques change memory, not the numbers: same losses over a few steps."""

    def losses(cfg):
        torch.manual_seed(0)
        model = apply_stack(build_model("tiny-qwen"), cfg)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        batch = benchmark_batch(cfg, model.config.vocab_size)
        from lowmem.loss import compute_loss

        out = []
        for _ in range(3):
            loss, _ = compute_loss(model, batch, cfg)
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        return out

    common = dict(seq_len=64, loss_chunk=100, mlp_tile=16, dequant_chunk=32)
    ref = losses(StackConfig(stack="quantize", seq_len=64))
    best = losses(StackConfig.from_flat(stack="best", offload="memory", **common))
    assert best == pytest.approx(ref, rel=1e-5)


PADDED_ROWS = [
    "lora",
    "quantize",
    "checkpoint:offload=memory",
    "softmax_approx:softmax_k=512",  # K = V: the exact loss, so the per-sequence sums compare
    "logits_mask:softmax_k=512",
    "best:offload=memory",
]


@pytest.mark.parametrize("spec", PADDED_ROWS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_batch_gives_the_loss_of_its_unpadded_sequences(spec, side):
    """attention_mask and position_ids reach the decoder in every row: a batch of two sequences
    of different lengths, padded on either side, has the token-weighted mean of the two
    sequences' own losses."""
    from lowmem.config import parse_spec
    from lowmem.loss import compute_loss

    cfg = parse_spec(spec, seq_len=12)
    torch.manual_seed(0)
    model = apply_stack(build_model("tiny-llama"), cfg)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 512, (n,), generator=gen) for n in (12, 7)]
    ids = torch.zeros(2, 12, dtype=torch.long)
    labels = torch.full((2, 12), -100)
    mask = torch.zeros(2, 12, dtype=torch.long)
    for row, seq in enumerate(seqs):
        span = slice(12 - len(seq), 12) if side == "left" else slice(0, len(seq))
        ids[row, span], labels[row, span], mask[row, span] = seq, seq, 1
        labels[row, span.start] = -100  # a first token is no target (a left pad would predict it)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = compute_loss(model, batch, cfg)[0]
    alone = [compute_loss(model, {"input_ids": s[None], "labels": s[None]}, cfg)[0] for s in seqs]
    n = [len(s) - 1 for s in seqs]  # targets per sequence after the shift
    expected = (alone[0] * n[0] + alone[1] * n[1]) / sum(n)
    torch.testing.assert_close(padded, expected, rtol=1e-5, atol=1e-6)
