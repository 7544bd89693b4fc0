import pytest
import torch

from lowmem.offload import MemoryStore
from lowmem.quantize import dequantize, quantize
from lowmem.vocab_stream import VocabStream
from lowmem.weights import DenseWeight, PackedWeight, StreamedWeights, frozen_matmul


def _weights():
    """(kind, FrozenWeight, its dense FP32 reference), one of each kind."""
    torch.manual_seed(0)
    w = torch.randn(50, 64)
    qw = quantize(w, 4, 32)
    ref = dequantize(qw)
    stream = VocabStream(PackedWeight(quantize(w, 4, 32)), MemoryStore(), "vocab", 16)
    kinds = [
        ("dense", DenseWeight(w), w),
        ("int4", PackedWeight(qw), ref),
        ("streamed", stream, ref),
    ]
    qw8 = quantize(w, 8, 0, symmetric=False)
    return kinds + [("int8-asym", PackedWeight(qw8), dequantize(qw8))]


@pytest.mark.parametrize("kind", ["dense", "int4", "streamed", "int8-asym"])
def test_rows_and_gather_of_each_kind_equal_the_dense_reference(kind):
    _, weight, ref = next(k for k in _weights() if k[0] == kind)
    assert weight.shape == (50, 64)
    for start, stop in [(0, 50), (0, 16), (5, 37), (48, 50)]:
        assert torch.equal(weight.rows(start, stop), ref[start:stop])
    ids = torch.tensor([[3, 49], [17, 0]])
    assert torch.equal(weight.gather(ids), ref[ids])


def test_bitsandbytes_rows_equal_its_dequantized_weight():
    from bitsandbytes.functional import dequantize_4bit

    from lowmem.quantize_bnb import BnbLinear4bit

    bnb = BnbLinear4bit(torch.nn.Linear(128, 64), "bnb-nf4")
    ref = dequantize_4bit(bnb.packed, bnb.quant_state)
    assert torch.equal(bnb.frozen.rows(0, 64), ref) and torch.equal(bnb.frozen.rows(3, 9), ref[3:9])
    # streamed like any frozen weight: gone between uses, the same output when loaded
    x = torch.randn(3, 128)
    y = bnb(x)
    group = StreamedWeights({"down": bnb.frozen}, MemoryStore(), "w0")
    assert bnb.quant_state.absmax is None
    with pytest.raises(RuntimeError, match="is released"):
        bnb(x)
    group.load()
    assert torch.equal(bnb(x), y)


@pytest.mark.parametrize("kind", ["dense", "int4", "streamed"])
@pytest.mark.parametrize("chunk", [0, 1, 7, 50, 64])
def test_frozen_matmul_is_x_w_t_and_grad_y_w(kind, chunk):
    _, weight, ref = next(k for k in _weights() if k[0] == kind)
    x = torch.randn(2, 9, 64, requires_grad=True)
    g = torch.randn(2, 9, 50)
    y = frozen_matmul(x, weight, chunk)
    torch.testing.assert_close(y, x.detach() @ ref.T, rtol=1e-6, atol=1e-5)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ ref, rtol=1e-6, atol=1e-5)
    # values not needed: uninitialised output, the same input gradient
    x2 = x.detach().clone().requires_grad_(True)
    frozen_matmul(x2, weight, chunk, values=False).backward(g)
    assert torch.equal(x2.grad, x.grad)
    # a cached output: returned as it is, the same input gradient
    x3 = x.detach().clone().requires_grad_(True)
    cached = torch.randn(2, 9, 50)
    y3 = frozen_matmul(x3, weight, chunk, cached=cached)
    assert torch.equal(y3, cached)
    y3.backward(g)
    assert torch.equal(x3.grad, x.grad)


def test_streamed_weights_load_and_release_through_the_store():
    torch.manual_seed(0)
    a, b = (
        PackedWeight(quantize(torch.randn(8, 32)), torch.randn(8)),
        DenseWeight(torch.randn(4, 8)),
    )
    ref = {"attn.q": a.rows(0, 8), "mlp.down": b.rows(0, 4)}
    store = MemoryStore()
    group = StreamedWeights({"attn.q": a, "mlp.down": b}, store, "w0")
    assert list(a.buffers()) == [] and list(b.buffers()) == []  # offloaded
    assert sorted(store.get("w0", keep=True)) == [
        "attn.q.bias", "attn.q.codes", "attn.q.scales", "mlp.down.weight"
    ]  # fmt: skip
    with pytest.raises(RuntimeError, match=r"is released: it is streamed .* load it first"):
        a.rows(0, 8)
    group.load()
    assert torch.equal(a.rows(0, 8), ref["attn.q"]) and torch.equal(b.rows(0, 4), ref["mlp.down"])
    group.release("mlp.")  # by prefix: the MLP's only
    assert a.codes is not None and b.weight is None


def test_misuse_is_refused_with_a_clear_error():
    w = DenseWeight(torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="is not streamed: releasing it would lose it"):
        w.release()
    with pytest.raises(ValueError, match="bad chunk=-1"):
        frozen_matmul(torch.randn(2, 8), w, -1)
    w.offload()
    with pytest.raises(ValueError, match=r"cannot load \['codes'\]"):
        w.load({"codes": torch.zeros(1)})


def test_the_order_of_techniques_is_checked():
    from lowmem.config import StackConfig
    from lowmem.models import build_model
    from lowmem.quant_linear import apply_quantize
    from lowmem.stack import apply_stack
    from lowmem.tiled_mlp import apply_tiled_mlp

    model = apply_stack(
        build_model("tiny-llama"), StackConfig.from_flat("checkpoint", offload="memory")
    )
    with pytest.raises(ValueError, match="apply_quantize after apply_checkpoint"):
        apply_quantize(model)
    with pytest.raises(
        ValueError, match="apply_tiled_mlp on a model whose layers are checkpointed"
    ):
        apply_tiled_mlp(model, 16)
    tiled = build_model("tiny-llama")
    apply_tiled_mlp(tiled, 16)
    with pytest.raises(ValueError, match="apply_quantize after apply_tiled_mlp"):
        apply_quantize(tiled)
