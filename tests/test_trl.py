"""lowmem.prepare under TRL: the fused-head call TRL's trainers make (per-token values, the
profile's gradients, unequal token weights refused), autocast off in the FP32 rows, and a stock
`trl.SFTTrainer` fine-tuning SmolLM2-135M at the `best` peak."""

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

import lowmem
from lowmem.config import ROWS
from lowmem.memory import LiveStorageTracker, module_tensors
from lowmem.models import base_model, build_model

trl = pytest.importorskip("trl")

SETTINGS = {"softmax_k": 100, "offload": "memory"}  # tiny vocabulary: K < V; no files


def tiny(profile):
    """A prepared tiny model with TRL's fused head installed, as SFTTrainer installs it."""
    torch.manual_seed(0)
    model = lowmem.prepare(build_model("tiny-llama"), profile, **SETTINGS)
    outputs = ("log_probs", "entropy", "is_top1")
    trl.trainer.utils.add_fused_lm_head(base_model(model), outputs=outputs)
    return model


def batch(vocab):
    """Two rows of 48 tokens, the second right-padded after 40; 10 untrained tokens each."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 48), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :10] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model):
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("profile", ROWS)
def test_the_fused_head_call_gives_exact_token_values_and_the_profiles_gradients(profile):
    """What SFTTrainer does with the call: -sum(log_probs) / label_mask.sum(), backward (lowmem
    answers it; in `baseline`, a bare model, TRL's own head does). Token values against
    log_softmax of the full logits, gradients against model(...).loss; rtol 1e-5 (FP32,
    chunked vs whole-vocabulary sums)."""
    model = tiny(profile)
    inputs = batch(model.config.vocab_size)
    out = model(**inputs, fused_lm_head=True)
    (-out.log_probs.sum() / out.label_mask.sum()).backward()
    got = grads(model)
    model.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()
    for a, b in zip(got, grads(model), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)

    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    logp = logits.logits[:, :-1].log_softmax(-1)
    targets = inputs["labels"][:, 1:]
    mask = targets != -100
    assert torch.equal(out.label_mask, mask)
    want = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * mask
    torch.testing.assert_close(out.log_probs.detach(), want, rtol=1e-5, atol=1e-5)
    entropy = -(logp.exp() * logp).sum(-1) * mask
    torch.testing.assert_close(out.entropy, entropy, rtol=1e-5, atol=1e-5)
    top1 = (logp.argmax(-1) == targets) & mask
    assert torch.equal(out.is_top1.bool(), top1)


def test_evaluation_runs_the_decoder_alone_and_gives_the_exact_loss():
    model = tiny("best").eval()
    inputs = batch(model.config.vocab_size)
    with torch.no_grad():
        out = model(**inputs, fused_lm_head=True)
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    want = F.cross_entropy(logits.logits[:, :-1].transpose(1, 2), inputs["labels"][:, 1:])
    assert float(out.loss) == pytest.approx(float(want), rel=1e-5)


def test_a_loss_that_weighs_tokens_unequally_is_refused_in_backward():
    model = tiny("best")
    out = model(**batch(model.config.vocab_size), fused_lm_head=True)
    dft = -(out.log_probs * out.log_probs.exp().detach()).sum() / out.label_mask.sum()
    with pytest.raises(ValueError, match=r"weighs the token log-probabilities unequally"):
        dft.backward()


@pytest.mark.parametrize("profile", ["lora", "best"])
def test_a_batch_without_trainable_tokens_adds_zero(profile):
    model = tiny(profile)
    inputs = batch(model.config.vocab_size)
    out = model(**{**inputs, "labels": torch.full_like(inputs["labels"], -100)}, fused_lm_head=True)
    loss = -out.log_probs.sum() / out.label_mask.sum().clamp(min=1)  # as SFTTrainer does
    loss.backward()
    assert float(loss.detach()) == 0.0 and not out.label_mask.any()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_autocast_is_off_inside_the_fp32_rows_and_kept_in_the_others():
    inputs = batch(tiny("best").config.vocab_size)
    for profile, kept in (("best", False), ("lora", True)):
        model = tiny(profile)
        fp32 = model(**inputs).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if kept:
                mixed = model(**inputs).loss
            else:
                with pytest.warns(UserWarning, match=r"'best' profile computes in FP32 only"):
                    mixed = model(**inputs).loss
        assert torch.equal(mixed, fp32) != kept, profile


def test_trls_sft_trainer_fine_tunes_smollm2_at_the_best_peak(tmp_path, smollm2_best):
    """Two 128-token rows, 5 SFTTrainer steps with TRL's defaults (bf16 autocast, gradient
    checkpointing, its fused head) on CPU: the loss falls, and the peak over the whole run
    (cpu meter) is lowmem's own best step plus AdamW's state, with no B x T x V logits."""
    from trl import SFTConfig, SFTTrainer

    rows, model, tokenizer = smollm2_best.rows, smollm2_best.model, smollm2_best.tokenizer
    args = SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,  # no GPU here; TRL's bf16=True then means CPU autocast
        per_device_train_batch_size=2,
        max_steps=5,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": rows}),
        processing_class=tokenizer,
    )
    tracker = LiveStorageTracker()
    tracker.register(module_tensors(model))
    with tracker, pytest.warns(UserWarning, match="computes in FP32 only"):
        trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    losses = [log["loss"] for log in logs]
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.5, losses
    assert all(0 <= log["mean_token_accuracy"] <= 1 and log["entropy"] > 0 for log in logs)
    logits = 2 * 128 * model.config.vocab_size * 4  # what the Hugging Face head would hold
    own_peak, trainable = smollm2_best.own_peak, smollm2_best.trainable
    assert own_peak <= tracker.peak <= own_peak + 3 * trainable + logits / 8, (
        own_peak,
        tracker.peak,
    )
