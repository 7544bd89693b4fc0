import importlib.util
import math

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from lowmem.peers import (  # noqa: E402
    PEERS,
    PeerConfig,
    _known_valids,
    build_peer,
    measure_peer,
    peer_loss,
)
from lowmem.reference import IGNORE_INDEX  # noqa: E402
from lowmem.stack import benchmark_batch  # noqa: E402

MODEL = "tiny-llama"
T = 64
OPTIONAL = {"hf-qlora-torchtune": "torchtune", "hf-qlora-cce": "cut_cross_entropy"}
NEEDS = "needs pip install -r experiments/peers/requirements.txt"


def _installed(peer: str) -> bool:
    return peer not in OPTIONAL or importlib.util.find_spec(OPTIONAL[peer]) is not None


INSTALLED = [
    pytest.param(p, marks=pytest.mark.skipif(not _installed(p), reason=NEEDS)) for p in PEERS
]


@pytest.mark.parametrize("peer", INSTALLED)
def test_peer_peak_is_the_same_on_every_meter_and_with_real_bitsandbytes(peer):
    cfg = PeerConfig(peer, seq_len=T)
    simulated, notes = measure_peer(MODEL, cfg, "simulated")
    standin, _ = measure_peer(MODEL, cfg, "cpu", standin=True)
    real, real_notes = measure_peer(MODEL, cfg, "cpu")
    assert simulated["peak_bytes"] == standin["peak_bytes"] == real["peak_bytes"]
    assert simulated["resident_bytes"] == real["resident_bytes"]
    assert simulated["stored_weight_bytes"] == real["stored_weight_bytes"]
    assert standin["loss"] == real["loss"]  # the stand-in quantizes to the same codes
    assert any("stand-in" in n for n in notes)  # the simulated record says what stood in
    assert not any("stand-in" in n for n in real_notes)
    if peer == "hf-qlora-cce":
        assert any("eagerly" in n for n in notes + real_notes)


@pytest.mark.parametrize("meter", ["cpu", "simulated"])
def test_recipe_is_the_stock_qlora_one(meter):
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from lowmem.memory import meter_context

    with meter_context(meter):
        model = build_peer(MODEL, PeerConfig("hf-qlora", seq_len=T), meter)
        base = model.get_base_model()
        layers = base.model.layers
        for layer in layers:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                linear = getattr(layer.self_attn, name)
                linear = linear.base_layer if name in ("q_proj", "v_proj") else linear
                assert isinstance(linear, bnb.nn.Linear4bit)
                state = linear.weight.quant_state
                assert state.quant_type == "nf4" and state.nested and state.blocksize == 64
                assert linear.weight.dtype == torch.uint8
                assert linear.compute_dtype == torch.float32
            for name in ("gate_proj", "up_proj", "down_proj"):
                assert isinstance(getattr(layer.mlp, name), bnb.nn.Linear4bit)
            assert isinstance(layer.self_attn.q_proj, LoraLinear4bit)
            assert isinstance(layer.self_attn.v_proj, LoraLinear4bit)
            assert layer.self_attn.q_proj.r["default"] == 16
        # the tied embedding / head stays FP32 and frozen, as transformers keeps it
        head = base.get_output_embeddings()
        assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32
        assert head.weight is base.get_input_embeddings().weight
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
        assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
        # HF gradient checkpointing, non-reentrant, and training mode
        assert base.is_gradient_checkpointing and model.training
        func = layers[0]._gradient_checkpointing_func
        assert func.keywords["use_reentrant"] is False


def test_benchmark_labels_are_minus_100_where_untrainable():
    batch = benchmark_batch(PeerConfig("hf-qlora", seq_len=T).stack_config(), 512)
    assert "trainable_index" not in batch
    kept = math.ceil(0.3 * T)
    assert (batch["labels"][0, : T - kept] == IGNORE_INDEX).all()
    assert (batch["labels"][0, T - kept :] == batch["input_ids"][0, T - kept :]).all()


@pytest.mark.skipif(not all(map(_installed, PEERS)), reason=NEEDS)
def test_the_three_losses_agree_and_cce_gets_the_true_trainable_positions():
    from cut_cross_entropy import torch_compile as cce_tc

    cfg = PeerConfig("hf-qlora", seq_len=T)
    model = build_peer(MODEL, cfg, "cpu")
    batch = benchmark_batch(cfg.stack_config(), model.config.vocab_size)
    losses = {}
    for peer in PEERS:
        with torch.compiler.set_stance("force_eager"):
            loss = peer_loss(model, batch, PeerConfig(peer, seq_len=T))[0]
            losses[peer] = float(loss.detach())
    assert losses["hf-qlora-torchtune"] == pytest.approx(losses["hf-qlora"], rel=1e-6)
    assert losses["hf-qlora-cce"] == pytest.approx(losses["hf-qlora"], rel=1e-6)
    real = cce_tc._build_flat_valids(batch["labels"], IGNORE_INDEX, True)
    with _known_valids(cfg):
        known = cce_tc._build_flat_valids(batch["labels"], IGNORE_INDEX, True)
    assert known.dtype == real.dtype and torch.equal(known, real)


def test_unknown_peer_and_real_bitsandbytes_under_simulated_are_refused():
    with pytest.raises(ValueError, match="unknown peer"):
        PeerConfig("unsloth")
    with pytest.raises(ValueError, match="stand-in"):
        build_peer(MODEL, PeerConfig("hf-qlora"), "simulated", standin=False)
