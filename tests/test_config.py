import re

import pytest

from lowmem.config import StackConfig, parse_spec
from lowmem.train import TrainConfig, make_config


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("quant_symmetric", "false", "true or false"),
        ("offload_async", 0, "true or false"),
        ("stream_weights", "True", "true or false"),
        ("seq_len", "1024", "an integer"),
        ("seq_len", 1024.0, "an integer"),
        ("lora_r", True, "an integer"),
        ("trainable_fraction", "0.3", "a number"),
        ("lora_dropout", False, "a number"),
        ("offload_dir", 3, "a string"),
        ("lora_targets", 5, "a list of strings"),
        ("lora_targets", ("q_proj", 1), "a list of strings"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_with_one_line(field, value, allowed):
    with pytest.raises(
        ValueError, match=re.escape(f"bad {field}={value!r}: must be {allowed}")
    ) as err:
        StackConfig.from_flat(**{field: value})
    assert "\n" not in str(err.value)


def test_an_int_for_a_float_field_is_that_float():
    assert StackConfig(trainable_fraction=1).trainable_fraction == 1.0
    assert isinstance(TrainConfig(lr=1).lr, float)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("best:quant_symmetric=false", False),
        ("best:quant_symmetric=False", False),
        ("best:quant_symmetric=0", False),
        ("best:quant_symmetric=yes", True),
    ],
)
def test_spec_strings_parse_booleans_both_ways(spec, expected):
    assert parse_spec(spec).quant.symmetric is expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("best:quant_symmetric=maybe", "bad quant_symmetric='maybe': must be true or false"),
        ("best:seq_len=1.5", "bad seq_len='1.5': must be an integer"),
        ("best:trainable_fraction=lots", "bad trainable_fraction='lots': must be a number"),
    ],
)
def test_spec_strings_that_do_not_parse_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(spec)


def test_train_config_fields_are_type_checked_too():
    with pytest.raises(ValueError, match="bad steps='3': must be an integer"):
        TrainConfig(steps="3")
    with pytest.raises(ValueError, match="bad lr='abc': must be a number"):
        make_config("lora", ["lr=abc"])
    with pytest.raises(ValueError, match="bad stack=3: must be a StackConfig or a spec"):
        TrainConfig(stack=3)


@pytest.mark.parametrize("extra", [{}, {"cache_policy": "attention", "stream_weights": False}])
@pytest.mark.parametrize("stack", ["checkpoint", "best"])
def test_bitsandbytes_layers_are_not_silently_left_out_of_streaming_or_caching(stack, extra):
    """With bnb layers, checkpointing streamed 0 decoder modules and cached 0 linears, silently."""
    with pytest.raises(ValueError, match="bad quant_backend='bnb-nf4': must be 'lowmem' when"):
        StackConfig.from_flat(stack, quant_backend="bnb-nf4", **extra)
    StackConfig.from_flat(stack, quant_backend="bnb-nf4", stream_weights=False)  # says what it does
    StackConfig.from_flat(
        "quantize", quant_backend="bnb-nf4"
    )  # no checkpointing: nothing to stream


def test_settings_are_sections_per_technique_and_flat_names_map_onto_them():
    from lowmem.config import Techniques
    from lowmem.settings import QuantSettings, SoftmaxSettings, flat_fields

    cfg = StackConfig.from_flat("best", seq_len=64, softmax_k=10, quant_bits=8, offload="memory")
    assert (cfg.softmax.k, cfg.quant.bits, cfg.checkpoint.offload) == (10, 8, "memory")
    # a section given whole (PEFT-style) is the same configuration as its flat settings
    whole = StackConfig("best", quant=QuantSettings(bits=8), softmax=SoftmaxSettings(k=10))
    assert whole.with_settings(seq_len=64, offload="memory") == cfg
    # the flat form is a record's config: every setting once, and it builds the same config back
    flat = cfg.to_dict()
    assert list(flat) == list(flat_fields(StackConfig)) and StackConfig.from_flat(**flat) == cfg
    # a technique configuration carries no benchmark input; a run adds them
    assert "seq_len" not in flat_fields(Techniques) and flat["seq_len"] == 64
    with pytest.raises(ValueError, match="bad quant=8: must be a lowmem.QuantSettings"):
        StackConfig(quant=8)
    with pytest.raises(ValueError, match="bad setting 'colour': must be one of stack, lora_r"):
        Techniques.from_flat(colour="red")


def test_resolving_leaves_no_auto_and_follows_the_profile_data():
    from lowmem.config import PROFILES, Techniques

    best = StackConfig("best", seq_len=16384).resolved(mlp_width=8192)
    assert best.kernels.dequant_chunk == PROFILES["best"].dequant_rows(16384) == 2048
    assert (best.kernels.mlp_tile, best.checkpoint.offload_prefetch, best.kernels.gqa) == (
        256,
        0,
        "native",
    )
    # a technique configuration resolves for the default context; an explicit value stays
    lora = Techniques("lora").with_settings(mlp_tile=64).resolved()
    assert (lora.kernels.mlp_tile, lora.kernels.dequant_chunk, lora.kernels.gqa) == (
        64,
        0,
        "repeat_kv",
    )


def test_best_sizes_its_mlp_tile_by_the_mlp_width():
    from lowmem.config import PROFILES

    elements = PROFILES["best"].mlp_tile_elements
    tiles = {
        width: StackConfig("best").resolved(mlp_width=width).kernels.mlp_tile
        for width in (1536, 8192, 11008, 4 * elements)
    }
    assert tiles == {1536: 1365, 8192: 256, 11008: 190, 4 * elements: 1}
    assert all(t * w <= elements or t == 1 for w, t in tiles.items())
    unknown = StackConfig("best").resolved()  # the width is not known: the tile stays auto
    assert unknown.kernels.mlp_tile == -1 and unknown.checkpoint.mlp_first == "store"
    explicit = StackConfig.from_flat("best", mlp_tile=64).resolved(mlp_width=8192)
    assert explicit.kernels.mlp_tile == 64
    assert StackConfig("checkpoint").resolved(mlp_width=8192).kernels.mlp_tile == 0


def test_prepare_takes_a_section_whole_or_its_flat_settings():
    import lowmem

    whole = lowmem.plan("best", quant=lowmem.QuantSettings(bits=8, group_size=64))
    assert whole == lowmem.plan("best", quant_bits=8, quant_group_size=64)
    assert whole.quant.bits == 8 and whole.kernels.dequant_chunk == 1024  # the rest: best's own
    assert whole.kernels.mlp_tile == -1  # sized by the model's MLP width in prepare
    with pytest.raises(ValueError, match="bad setting 'seq_len' \\(a benchmark input"):
        lowmem.plan("best", seq_len=128)
