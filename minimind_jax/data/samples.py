"""Samples, the first stage of the data path: validated JSONL records and MiniMind2's rules
for their token ids and loss masks, exactly as the reference builds them (minimind-3's rules:
`data.minimind3`). Next stage: `token_cache`.

Pretrain lines are `{"text": str}`; SFT lines are `{"conversations": [{"content": str}, ...]}`
with roles taken by position (even = user, odd = assistant; the `role` field is ignored, as in
the reference). See shared/SPEC.md "Samples". `SAMPLE_FORMATS`: the formats a stage's rows
can be read in (the stages themselves: train.stages).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from minimind_jax.errors import UserError


class LineProblem(UserError):
    """What is wrong with one record; the JSONL reader prefixes the file and line."""


# --- record validation -------------------------------------------------------------------------

def _json_type(value) -> str:
    names = {str: "a string", bool: "a boolean", int: "a number", float: "a number",
             list: "an array", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def pretrain_text(record) -> str:
    """The `text` of a pretrain record, or LineProblem."""
    if not isinstance(record, dict):
        raise LineProblem(f"expected a JSON object with a 'text' field, got {_json_type(record)}")
    if "text" not in record:
        raise LineProblem("missing field 'text'")
    text = record["text"]
    if not isinstance(text, str):
        raise LineProblem(f"field 'text' must be a string, got {_json_type(text)}")
    return text


def conversation_turns(record) -> list[dict]:
    """The turns of an SFT record's non-empty `conversations` list, each an object, or
    LineProblem (the shape both MiniMind2's and minimind-3's sample rules read)."""
    if not isinstance(record, dict):
        raise LineProblem(f"expected a JSON object with a 'conversations' field, got "
                          f"{_json_type(record)}")
    if "conversations" not in record:
        raise LineProblem("missing field 'conversations'")
    return checked_turns(record["conversations"])


def checked_turns(conversations) -> list[dict]:
    """`conversations` itself once it is a non-empty list of objects, or LineProblem."""
    if not isinstance(conversations, list):
        raise LineProblem(f"field 'conversations' must be an array, got "
                          f"{_json_type(conversations)}")
    if not conversations:
        raise LineProblem("field 'conversations' is empty")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise LineProblem(f"conversations[{i}] must be an object, got {_json_type(turn)}")
    return conversations


def conversation_contents(conversations) -> list[str]:
    """The turn contents of a `conversations` list (user, assistant, user, ...), or LineProblem."""
    contents = []
    for i, turn in enumerate(checked_turns(conversations)):
        if "content" not in turn:
            raise LineProblem(f"conversations[{i}] is missing field 'content'")
        if not isinstance(turn["content"], str):
            raise LineProblem(f"conversations[{i}].content must be a string, got "
                              f"{_json_type(turn['content'])}")
        contents.append(turn["content"])
    return contents


def sft_contents(record) -> list[str]:
    """The turn contents of an SFT record, or LineProblem."""
    return conversation_contents(conversation_turns(record))


# --- streaming JSONL ---------------------------------------------------------------------------

@dataclass
class SkipReport:
    """Bad lines skipped under `skip_bad_lines`: a count and the first few messages."""

    path: str
    count: int = 0
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(message)

    def summary(self) -> str:
        if not self.count:
            return ""
        hidden = self.count - len(self.examples)
        more = f"\n  ... and {hidden} more" if hidden else ""
        return (f"skipped {self.count} bad line(s) in {self.path}:\n  "
                + "\n  ".join(self.examples) + more)


def _parse_line(raw: bytes, line_no: int, read_record):
    """(record or None for a blank line); LineProblem on bad input."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LineProblem(f"invalid UTF-8 (byte 0x{raw[err.start]:02x} at column "
                          f"{err.start + 1})") from None
    if line_no == 1:
        text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark some editors write
    if not text.strip():
        return None
    try:
        record = json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as err:
        where = "column" if err.msg.endswith(" at") else "at column"
        raise LineProblem(f"invalid JSON: {err.msg} {where} {err.colno}") from None
    return read_record(record)


def open_data_file(path: str | os.PathLike):
    """`path` opened for reading bytes, or UserError saying why it cannot be."""
    try:
        return open(path, "rb")  # noqa: SIM115 -- the caller closes it
    except FileNotFoundError:
        raise UserError(f"{path}: data file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder; --data_path takes a JSONL file") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None


def iter_jsonl_chunks(path: str | os.PathLike, stage: str, *, skip_bad_lines: bool = False,
                      skips: SkipReport | None = None, chunk_bytes: int = 1 << 20,
                      read_record=None) -> Iterator[tuple[list, int]]:
    """Stream `(records, bytes_read)` chunks of about `chunk_bytes` from a JSONL file.

    Records are texts (pretrain) or lists of turn contents (sft), or what `read_record(obj)`
    returns (it raises LineProblem on a bad record). Blank lines are ignored. A bad
    line raises UserError naming file, line and problem; with `skip_bad_lines` it is counted in
    `skips` instead. A file without any valid record raises UserError.
    """
    stage_reader = sample_format(stage).read_record  # checks `stage` either way
    read_record = read_record or stage_reader
    skips = skips if skips is not None else SkipReport(str(path))
    f = open_data_file(path)
    line_no = 0
    n_records = 0
    with f:
        while lines := f.readlines(chunk_bytes):
            records = []
            for raw in lines:
                line_no += 1
                try:
                    record = _parse_line(raw, line_no, read_record)
                except LineProblem as problem:
                    message = f"{path}:{line_no}: {problem}"
                    if not skip_bad_lines:
                        raise UserError(message + " (use --skip_bad_lines to skip such lines)") \
                            from None
                    skips.add(message)
                    continue
                if record is not None:
                    records.append(record)
            n_records += len(records)
            yield records, sum(len(raw) for raw in lines)
    if n_records == 0:
        if skips.count:
            raise UserError(f"{path}: no valid samples (all {skips.count} non-blank lines were "
                            f"bad)\n{skips.summary()}")
        if line_no:
            raise UserError(f"{path}: no samples (its {line_no} line(s) are all blank)")
        raise UserError(f"{path}: no samples (the file is empty)")


