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
