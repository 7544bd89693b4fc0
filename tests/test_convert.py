"""lowmem.convert / lowmem.converted: a converted directory loads as the model that loading the
checkpoint whole and applying the profile gives (same seed: same LoRA init, loss and gradients,
bit for bit); the conversion's peak is a few tensors, not the model; bad inputs are refused
naming the file and leave no folder behind; train and measure take either directory."""

import json
import shutil
import sys

import pytest
import torch
from test_loader import BLOCK, SETTINGS, TINY_MODELS, broken_copy, save_checkpoints, shards, step
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import lowmem
from lowmem.__main__ import main
from lowmem.converted import MANIFEST
from lowmem.memory import LiveStorageTracker
from lowmem.models import ModelError, load_config, load_from_directory
from lowmem.train import make_config, training_model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The tiny Llama / Qwen2 / Mistral models saved sharded in BF16 (as in test_loader)."""
    return save_checkpoints(tmp_path_factory)


@pytest.fixture(scope="module")
def converted(checkpoints, tmp_path_factory):
    """Each tiny checkpoint converted once under `best` (the quantization of every profile)."""
    root = tmp_path_factory.mktemp("converted")
    return {
        name: lowmem.convert(path, root / name, "best", block_bytes=BLOCK)
        for name, path in checkpoints.items()
    }


@pytest.mark.parametrize("profile", SETTINGS)
@pytest.mark.parametrize("name", TINY_MODELS)
def test_a_converted_directory_equals_loading_whole(
    checkpoints, converted, name, profile, tmp_path
):
    settings = {**SETTINGS[profile], "offload_dir": str(tmp_path)}
    torch.manual_seed(0)
    with lowmem.prepare(load_from_directory(checkpoints[name]), profile, **settings) as whole:
        init_whole = {k: v.clone() for k, v in whole.state_dict().items()}
        loss_whole, grads_whole = step(whole)
    torch.manual_seed(0)
    with lowmem.prepare(converted[name], profile, **settings) as model:
        init = model.state_dict()
        assert init.keys() == init_whole.keys()
        assert all(torch.equal(init[k], init_whole[k]) for k in init)  # codes, scales, LoRA
        loss, grads = step(model)
    assert torch.equal(loss, loss_whole)  # bit-identical: the same weights, the same ops
    assert grads.keys() == grads_whole.keys() and grads
    assert all(torch.equal(grads[k], grads_whole[k]) for k in grads)


def test_bytes_per_parameter_is_int4_g32_plus_the_fp32_norms(checkpoints, converted):
    """0.625 B per quantized weight + 4 B per norm / bias parameter. Measured: tiny-llama
    0.6341, tiny-qwen 0.6398 (+ q/k/v biases), tiny-mistral 0.6313 B/parameter; the files add
    only their JSON headers (~4 KB here: 0.655-0.673 B/parameter on disk). SmolLM2-135M:
    experiments/convert_check."""
    for name, path in converted.items():
        manifest = json.loads((path / MANIFEST).read_text())
        n, quantized = manifest["parameters"], manifest["quantized_parameters"]
        assert manifest["tensor_bytes"] == 0.625 * quantized + 4 * (n - quantized)
        assert 0.625 < manifest["bytes_per_parameter"] < 0.645
        files = sum(f.stat().st_size for f in path.glob("lowmem-*.safetensors"))
        assert manifest["tensor_bytes"] < files < manifest["tensor_bytes"] + 8192
        assert len(list(path.glob("lowmem-*.safetensors"))) > 1  # shards of a few tensors
        assert manifest["quantization"] == {"bits": 4, "group_size": 32, "symmetric": True}
        config = (path / "config.json").read_bytes()
        assert config == (checkpoints[name] / "config.json").read_bytes()


@pytest.mark.parametrize("layers", [2, 8])
def test_the_conversion_peak_is_a_few_tensors_not_the_model(tmp_path, layers):
    """Tracked peak <= the largest tensor's FP32 bytes + 4 row blocks: its BF16 copy mapped
    by safetensors (1/2 of that), one output shard (at most the largest packed tensor, 0.16)
    and the quantize temporaries of one block (~3 blocks); the same bound for 2 or 8 layers,
    far below the model (tiny-llama, 2 layers: 88 KB tracked, 128 KiB largest, 465 KiB model)."""
    config = load_config("tiny-llama")
    config.num_hidden_layers = layers
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "model_dir", max_shard_size="100KB")
    fp32 = sum(4 * p.numel() for p in model.parameters())
    largest = max(4 * p.numel() for p in model.parameters())
    with LiveStorageTracker() as tracker:
        lowmem.convert(tmp_path / "model_dir", tmp_path / "out", block_bytes=BLOCK)
    assert 0 < tracker.peak <= largest + 4 * BLOCK
    assert tracker.peak < fp32 / (2 * layers)


def test_a_failure_while_writing_leaves_no_folder(checkpoints, tmp_path, monkeypatch):
    writes = []

    def save_then_fail(tensors, filename, metadata=None):
        writes.append(filename)
        if len(writes) == 2:
            raise OSError(28, "No space left on device", filename)

    monkeypatch.setattr(sys.modules["lowmem.convert"], "save_file", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        lowmem.convert(checkpoints["tiny-llama"], tmp_path / "a" / "out")
    assert list(tmp_path.iterdir()) == []  # neither OUT_DIR, its temporary folder, nor a/


def refused(src, tmp_path, match):
    """convert(src) is refused with `match`; nothing but the source is left in tmp_path."""
    with pytest.raises(ModelError, match=match):
        lowmem.convert(src, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["model_dir"]


@pytest.fixture
def source(checkpoints, tmp_path):
    """A copy of the tiny Llama checkpoint in tmp_path / model_dir, and its shard names."""
    (tmp_path / "model_dir").mkdir()
    return broken_copy(checkpoints["tiny-llama"], tmp_path / "model_dir")


def test_a_missing_shard_is_named(source, tmp_path):
    path, files = source
    (path / files[1]).unlink()
    refused(path, tmp_path, f"shard .*{files[1]}.* does not exist")


def test_a_truncated_shard_is_named(source, tmp_path):
    path, files = source
    data = (path / files[0]).read_bytes()
    (path / files[0]).write_bytes(data[: len(data) // 2])
    refused(path, tmp_path, f"cannot open shard .*{files[0]}")


def test_a_config_that_does_not_match_the_tensors_is_named(source, tmp_path):
    path, _ = source
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    key = "model.layers.0.mlp.gate_proj.weight"
    refused(path, tmp_path, f"{key}' in .*{shards(path)[key]}.* needs shape")


def test_another_architecture_is_named(tmp_path):
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "model_dir")
    refused(tmp_path / "model_dir", tmp_path, f"'{tmp_path / 'model_dir'}' is a 'gpt2' model")


def test_a_converted_directory_is_refused_where_it_cannot_load(converted, tmp_path):
    path = converted["tiny-llama"]
    with pytest.raises(ModelError, match="quant_bits=4, .* asks for quant_bits=8, "):
        lowmem.prepare(path, "quantize", quant_bits=8)
    with pytest.raises(ModelError, match="is a converted directory"):
        lowmem.prepare(path, "lora")  # a row that would load it whole
    with pytest.raises(ModelError, match="already converted"):
        lowmem.convert(path, tmp_path / "again")


def test_out_dir_is_never_overwritten_and_force_replaces_only_a_conversion(checkpoints, tmp_path):
    src, out = checkpoints["tiny-llama"], tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty"):
        lowmem.convert(src, out)
    with pytest.raises(ValueError, match="force replaces only an earlier conversion"):
        lowmem.convert(src, out, force=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    shutil.rmtree(out)
    lowmem.convert(src, out)
    lowmem.convert(src, out, "quantize", force=True, quant_bits=8)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["quantization"]["bits"] == 8
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the old one and temp folders gone


def test_cli_convert_then_measure_and_train_from_either_directory(
    checkpoints, tmp_path, capsys, results_tmp
):
    src, out = checkpoints["tiny-qwen"], tmp_path / "out"
    assert main(["convert", str(src), str(out), "--profile", "quantize", "--lora-r", "4"]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == str(out) and "per parameter" in printed.err
    assert json.loads((out / MANIFEST).read_text())["config"]["lora_r"] == 4
    assert main(["convert", str(src), str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    records = []
    for path in (src, out):
        args = ["measure", "--model", "tiny-qwen", "--model-path", str(path), "--stack", "best"]
        assert main([*args, "--meter", "cpu", "--seq-len", "16", "--set", "offload=memory"]) == 0
        records.append(json.loads(capsys.readouterr().out))
    metrics = [{k: r["metrics"][k] for k in ("peak_bytes", "parameters")} for r in records]
    assert records[0]["status"] == "ok" and metrics[0] == metrics[1]  # the same model and step
    assert (
        main(["measure", "--model", "tiny-qwen", "--model-path", str(out), "--meter", "cpu"]) == 2
    )
    assert "is a converted directory" in capsys.readouterr().err  # lora: would load it whole
    cfg = make_config("best", ["offload=memory"], seq_len=16)
    states = []
    for path in (src, out):
        with training_model("tiny-qwen", cfg.stack, "pretrained", model_path=str(path)) as model:
            states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # LoRA init too
