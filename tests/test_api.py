"""lowmem.prepare in a stock loop: the profile's loss from model(...), padding, the Trainer,
a stock adapter, the merged directory, and its refusals."""

import gc

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

import lowmem
from lowmem.config import MLP_TILE_ELEMENTS, ROWS
from lowmem.loss import compute_loss
from lowmem.memory import LiveStorageTracker, module_tensors
from lowmem.models import build_model, count_parameters

OWN_HEAD = ("softmax_approx", "logits_mask", "best")
SETTINGS = {"softmax_k": 100, "offload": "memory"}  # tiny vocabulary: K < V; no files


def tiny(profile, name="tiny-llama", **settings):
    torch.manual_seed(0)
    return lowmem.prepare(build_model(name), profile, **{**SETTINGS, **settings})


def tokens(vocab, *lengths, untrained=10):
    g = torch.Generator().manual_seed(1)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (1, n), generator=g)
        labels = ids.clone()
        labels[:, :untrained] = -100
        out.append((ids, labels))
    return out


def grads(model):
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("profile", ROWS)
def test_model_call_gives_the_profile_loss_and_lowmems_own_gradients(profile):
    model = tiny(profile)
    ((ids, labels),) = tokens(model.config.vocab_size, 48)
    ids, labels = ids.repeat(2, 1), labels.repeat(2, 1)
    out = model(input_ids=ids, labels=labels)
    # the rows that compute the head themselves never build B x T x V logits
    assert (out.logits is None) == (profile in OWN_HEAD)
    out.loss.backward()
    got = grads(model)
    model.zero_grad(set_to_none=True)
    loss = compute_loss(model, {"input_ids": ids, "labels": labels}, model.lowmem_config)[0]
    loss.backward()
    assert torch.equal(out.loss, loss)
    assert all(torch.equal(a, b) for a, b in zip(got, grads(model), strict=True))


def padded(seqs, side):
    width = max(ids.shape[1] for ids, _ in seqs)
    rows = {"input_ids": [], "labels": [], "attention_mask": []}
    for ids, labels in seqs:
        pad = torch.zeros(1, width - ids.shape[1], dtype=torch.long)
        parts = {"input_ids": (ids, pad), "labels": (labels, pad - 100)}
        parts["attention_mask"] = (torch.ones_like(ids), pad)
        for key, (real, filler) in parts.items():
            pair = (real, filler) if side == "right" else (filler, real)
            rows[key].append(torch.cat(pair, dim=1))
    return {k: torch.cat(v) for k, v in rows.items()}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen", "tiny-mistral"])
@pytest.mark.parametrize("profile", ROWS)
def test_left_and_right_padding_give_the_loss_of_the_unpadded_sequences(profile, name):
    """Token-weighted mean of each sequence's own loss; rtol 1e-5 (FP32, other batch shapes)."""
    model = tiny(profile, name)
    seqs = tokens(model.config.vocab_size, 40, 64)
    total, count = 0.0, 0
    for ids, labels in seqs:
        n = int((labels[:, 1:] != -100).sum())
        total += float(model(input_ids=ids, labels=labels).loss) * n
        count += n
    for side in ("left", "right"):
        model.zero_grad(set_to_none=True)
        loss = model(**padded(seqs, side)).loss
        assert float(loss) == pytest.approx(total / count, rel=1e-5), side
        loss.backward()
        assert all(torch.isfinite(g).all() for g in grads(model)), side


def test_num_items_in_batch_makes_the_loss_a_sum_over_the_whole_step():
    model = tiny("best")
    ((ids, labels),) = tokens(model.config.vocab_size, 48)
    mean = model(input_ids=ids, labels=labels).loss
    n = int((labels[:, 1:] != -100).sum())
    summed = model(input_ids=ids, labels=labels, num_items_in_batch=3 * n).loss
    assert float(summed) == pytest.approx(float(mean) / 3, rel=1e-6)


@pytest.mark.parametrize("profile", OWN_HEAD)
def test_a_micro_batch_without_trainable_tokens_adds_zero_to_the_step(profile):
    """As the Hugging Face loss does under the Trainer: sum / num_items_in_batch = 0, not NaN."""
    model = tiny(profile)
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    out = model(input_ids=ids, labels=torch.full_like(ids, -100), num_items_in_batch=10)
    assert float(out.loss) == 0.0
    out.loss.backward()  # what the Trainer does with it
    assert all(p.grad is None for p in model.parameters())


