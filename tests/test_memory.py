import gc

import pytest
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from lowmem.bench import run_cell
from lowmem.checkpoint import checkpointing_of
from lowmem.config import ROWS, StackConfig, parse_spec
from lowmem.loss import compute_loss
from lowmem.memory import LiveStorageTracker, allocator_peak_bytes, meter_context
from lowmem.meter import measure_step
from lowmem.models import build_model
from lowmem.stack import apply_stack, benchmark_batch


def test_tracker_counts_a_handmade_sequence_exactly():
    tracker = LiveStorageTracker()
    with tracker:
        a = torch.empty(1000, dtype=torch.float32)  # +4000
        b = torch.empty(250, dtype=torch.float64)  # +2000 -> 6000
        view = a[10:20].view(2, 5)  # a view shares a's storage: +0
        a.add_(1)  # in place: +0
        del a  # the view keeps the storage alive: 6000
        c = torch.empty(100, dtype=torch.int8)  # +100 -> 6100 (peak)
        del view  # a's storage dies: -4000 -> 2100
        d = torch.empty(1024, dtype=torch.float16)  # +2048 -> 4148
    assert tracker.peak == 6100
    assert tracker.live == 4148
    del b, c, d
    assert tracker.live == 0


def test_tracker_registers_outside_tensors_once_and_attributes_the_peak_phase():
    w = torch.zeros(64, 64)  # 16384 bytes, made before the tracker existed
    tracker = LiveStorageTracker()
    tracker.register([w, w, w.T])
    assert tracker.live == 16384
    with tracker:
        tracker.mark("forward")
        x = w @ w  # +16384
        tracker.mark("backward")
        y = torch.cat([x, x])  # +32768 -> 65536
        del x, y
    assert tracker.peak == 65536
    assert tracker.peak_phase == "backward" and tracker.peak_op == "aten.cat.default"
    assert tracker.phase_peaks == {"setup": 16384, "forward": 32768, "backward": 65536}


def test_unknown_meter_is_refused():
    with pytest.raises(ValueError, match="unknown meter 'tpu'"):
        with meter_context("tpu"):
            pass


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen"])
@pytest.mark.parametrize(
    "cfg",
    [
        StackConfig(stack="baseline", seq_len=96),
        StackConfig(stack="lora", seq_len=96),
        StackConfig.from_flat(stack="lora", seq_len=33, lora_targets=("all-linear",), gqa="native"),
        StackConfig(stack="quantize", seq_len=96),
        StackConfig.from_flat(
            stack="quantize", seq_len=40, quant_bits=8, quant_group_size=0, quant_symmetric=False
        ),
        StackConfig.from_flat(stack="checkpoint", seq_len=64, offload_async=False),
        StackConfig.from_flat(
            stack="checkpoint", seq_len=40, offload="memory", cache_policy="all_linear"
        ),
        StackConfig.from_flat(
            stack="checkpoint", seq_len=40, offload_async=False, cache_policy="mlp"
        ),
        StackConfig.from_flat(
            stack="softmax_approx", seq_len=48, softmax_k=64, offload_async=False
        ),
        StackConfig.from_flat(
            stack="logits_mask",
            seq_len=48,
            softmax_k=64,
            softmax_rule="target_neighbors",
            softmax_variant="chunked",
            loss_chunk=100,
            offload_async=False,
        ),
        StackConfig.from_flat(stack="best", seq_len=48, loss_chunk=100, offload_async=False),
        StackConfig.from_flat(
            stack="best", seq_len=48, offload_async=False, quant_codebook="nf4", quant_group_size=16
        ),
    ],
    ids=[
        "baseline",
        "lora",
        "lora-all-linear-native",
        "quantize",
        "quantize-int8-asym",
        "checkpoint-disk",
        "checkpoint-memory-cache-all",
        "checkpoint-disk-cache-mlp",
        "softmax-approx",
        "logits-mask-neighbors-chunked",
        "best",
        "best-nf4",
    ],
)
def test_simulated_equals_cpu_to_the_byte(model, cfg):
    real = run_cell(model, cfg, "cpu")
    fake = run_cell(model, cfg, "simulated")
    assert real["status"] == fake["status"] == "ok", (real["error"], fake["error"])
    for key in ("peak_bytes", "peak_phase", "phase_peak_bytes", "resident_bytes"):
        assert fake["metrics"][key] == real["metrics"][key], key
    assert real["metrics"]["peak_rss_bytes"] >= real["metrics"]["peak_bytes"]


