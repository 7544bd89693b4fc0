"""lowmem.loader: a directory loaded a tensor at a time gives the model that loading it whole
and applying the profile gives (same seed: same LoRA init, loss and gradients, bit for bit),
with a peak far below the FP32 model; bad shards are refused naming the file."""

import json

import pytest
import torch

import lowmem
from lowmem.api import plan
from lowmem.loader import load_quantized, quantize_by_rows
from lowmem.memory import LiveStorageTracker
from lowmem.models import build_model, load_from_directory, stored_weight_bytes
from lowmem.quantize import quantize

TINY_MODELS = ["tiny-llama", "tiny-qwen", "tiny-mistral"]  # tied, tied + biases, untied head
SETTINGS = {"quantize": {}, "best": {"softmax_k": 100, "offload": "memory"}}
BLOCK = 7 * 64 * 4  # 7 rows of a D=64 weight: blocks that do not divide the 512-row vocabulary


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_checkpoints(tmp_path_factory)


def save_checkpoints(tmp_path_factory) -> dict:
    """Each tiny model saved as a stock checkpoint would be: BF16, in several shards."""
    out = {}
    for name in TINY_MODELS:
        torch.manual_seed(1)
        path = tmp_path_factory.mktemp(name)
        build_model(name).to(torch.bfloat16).save_pretrained(path, max_shard_size="100KB")
        assert len(list(path.glob("*.safetensors"))) > 1
        out[name] = path
    return out


def step(model):
    """Loss and LoRA gradients of one step; lora_B drawn non-zero so every adapter matters."""
    torch.manual_seed(2)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator())
    labels = ids.clone()
    labels[:, :8] = -100
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("profile", SETTINGS)
@pytest.mark.parametrize("name", TINY_MODELS)
def test_tensor_by_tensor_equals_loading_whole(checkpoints, name, profile, tmp_path):
    settings = {**SETTINGS[profile], "offload_dir": str(tmp_path)}
    torch.manual_seed(0)
    with lowmem.prepare(load_from_directory(checkpoints[name]), profile, **settings) as whole:
        init_whole = {k: v.clone() for k, v in whole.state_dict().items()}
        buffers_whole = dict(whole.named_buffers())
        loss_whole, grads_whole = step(whole)
    torch.manual_seed(0)
    with lowmem.prepare(checkpoints[name], profile, **settings) as streamed:  # the loader
        init = streamed.state_dict()
        assert init.keys() == init_whole.keys()
        assert all(torch.equal(init[k], init_whole[k]) for k in init)  # LoRA init included
        buffers = dict(streamed.named_buffers())
        assert all(torch.equal(buffers[k], b) for k, b in buffers_whole.items() if b is not None)
        loss, grads = step(streamed)
    assert torch.equal(loss, loss_whole)  # bit-identical: the same weights, the same ops
    assert grads.keys() == grads_whole.keys() and grads
    assert all(torch.equal(grads[k], grads_whole[k]) for k in grads)


def test_row_blocks_quantize_as_the_whole_matrix():
    w = torch.randn(37, 64)
    for bits, group, symmetric in [(4, 32, True), (8, 0, False)]:
        whole = quantize(w, bits, group, symmetric)
        blocks = quantize_by_rows(lambda a, b: w[a:b], (37, 64), bits, group, symmetric, 5)
        for part in ("codes", "scales", "zeros"):
            a, b = getattr(whole, part), getattr(blocks, part)
            assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_peak_is_the_quantized_model_plus_one_tensor(checkpoints, name):
    """Tracked peak <= quantized model + LoRA + the largest tensor's BF16 bytes (safetensors
    maps the whole tensor being read: page cache, counted anyway) + 4 x one FP32 row block
    (the quantize temporaries); and below half of the FP32 model."""
    fp32 = build_model(name)
    fp32_bytes = sum(4 * p.numel() for p in fp32.parameters())  # tied weight counted once
    largest = max(p.numel() for p in fp32.parameters())
    with LiveStorageTracker() as tracker:
        model = load_quantized(checkpoints[name], plan("quantize"), block_bytes=BLOCK)
    lora = sum(4 * p.numel() for p in model.parameters() if p.requires_grad)
    assert tracker.peak <= stored_weight_bytes(model) + lora + 2 * largest + 4 * BLOCK
    assert tracker.peak < fp32_bytes / 2


def shards(path):
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]


def broken_copy(src, dst):
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst, sorted(set(shards(dst).values()))


def test_a_missing_shard_is_named(checkpoints, tmp_path):
    path, files = broken_copy(checkpoints["tiny-llama"], tmp_path)
    (path / files[1]).unlink()
    with pytest.raises(ValueError, match=f"shard .*{files[1]}.* does not exist"):
        load_quantized(path, plan("quantize"))


@pytest.mark.parametrize("keep", [4, 0.5])  # the header cut, the data cut
def test_a_truncated_shard_is_named(checkpoints, tmp_path, keep):
    path, files = broken_copy(checkpoints["tiny-llama"], tmp_path)
    data = (path / files[0]).read_bytes()
    (path / files[0]).write_bytes(data[: keep if isinstance(keep, int) else len(data) // 2])
    with pytest.raises(ValueError, match=f"cannot open shard .*{files[0]}"):
        load_quantized(path, plan("quantize"))


def test_shapes_that_do_not_match_the_config_are_named(checkpoints, tmp_path):
    path, _ = broken_copy(checkpoints["tiny-llama"], tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    key = "model.layers.0.mlp.gate_proj.weight"
    with pytest.raises(ValueError, match=f"{key}' in .*{shards(path)[key]}.* needs shape"):
        load_quantized(path, plan("quantize"))


def test_rows_that_do_not_quantize_are_refused():
    with pytest.raises(ValueError, match="stack='lora'"):
        load_quantized("unused", plan("lora"))
