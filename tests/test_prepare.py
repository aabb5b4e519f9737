"""Token cache: golden samples through the cache, reuse, keys, atomic writes, the CLI."""

import json
import os
import shutil

import numpy as np
import pytest

from minimind_jax import cli
from minimind_jax.data.rows import open_source
from minimind_jax.data.token_cache import CACHE_DIRNAME, prepare_token_cache
from minimind_jax.data.tokenizer import load_tokenizer
from minimind_jax.data.tokenizer_cli import train_sentencepiece
from minimind_jax.errors import UserError
from tests.helpers import PRETRAIN_JSONL, SFT_JSONL, TOKENIZER_DIR
from tests.spec_samples import SpecTokenizer, minimind2_sft_sample


@pytest.fixture
def data(tmp_path):
    for src in (PRETRAIN_JSONL, SFT_JSONL):
        shutil.copy(src, tmp_path / src.name)
    return tmp_path


@pytest.fixture
def tok():
    return load_tokenizer(TOKENIZER_DIR)


def _entries(folder):
    return sorted(p.name for p in (folder / CACHE_DIRNAME).iterdir())


@pytest.mark.parametrize("stage, prefix", [("pretrain", "pre"), ("sft", "sft")])
def test_cache_path_gives_golden_samples(data, tok, golden, stage, prefix):
    source = open_source(data / f"{stage}.jsonl", tok, stage, 64, log=lambda m: None)
    assert len(source) == len(golden[f"{prefix}_X"])
    batch = source.get_batch(np.arange(len(source)))
    np.testing.assert_array_equal(batch["input_ids"], golden[f"{prefix}_X"])
    np.testing.assert_array_equal(batch["labels"], golden[f"{prefix}_Y"])
    np.testing.assert_array_equal(batch["loss_mask"], golden[f"{prefix}_mask"])
    assert batch["input_ids"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
    # The cache lives next to the data file, as memory-mapped uint16 ids + int64 offsets.
    assert source.cache.path.parent == data / CACHE_DIRNAME
    assert isinstance(source.cache.ids, np.memmap) and source.cache.ids.dtype == np.uint16
    assert source.cache.offsets.dtype == np.int64


def test_second_run_reuses_without_tokenizing(data, tok):
    messages = []
    first = prepare_token_cache(data / "sft.jsonl", tok, "sft", 64, log=messages.append)
    assert messages[0].startswith("prepared 40 sft samples")

    def refuse(texts):
        raise AssertionError("tokenized again")

    tok._encode_batch = refuse
    second = prepare_token_cache(data / "sft.jsonl", tok, "sft", 64, log=messages.append)
    assert messages[1] == f"token cache: reusing {first.path}"
    assert second.path == first.path
    np.testing.assert_array_equal(second.ids, first.ids)


def test_key_follows_data_tokenizer_and_length(data, tok, tmp_path):
    quiet = {"log": lambda m: None}
    path = data / "pretrain.jsonl"
    base = prepare_token_cache(path, tok, "pretrain", 64, **quiet).path
    assert prepare_token_cache(path, tok, "pretrain", 32, **quiet).path != base
    sp = load_tokenizer(train_sentencepiece(
        [json.loads(line)["text"] for line in path.read_text().splitlines()],
        tmp_path / "sp", vocab_size=2200, character_coverage=0.98))
    assert prepare_token_cache(path, sp, "pretrain", 64, **quiet).path != base
    # Same size and mtime, one character changed: the content hash still tells them apart.
    stat = path.stat()
    content = path.read_text(encoding="utf-8")
    path.write_text(content.replace("張九齡", "張九令", 1), encoding="utf-8")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    changed = prepare_token_cache(path, tok, "pretrain", 64, **quiet)
    assert changed.path != base
    assert len(_entries(data)) == 4


def test_small_chunks_give_the_same_cache(data, tok, tmp_path):
    quiet = {"log": lambda m: None}
    whole = prepare_token_cache(data / "sft.jsonl", tok, "sft", 64, **quiet)
    chunked = prepare_token_cache(data / "sft.jsonl", tok, "sft", 64, cache_dir=tmp_path / "c",
                                  chunk_bytes=300, **quiet)
    np.testing.assert_array_equal(chunked.ids, whole.ids)
    np.testing.assert_array_equal(chunked.offsets, whole.offsets)


def test_crash_leaves_no_cache(data, tok):
    calls = []
    encode = tok._encode_batch

    def fail_on_third_chunk(texts):
        calls.append(len(texts))
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return encode(texts)

    tok._encode_batch = fail_on_third_chunk
    stale = data / CACHE_DIRNAME / ".tmp-old-entry-999999999"  # a dead process's leftovers
    stale.mkdir(parents=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_token_cache(data / "pretrain.jsonl", tok, "pretrain", 64, chunk_bytes=500,
                            log=lambda m: None)
    assert _entries(data) == []
    tok._encode_batch = encode
    prepare_token_cache(data / "pretrain.jsonl", tok, "pretrain", 64, log=lambda m: None)
    assert len(_entries(data)) == 1 and not _entries(data)[0].startswith(".tmp")


def test_sentencepiece_cache_matches_samples(data, tmp_path):
    folder = train_sentencepiece(
        [json.loads(line)["text"] for line in PRETRAIN_JSONL.read_text().splitlines()],
        tmp_path / "sp", vocab_size=2200, character_coverage=0.98)
    sp, spec_sp = load_tokenizer(folder), SpecTokenizer(folder)  # the package's; the spec's
    # Longer rows: this small vocabulary spends many tokens on the system prompt.
    source = open_source(data / "sft.jsonl", sp, "sft", 256, log=lambda m: None)
    batch = source.get_batch(np.arange(len(source)))
    for i, line in enumerate(SFT_JSONL.read_text().splitlines()):
        x, y, mask = minimind2_sft_sample(spec_sp, json.loads(line)["conversations"], 256)
        np.testing.assert_array_equal(batch["input_ids"][i], x)
        np.testing.assert_array_equal(batch["loss_mask"][i], mask)
    assert batch["loss_mask"].sum() > 0


def test_prepare_command(data, capsys):
    argv = ["prepare", "--data_path", str(data / "pretrain.jsonl"), "--tokenizer",
            str(TOKENIZER_DIR), "--stage", "pretrain", "--max_seq_len", "64", "--pack"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "prepared 80 pretrain samples, 4,742 tokens (71 truncated to 64)" in out
    assert "padding fraction at max_seq_len 64: 0.0738" in out
    assert "packed: padding fraction" in out
    assert cli.main(argv) == 0
    assert "token cache: reusing" in capsys.readouterr().out


def test_prepare_command_bad_input(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "fine"\n{"text": 3}\n{"text": "also fine"}\n')
    argv = ["prepare", "--data_path", str(path), "--tokenizer", str(TOKENIZER_DIR),
            "--stage", "pretrain", "--max_seq_len", "64"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:2: invalid JSON: Expecting ',' delimiter")
    assert cli.main(argv + ["--skip_bad_lines"]) == 0
    out = capsys.readouterr().out
    assert "prepared 2 pretrain samples" in out and "skipped 2 bad line(s)" in out
    assert f"{path}:3: field 'text' must be a string, got a number" in out
    assert cli.main(argv + ["--pack", "--arch", "minimind3"]) == 2
    assert "--pack works with MiniMind2's pretrain samples only" in capsys.readouterr().err


def test_prepare_rejects_missing_file_and_tiny_length(tmp_path, tok):
    with pytest.raises(UserError, match=r"nope\.jsonl: data file not found"):
        prepare_token_cache(tmp_path / "nope.jsonl", tok, "pretrain", 64)
    with pytest.raises(UserError, match="max_seq_len must be at least 2"):
        prepare_token_cache(PRETRAIN_JSONL, tok, "pretrain", 1)