@pytest.mark.parametrize(
    "spec",
    [
        *ROWS,
        "softmax_approx:softmax_rule=target_neighbors,softmax_variant=chunked",
        "best:quant_codebook=nf4,quant_scale_dtype=fp16,quant_group_size=16",
    ],
)
def test_the_tracker_sees_the_peak_a_plain_run_has(spec):
    # the tracker is a TorchDispatchMode, and under a mode some PyTorch backward formulas run
    # out of place (gather's did: one more N x V tensor in the softmax-approximation rows); the
    # allocator's own events, taken with no mode active, are the reference
    cfg = parse_spec(spec, seq_len=64, softmax_k=100, offload="memory")

    def model_and_batch():
        torch.manual_seed(0)
        model = apply_stack(build_model("smollm2-135m"), cfg)
        return model, benchmark_batch(cfg, model.config.vocab_size)

    def loss_fn(model, batch):
        return compute_loss(model, batch, cfg)

    def plain_peak():
        model, batch = model_and_batch()
        return allocator_peak_bytes(lambda: loss_fn(model, batch)[0].backward())

    model, batch = model_and_batch()
    tracked = measure_step(model, batch, "cpu", keep_outputs=False, loss_fn=loss_fn)
    # the allocator also sees a few small kernel buffers that are no tensor storage
    assert abs(tracked["peak_bytes"] - tracked["resident_bytes"] - plain_peak()) <= 4096


def _warm_cuda_libraries() -> None:
    """cuBLAS and cuBLASLt take their workspaces at their first call and keep them: take them
    before a measured step, so that the step's allocator peak holds them whole (the first cell
    measured on a fresh GPU process had taken only part of them at its peak: 2026-12-04)."""
    x = torch.randn(64, 64, device="cuda", requires_grad=True)
    ((x @ x).sum() + torch.nn.functional.linear(x, x, x[0]).sum()).backward()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("stack", ROWS)
def test_cuda_allocator_peak_matches_simulated(stack):
    _warm_cuda_libraries()
    cfg = StackConfig.from_flat(stack=stack, seq_len=512, softmax_k=100, offload_async=False)
    gpu = run_cell("tiny-llama", cfg, "cuda")
    fake = run_cell("tiny-llama", cfg, "simulated")
    assert gpu["status"] == "ok", gpu["error"]
    gc.collect()
    torch.cuda.empty_cache()
    # what outlives the cell is no tensor of it: cuBLAS / cuBLASLt workspaces (64 MiB on an
    # H200, more than this model's whole step), which the caching allocator counts
    workspaces = torch.cuda.memory_allocated()
    allocated, tracked = gpu["metrics"]["peak_bytes"], gpu["metrics"]["tracked_peak_bytes"]
    simulated = fake["metrics"]["peak_bytes"]
    seen = f"allocated {allocated}, workspaces {workspaces}, tracked {tracked}, sim {simulated}"
    # the tracker on the GPU sees the tensors the simulated meter predicts
    assert abs(tracked - simulated) <= 0.10 * simulated + 2**20, seen
    # the allocator, less the workspaces, holds those tensors (blocks rounded up to 512 B)
    assert tracked - 2**20 <= allocated - workspaces <= 1.10 * tracked + 2**20, seen


