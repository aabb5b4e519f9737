"""Samples equal to the reference's goldens; the SFT mask rule; every bad-input message."""

import json

import numpy as np
import pytest

from minimind_jax.data.rows import open_source
from minimind_jax.data.samples import SkipReport, iter_jsonl_chunks, sft_loss_mask
from minimind_jax.data.tokenizer import load_tokenizer
from minimind_jax.errors import UserError
from tests.helpers import PRETRAIN_JSONL, SFT_JSONL, TOKENIZER_DIR
from tests.spec_samples import SpecTokenizer, minimind2_pretrain_sample, minimind2_sft_sample


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def spec_tok():
    return SpecTokenizer(TOKENIZER_DIR)


def _lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("path, make_sample, field, prefix, count", [
    (PRETRAIN_JSONL, minimind2_pretrain_sample, "text", "pre", 80),
    (SFT_JSONL, minimind2_sft_sample, "conversations", "sft", 40),
], ids=["pretrain", "sft"])
def test_spec_samples_equal_golden(spec_tok, golden, path, make_sample, field, prefix, count):
    """tests/spec_samples' MiniMind2 rules (what the package is checked against where no
    golden holds the sample) give the reference's samples; test_prepare checks the package's
    own against these goldens."""
    records = _lines(path)
    assert len(records) == len(golden[f"{prefix}_X"]) == count
    for i, record in enumerate(records):
        x, y, mask = make_sample(spec_tok, record[field], 64)
        np.testing.assert_array_equal(x, golden[f"{prefix}_X"][i])
        np.testing.assert_array_equal(y, golden[f"{prefix}_Y"][i])
        np.testing.assert_array_equal(mask, golden[f"{prefix}_mask"][i])


# Expected masks worked out by hand from SPEC "Samples" with <s>assistant = [1, 9], </s> = [2].
@pytest.mark.parametrize("ids, expected", [
    # one reply: from start+1 through the </s> and the token after it
    ([1, 5, 2, 7, 1, 9, 3, 4, 5, 2, 8, 0, 0], [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0]),
    # no </s> (a conversation ending on a user turn): the mask runs into the padding
    ([1, 9, 3, 4, 5, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1]),
    # an <s>assistant inside a reply is skipped; the scan resumes after the </s>
    ([1, 9, 3, 1, 9, 4, 2, 6, 1, 9, 7, 2, 6], [0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1]),
    # </s> at the very end: capped at the row length
    ([1, 9, 3, 2], [0, 0, 0, 1]),
    # a split marker is not a marker
    ([5, 1, 7, 9, 3, 2, 4], [0, 0, 0, 0, 0, 0, 0]),
])
def test_sft_loss_mask_rule(ids, expected):
    np.testing.assert_array_equal(sft_loss_mask(np.array(ids), [1, 9], [2]), expected)


def test_sft_roles_by_position_and_truncated_reply(tok, spec_tok, tmp_path):
    """The package's SFT rows (through its data path) of two odd conversations are the spec's
    samples: the role field is ignored (reference behaviour: the odd turn is supervised
    regardless), and a reply truncated away leaves no supervised token (the loss must handle
    it)."""
    turns = [{"role": "assistant", "content": "q"}, {"role": "user", "content": "answer"}]
    long_user = [{"role": "user", "content": "很" * 200}, {"role": "assistant", "content": "a"}]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"conversations": c}, ensure_ascii=False) + "\n"
                            for c in (turns, long_user)), encoding="utf-8")
    source = open_source(path, tok, "sft", 64, cache_dir=tmp_path / "cache", log=lambda m: None)
    batch = source.get_batch(np.arange(2))
    assert tok.decode(batch["labels"][0][batch["loss_mask"][0] == 1]) == "answer</s>\n"
    assert batch["loss_mask"][1].sum() == 0
    for i, conversation in enumerate((turns, long_user)):
        x, y, mask = minimind2_sft_sample(spec_tok, conversation, 64)
        np.testing.assert_array_equal(batch["input_ids"][i], x)
        np.testing.assert_array_equal(batch["labels"][i], y)
        np.testing.assert_array_equal(batch["loss_mask"][i], mask)


def _read_all(tmp_path, content: bytes, stage="pretrain", **kwargs):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    records = []
    for chunk, _ in iter_jsonl_chunks(path, stage, **kwargs):
        records += chunk
    return path, records