# --- token ids of samples ----------------------------------------------------------------------

def truncate_ids(ids_lists: list[list[int]], max_seq_len: int | None) -> list[list[int]]:
    """Each list cut to `max_seq_len` (None: unchanged); copies only the lists that are cut."""
    if max_seq_len is None:
        return ids_lists
    return [ids if len(ids) <= max_seq_len else ids[:max_seq_len] for ids in ids_lists]


def pretrain_ids_batch(tokenizer, texts: Sequence[str],
                       max_seq_len: int | None) -> list[list[int]]:
    """Ids of `<s>` + text + `</s>` for each text, truncated to `max_seq_len` (None: not)."""
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    return truncate_ids([[bos, *ids, eos] for ids in tokenizer.encode_batch(texts)], max_seq_len)


def sft_prompt(tokenizer, contents: Sequence[str]) -> str:
    """The chat-template text of a conversation, roles by position (user first)."""
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": content}
                for i, content in enumerate(contents)]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=False)


def sft_ids_batch(tokenizer, conversations: Sequence[Sequence[str]],
                  max_seq_len: int | None) -> list[list[int]]:
    """Ids of each conversation's chat-template text, truncated to `max_seq_len` (None: not)."""
    prompts = [sft_prompt(tokenizer, contents) for contents in conversations]
    return truncate_ids(tokenizer.encode_batch(prompts), max_seq_len)


def sft_mask_markers(tokenizer) -> tuple[list[int], list[int]]:
    """Token sequences that open (`<s>assistant`) and close (`</s>`) a supervised reply."""
    return (tokenizer.encode(f"{tokenizer.bos_token}assistant"),
            tokenizer.encode(tokenizer.eos_token))


def pad_rows(ids_list: Sequence[Sequence[int]], length: int, pad_id: int,
             dtype=np.int64) -> np.ndarray:
    """[N, length] array of the (already truncated) id lists, right-padded with `pad_id`."""
    rows = np.full((len(ids_list), length), pad_id, dtype=dtype)
    for row, ids in zip(rows, ids_list, strict=True):
        row[:len(ids)] = ids
    return rows


def _occurrences(ids_L: np.ndarray, pattern: Sequence[int]) -> np.ndarray:
    """Start positions of complete occurrences of `pattern` in `ids_L`."""
    k = len(pattern)
    if k == 0 or len(ids_L) < k:
        return np.zeros(0, np.int64)
    windows = sliding_window_view(ids_L, k)
    return np.flatnonzero((windows == np.asarray(pattern)).all(axis=1))


def sft_loss_mask(ids_L: np.ndarray, start_ids: Sequence[int],
                  end_ids: Sequence[int], offset: int = 1) -> np.ndarray:
    """The reference's SFT mask over one padded row (shared/SPEC.md "Samples"): after each
    `<s>assistant` at i, from start = i + len(start_ids) to the next `</s>` at `end` (or the row
    end), mark start+o <= j < min(end + len(end_ids) + o, L), then continue after that `</s>`.
    MiniMind2 marks the shifted targets (o = 1); minimind-3 marks its unshifted labels (o = 0)."""
    ids_L = np.asarray(ids_L)
    length = len(ids_L)
    mask = np.zeros(length, np.int64)
    ends = _occurrences(ids_L, end_ids)
    resume_at = 0
    for i in _occurrences(ids_L, start_ids):
        if i < resume_at:
            continue
        start = i + len(start_ids)
        k = np.searchsorted(ends, start)
        end = int(ends[k]) if k < len(ends) else length
        mask[start + offset:min(end + len(end_ids) + offset, length)] = 1
        resume_at = end + len(end_ids) if k < len(ends) else length
    return mask


def shift(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, Y, loss_mask) = (ids[:-1], ids[1:], mask[1:]) along the last axis."""
    return ids[..., :-1], ids[..., 1:], mask[..., 1:]


# --- sample formats ----------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleFormat:
    """How a JSONL file's records become MiniMind2's samples (minimind-3's rules:
    `data.minimind3`, picked by `token_cache.sample_rules`)."""

    name: str  # pretrain / sft, also the token cache's key
    read_record: Callable  # JSON record -> text / turn contents, or LineProblem
    sample_ids: Callable  # (tokenizer, records, max_seq_len or None) -> MiniMind2's id lists


SAMPLE_FORMATS = {f.name: f for f in (SampleFormat("pretrain", pretrain_text, pretrain_ids_batch),
                                      SampleFormat("sft", sft_contents, sft_ids_batch))}


def sample_format(name: str) -> SampleFormat:
    """The sample format called `name`, or UserError."""
    if name not in SAMPLE_FORMATS:
        raise UserError(f"unknown sample format {name!r}; expected one of "
                        f"{', '.join(SAMPLE_FORMATS)}")
    return SAMPLE_FORMATS[name]