def test_save_pretrained_writes_a_stock_adapter(tmp_path):
    model = tiny("best")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(str(tmp_path))
    torch.manual_seed(0)
    stock = PeftModel.from_pretrained(build_model("tiny-llama"), str(tmp_path))
    ours = {n: p for n, p in model.named_parameters() if "lora_" in n}
    theirs = {n: p for n, p in stock.named_parameters() if "lora_" in n}
    assert ours.keys() == theirs.keys() and ours
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize(("name", "profile"), [("tiny-llama", "best"), ("tiny-qwen", "lora")])
def test_merge_writes_a_directory_whose_logits_are_base_plus_adapter(tmp_path, name, profile):
    """Streamed INT4 base (best) and FP32 base with q/k/v biases (Qwen, lora); atol 1e-5."""
    model = tiny(profile, name, offload="disk", offload_dir=str(tmp_path))
    for pname, p in model.named_parameters():
        if "lora_B" in pname:
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    tracker = LiveStorageTracker()
    tracker.register(module_tensors(model))
    resident = tracker.live
    with tracker:
        out = lowmem.merge(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not torch.equal(got, build_model(name).eval()(input_ids=ids).logits)
    # a layer at a time: never the whole model in FP32 beside what it already holds
    fp32 = 4 * count_parameters(merged)[0]
    assert tracker.peak - resident < fp32 / 2


def test_prepare_refuses_what_it_cannot_honour_in_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"bad profile='fast': must be one of baseline, lora"):
        lowmem.prepare(build_model("tiny-llama"), "fast")
    with pytest.raises(ValueError, match=r"bad setting 'seq_len' \(a benchmark input"):
        lowmem.prepare(build_model("tiny-llama"), "best", seq_len=2048)
    with pytest.raises(ValueError, match=r"bad setting 'lora_rank': lowmem.prepare takes"):
        lowmem.prepare(build_model("tiny-llama"), "best", lora_rank=8)
    with pytest.raises(ValueError, match=r"bad model of type Linear"):
        lowmem.prepare(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"bad quant_backend='bnb-nf4'"):
        lowmem.prepare(build_model("tiny-llama"), "best", quant_backend="bnb-nf4")
    model = tiny("lora")
    with pytest.raises(ValueError, match="already prepared"):
        lowmem.prepare(model, "best")
    with pytest.raises(ValueError, match="is not a directory"):
        lowmem.prepare(str(tmp_path / "missing"))


def test_the_plan_has_no_auto_left_but_the_tile_the_model_sizes():
    cfg = lowmem.plan("best")
    assert (
        cfg.kernels.dequant_chunk,
        cfg.kernels.mlp_tile,
        cfg.checkpoint.offload_prefetch,
        cfg.kernels.gqa,
    ) == (
        1024,
        -1,
        0,
        "native",
    )
    with tiny("best", offload="memory") as model:
        ran = model.lowmem_config.to_dict()
        assert ran["mlp_tile"] == MLP_TILE_ELEMENTS // model.config.intermediate_size
        assert -1 not in ran.values() and "auto" not in ran.values()
    paper = lowmem.plan("checkpoint")
    assert (
        paper.kernels.dequant_chunk,
        paper.kernels.mlp_tile,
        paper.checkpoint.offload_prefetch,
    ) == (0, 0, 1)


def test_the_model_owns_its_offload_files(tmp_path):
    with tiny("best", offload="disk", offload_dir=str(tmp_path)) as model:
        assert any(tmp_path.iterdir())
        ((ids, labels),) = tokens(model.config.vocab_size, 32)
        model(input_ids=ids, labels=labels).loss.backward()
    assert not any(tmp_path.iterdir())
    model = tiny("best", offload="disk", offload_dir=str(tmp_path))
    assert any(tmp_path.iterdir())
    del model
    gc.collect()
    assert not any(tmp_path.iterdir())


def test_a_stock_trainer_fine_tunes_smollm2_at_the_best_peak(tmp_path, smollm2_best):
    """Two 128-token rows, 5 Trainer steps: the loss falls, and the peak over the whole run
    (cpu meter) is lowmem's own best step plus AdamW's state, with no B x T x V logits."""
    rows, model = smollm2_best.rows, smollm2_best.model
    data = Dataset.from_dict({"input_ids": rows, "labels": rows, "attention_mask": [[1] * 128] * 2})
    losses = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            losses.extend([logs["loss"]] if "loss" in (logs or {}) else [])

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=5,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Losses()])
    tracker = LiveStorageTracker()
    tracker.register(module_tensors(model))
    with tracker:
        trainer.train()
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.5, losses
    logits = 2 * 128 * model.config.vocab_size * 4  # what the Hugging Face head would hold
    own_peak, trainable = smollm2_best.own_peak, smollm2_best.trainable
    assert own_peak <= tracker.peak <= own_peak + 3 * trainable + logits / 8


def test_activation_checkpointing_is_left_to_lowmem_where_the_profile_checkpoints():
    model = tiny("best")
    layer = model.get_base_model().model.layers[0]
    forward = layer.forward
    with pytest.warns(UserWarning, match="'best' profile already checkpoints every decoder"):
        model.activation_checkpointing_enable()
    assert layer.forward == forward and not model.get_base_model().is_activation_checkpointing
    plain = tiny("lora")
    plain.gradient_checkpointing_enable()
    assert plain.get_base_model().is_activation_checkpointing


def test_merge_and_unload_points_to_lowmem_merge():
    with pytest.raises(NotImplementedError, match=r"lowmem.merge\(model, out_dir\)"):
        tiny("best").merge_and_unload()