BAD_PRETRAIN = [
    (b'{"text": "ok"}\n{"text": "unterminated\n', r":2: invalid JSON: Unterminated string"),
    (b'{"text": "ok"}\n{"txt": "x"}\n', r":2: missing field 'text'"),
    (b'{"text": 5}\n', r":1: field 'text' must be a string, got a number"),
    (b'{"text": null}\n', r":1: field 'text' must be a string, got null"),
    (b'["text"]\n', r":1: expected a JSON object with a 'text' field, got an array"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r":2: invalid UTF-8 \(byte 0xe9 at column 14\)"),
]
BAD_SFT = [
    (b'{"conv": []}\n', r":1: missing field 'conversations'"),
    (b'{"conversations": []}\n', r":1: field 'conversations' is empty"),
    (b'{"conversations": "hi"}\n', r":1: field 'conversations' must be an array, got a string"),
    (b'{"conversations": ["hi"]}\n', r":1: conversations\[0\] must be an object, got a string"),
    (b'{"conversations": [{"content": "a"}, {"role": "assistant"}]}\n',
     r":1: conversations\[1\] is missing field 'content'"),
    (b'{"conversations": [{"content": ["a"]}]}\n',
     r":1: conversations\[0\]\.content must be a string, got an array"),
    (b'\n{"conversations": [{"content": "a"}]}\n{bad json}\n', r":3: invalid JSON"),
]


@pytest.mark.parametrize("content, message", BAD_PRETRAIN)
def test_bad_pretrain_lines_are_named(tmp_path, content, message):
    with pytest.raises(UserError, match=r"data\.jsonl" + message) as err:
        _read_all(tmp_path, content)
    assert "--skip_bad_lines" in str(err.value)


@pytest.mark.parametrize("content, message", BAD_SFT)
def test_bad_sft_lines_are_named(tmp_path, content, message):
    with pytest.raises(UserError, match=r"data\.jsonl" + message):
        _read_all(tmp_path, content, stage="sft")


def test_skip_bad_lines_counts_and_reports(tmp_path):
    content = b"".join(c for c, _ in BAD_PRETRAIN) + b'{"text": "last"}\n'
    skips = SkipReport("data.jsonl", max_examples=3)
    _, records = _read_all(tmp_path, content, skip_bad_lines=True, skips=skips)
    assert records == ["ok", "ok", "ok", "last"]
    assert skips.count == 6
    summary = skips.summary()
    assert summary.startswith("skipped 6 bad line(s) in data.jsonl")
    assert "... and 3 more" in summary and ":2: invalid JSON" in summary


def test_empty_and_blank_files(tmp_path):
    with pytest.raises(UserError, match=r"data\.jsonl: no samples \(the file is empty\)"):
        _read_all(tmp_path, b"")
    with pytest.raises(UserError, match=r"no samples \(its 3 line\(s\) are all blank\)"):
        _read_all(tmp_path, b"\n  \n\n")
    with pytest.raises(UserError, match=r"no valid samples \(all 2 non-blank lines were bad\)"):
        _read_all(tmp_path, b"{}\n[]\n", skip_bad_lines=True)


def test_missing_file_and_unknown_stage(tmp_path):
    with pytest.raises(UserError, match=r"nope\.jsonl: data file not found"):
        list(iter_jsonl_chunks(tmp_path / "nope.jsonl", "pretrain"))
    with pytest.raises(UserError, match="unknown sample format 'dpo'"):
        list(iter_jsonl_chunks(PRETRAIN_JSONL, "dpo"))


def test_bom_crlf_and_blank_lines_are_fine(tmp_path):
    content = '\ufeff{"text": "a"}\r\n\r\n{"text": "b"}'.encode()
    assert _read_all(tmp_path, content)[1] == ["a", "b"]


def test_chunks_cover_every_line(tmp_path):
    lines = [json.dumps({"text": f"t{i}"}) for i in range(500)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    chunks = list(iter_jsonl_chunks(path, "pretrain", chunk_bytes=100))
    assert len(chunks) > 10
    assert [r for c, _ in chunks for r in c] == [f"t{i}" for i in range(500)]
    assert sum(n for _, n in chunks) == path.stat().st_size