@pytest.mark.parametrize("meter", ["cpu", "simulated"])
def test_weights_streamed_from_an_in_memory_store_are_still_counted(meter):
    """Streaming to an in-memory store moves the INT4 weights, it does not free them."""
    peaks = []
    for stream in (False, True):
        cfg = StackConfig.from_flat(
            "checkpoint", seq_len=64, offload="memory", stream_weights=stream
        )
        metrics = run_cell("tiny-llama", cfg, meter)["metrics"]
        peaks.append((metrics["peak_bytes"], metrics["resident_bytes"]))
    assert peaks[0] == peaks[1]


def test_cuda_meter_reads_the_allocator_around_a_plain_run_and_tracks_a_second(monkeypatch):
    # no GPU here: the allocator's counters are fakes that note whether a dispatch mode was
    # active when they were called; the step notes the same about itself
    events = []

    def fake(name, value=0):
        def call(*args, **kwargs):
            events.append((name, _get_current_dispatch_mode() is not None))
            return value

        return call

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", fake("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", fake("allocated", 123_000))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", fake("reserved", 456_000))
    # LoRA dropout draws random numbers; disk offload and streamed weights keep state per layer
    cfg = StackConfig.from_flat("checkpoint", seq_len=40, lora_dropout=0.1, offload_async=False)

    def loss_fn(model, batch):
        events.append(("step", _get_current_dispatch_mode() is not None))
        return compute_loss(model, batch, cfg)

    def measured(meter):
        torch.manual_seed(0)
        model = apply_stack(build_model("tiny-llama"), cfg)
        batch = benchmark_batch(cfg, model.config.vocab_size)
        metrics = measure_step(model, batch, meter, keep_outputs=False, loss_fn=loss_fn)
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        stats = checkpointing_of(model).stats()
        checkpointing_of(model).close()
        return metrics, grads, stats

    cuda, cuda_grads, cuda_stats = measured("cuda")
    assert events == [
        ("reset", False),
        ("step", False),
        ("allocated", False),
        ("reserved", False),
        ("step", True),
    ]
    cpu, cpu_grads, cpu_stats = measured("cpu")
    assert cuda["peak_bytes"] == 123_000 and cuda["reserved_peak_bytes"] == 456_000
    assert cuda["peak_gib"] == 123_000 / 2**30
    # the tracked run started where a single step starts: no gradients, same random numbers
    assert cuda["tracked_peak_bytes"] == cpu["peak_bytes"]
    for key in ("peak_phase", "peak_op", "peak_tensors", "phase_peak_bytes", "resident_bytes"):
        assert cuda[key] == cpu[key], key
    assert cuda["loss"] == cpu["loss"]
    assert cuda_grads.keys() == cpu_grads.keys() and cuda_grads
    for name, grad in cuda_grads.items():
        assert torch.equal(grad, cpu_grads[name]), name  # one step's, not two steps' sum
    for key in ("activations_bytes_written", "activations_bytes_read", "weights_bytes_read"):
        assert cuda_stats[key] == cpu_stats[key] > 0, key  # the counters tell of one step


def test_cuda_meter_leaves_one_step_gradient_on_a_batch_leaf(monkeypatch):
    # study.py measures a head alone, its input hidden states a leaf that requires grad
    for name in ("reset_peak_memory_stats", "max_memory_allocated", "max_memory_reserved"):
        monkeypatch.setattr(torch.cuda, name, lambda: 0)
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 4)
    batch = {"hidden": torch.randn(3, 8, requires_grad=True)}

    def loss_fn(model, batch):
        return model(batch["hidden"]).square().sum(), None

    measure_step(head, batch, "cuda", keep_outputs=False, loss_fn=loss_fn)
    hidden = batch["hidden"].detach().requires_grad_(True)
    loss_fn(head, {"hidden": hidden})[0].backward()
    assert torch.equal(batch["hidden"].grad, hidden.grad)
