"""Tokenizer backends: reference tokenizer.json and a trained sentencepiece model."""

import json
import shutil
from pathlib import Path

import pytest

from minimind_jax import cli
from minimind_jax.data.samples import sft_mask_markers
from minimind_jax.data.tokenizer import (
    beside_weights,
    load_tokenizer,
    locate_tokenizer,
    training_tokenizer_candidates,
)
from minimind_jax.data.tokenizer_cli import train_sentencepiece
from minimind_jax.errors import UserError
from tests.helpers import PRETRAIN_JSONL, TOKENIZER_DIR

ROUND_TRIP = [
    "line one\nline two\n\nafter a blank line",
    "\ttab\t\ttabs\t",
    "runs   of    spaces     and a trailing space ",
    "  leading spaces",
    "emoji 🙂🚀👍🏽 and flags 🇨🇳",
    "混合 mixed 文本 text，中文标点！English punctuation? 12345",
    "<s>special</s> <unk> markers in text",
    "",
]
DEFAULT_SYSTEM = "<s>system\n你是 MiniMind，是一个有用的人工智能助手。</s>\n"


@pytest.fixture(scope="module")
def hf():
    return load_tokenizer(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    texts = [json.loads(line)["text"] for line in PRETRAIN_JSONL.read_text().splitlines()]
    texts += ["The quick brown fox jumps over the lazy dog.", "hello world " * 5] * 20
    return train_sentencepiece(texts, tmp_path_factory.mktemp("sp"), vocab_size=2200,
                               character_coverage=0.98)


def test_reference_tokenizer_special_ids(hf):
    assert (hf.vocab_size, hf.pad_id, hf.bos_id, hf.eos_id) == (6400, 0, 1, 2)
    assert hf.encode("<s>") == [1] and hf.encode("</s>") == [2] and hf.encode("<unk>") == [0]
    assert sft_mask_markers(hf) == ([1, 1078, 538, 501], [2])  # SPEC "Samples"


def test_reference_tokenizer_no_automatic_specials_and_batch(hf):
    ids = hf.encode("hello")
    assert 1 not in ids and 2 not in ids
    assert hf.encode_batch(["hello", "<s>x</s>"]) == [ids, [1, *hf.encode("x"), 2]]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_reference_tokenizer_round_trip(hf, text):
    assert hf.decode(hf.encode(text)) == text


def test_chat_template_as_spec(hf):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert hf.apply_chat_template(messages) == (
        DEFAULT_SYSTEM + "<s>user\nhi</s>\n<s>assistant\nyo</s>\n")
    with_system = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    assert hf.apply_chat_template(with_system, add_generation_prompt=True) == (
        "<s>system\nS</s>\n<s>user\nq</s>\n<s>assistant\n")


def test_sentencepiece_ids_and_specials(sp_dir):
    tok = load_tokenizer(sp_dir)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (2200, 0, 1, 2)
    assert tok.encode("<s>") == [1] and tok.encode("</s>") == [2] and tok.encode("<unk>") == [0]
    ids = tok.encode("a<s>b</s>")
    assert ids == [*tok.encode("a"), 1, *tok.encode("b"), 2]
    assert tok.decode(ids, skip_special_tokens=True) == "ab"
    assert tok.encode_batch(["a<s>b</s>", "plain"]) == [ids, tok.encode("plain")]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_sentencepiece_round_trip(sp_dir, text):
    tok = load_tokenizer(sp_dir / "tokenizer.model")  # the .model file itself also loads
    assert tok.decode(tok.encode(text)) == text


def test_sentencepiece_folder_has_minimind_template(sp_dir, hf):
    tok = load_tokenizer(sp_dir)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tok.apply_chat_template(messages) == hf.apply_chat_template(messages)
    start, end = sft_mask_markers(tok)
    assert start[0] == 1 and end == [2]


def test_fingerprint_tracks_files(sp_dir, hf):
    assert load_tokenizer(TOKENIZER_DIR).fingerprint == hf.fingerprint
    assert load_tokenizer(sp_dir).fingerprint != hf.fingerprint


def test_tokenizer_command(tmp_path, capsys):
    out = tmp_path / "tok"
    assert cli.main(["tokenizer", "--data_path", str(PRETRAIN_JSONL), "--vocab_size", "2000",
                     "--character_coverage", "0.98", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "round trip ok" in printed and "vocab 2000" in printed
    assert load_tokenizer(out).vocab_size == 2000


def test_tokenizer_command_too_small_vocab(tmp_path, capsys):
    code = cli.main(["tokenizer", "--data_path", str(PRETRAIN_JSONL), "--vocab_size", "300",
                     "--out", str(tmp_path / "tok")])
    assert code == 2
    assert "sentencepiece training failed" in capsys.readouterr().err


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(UserError, match=r"no tokenizer\.json or sentencepiece \.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match=r"tokenizer\.json: cannot load tokenizer"):
        load_tokenizer(tmp_path)


def test_locate_tokenizer(tmp_path):
    run = tmp_path / "out" / "full_sft_64"
    step = run / "checkpoints" / "4"
    step.mkdir(parents=True)
    (run / "tokenizer").mkdir()
    with pytest.raises(UserError) as err:  # an empty tokenizer/ is no tokenizer
        locate_tokenizer(None, beside_weights(step), what="the checkpoint x")
    assert str(err.value).startswith("no tokenizer for the checkpoint x: pass --tokenizer DIR")
    assert str(err.value).endswith(", ".join(str(c) for c in beside_weights(step)))
    (run / "tokenizer" / "tokenizer.model").write_bytes(b"")
    assert beside_weights(step)[:3] == [step / "tokenizer", step, run / "checkpoints" / "tokenizer"]
    assert locate_tokenizer(None, beside_weights(step), what="x") == run / "tokenizer"
    assert locate_tokenizer(None, beside_weights(run), what="x") == run / "tokenizer"
    assert locate_tokenizer(str(tmp_path), [run / "tokenizer"], what="x") == tmp_path
    shutil.copy(TOKENIZER_DIR / "tokenizer.json", tmp_path / "out")
    weights = tmp_path / "out" / "w.npz"  # a weights file: its own folder
    assert locate_tokenizer(None, beside_weights(weights), what="x") == tmp_path / "out"


def test_training_tokenizer_candidates(tmp_path):
    from minimind_jax.model.generation import MINIMIND2, MINIMIND3

    assert training_tokenizer_candidates(MINIMIND2) == [Path("model/minimind_tokenizer")]
    assert training_tokenizer_candidates(MINIMIND3, run_dir=tmp_path / "a",
                                         start_dir=tmp_path / "b") == [
        tmp_path / "a" / "tokenizer", tmp_path / "b" / "tokenizer", Path("model"),
        Path("../model")]


@pytest.mark.parametrize("backend", ["hf", "sentencepiece", "minimind3"])
def test_incremental_decoder_releases_what_a_whole_decode_gives(backend, hf, sp_dir):
    """The server's streaming decoder decodes a short window per token; at every token it
    gives the whole list's text, or None exactly when that text ends in an incomplete
    character. Round-trip texts and random ids (multi-byte characters split across tokens,
    stray specials) with each backend."""
    import numpy as np

    from minimind_jax.serve.choices import IncrementalDecoder
    from tests.helpers import MINIMIND3_TOKENIZER_DIR

    tokenizer = {"hf": lambda: hf, "sentencepiece": lambda: load_tokenizer(sp_dir),
                 "minimind3": lambda: load_tokenizer(MINIMIND3_TOKENIZER_DIR)}[backend]()
    rng = np.random.default_rng(0)
    lists = [tokenizer.encode(text) for text in ROUND_TRIP]
    lists += [rng.integers(0, tokenizer.vocab_size, 40).tolist() for _ in range(20)]
    for tokens in lists:
        decoder = IncrementalDecoder(tokenizer)
        for token in tokens:
            released = decoder.push(int(token))
            whole = decoder.text()
            assert released == (None if whole.endswith("\ufffd") else whole)
