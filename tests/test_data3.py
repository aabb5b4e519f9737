"""minimind-3 (upstream HEAD d65ef2c) samples, draws and orders against its goldens, bit for bit."""

import json

import numpy as np
import pytest

from minimind_jax.data import minimind3, torch_rng
from minimind_jax.data.batches import Loader
from minimind_jax.data.rows import open_source
from minimind_jax.data.tokenizer import load_tokenizer
from tests.helpers import MINIMIND3_TOKENIZER_DIR, PRETRAIN_JSONL, SFT_JSONL
from tests.spec_samples import SpecTokenizer, minimind3_pretrain_sample, minimind3_sft_sample


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(MINIMIND3_TOKENIZER_DIR)


@pytest.fixture(scope="module")
def spec_tok():
    return SpecTokenizer(MINIMIND3_TOKENIZER_DIR)


def _records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_system_prompts_and_markers(minimind3_golden, tok):
    golden_prompts = json.loads(str(minimind3_golden["sft_system_prompts_json"]))
    assert list(minimind3.SYSTEM_PROMPTS) == golden_prompts
    assert minimind3.sft_markers(tok) == ([1, 1388, 570, 811, 234], [2, 234])  # SPEC3 sec. 3


def test_spec_pretrain_samples_equal_golden(minimind3_golden, spec_tok):
    """tests/spec_samples' minimind-3 pretrain rule (what the package is checked against
    elsewhere) gives the reference's samples."""
    for i, record in enumerate(_records(PRETRAIN_JSONL)):
        ids, labels = minimind3_pretrain_sample(spec_tok, record["text"], 64)
        np.testing.assert_array_equal(ids, minimind3_golden["pre_input_ids"][i], err_msg=str(i))
        np.testing.assert_array_equal(labels, minimind3_golden["pre_labels"][i], err_msg=str(i))


def test_sft_draws_and_samples_in_index_order(minimind3_golden, tok, spec_tok):
    """`random.seed(42)`, items 0..39: the package's draws equal minimind-3's SFTDataset's, and
    tests/spec_samples' SFT rule with those draws gives its ids and labels."""
    records = _records(SFT_JSONL)
    slots = minimind3.sft_ids_batch(tok, [minimind3.sft_messages(r) for r in records], None)
    draws_system = np.array([len(slots[3 * i + 2]) > 0 for i in range(len(records))])
    has_think = np.array([len(slots[3 * i + 1]) > 0 for i in range(len(records))])
    system_idx, stripped = minimind3.draw_variants(draws_system, has_think,
                                                  np.arange(len(records)), 42)
    np.testing.assert_array_equal(system_idx, minimind3_golden["sft_system_idx"])
    np.testing.assert_array_equal(stripped, minimind3_golden["sft_think_stripped"])
    assert (system_idx >= 0).any() and (stripped == 0).any() and (stripped == 1).any()
    prompts = json.loads(str(minimind3_golden["sft_system_prompts_json"]))
    for i, record in enumerate(records):
        ids, labels = minimind3_sft_sample(spec_tok, record, 64,
                                           prompts[system_idx[i]] if system_idx[i] >= 0
                                           else None, bool(stripped[i]))
        np.testing.assert_array_equal(ids, minimind3_golden["sft_input_ids"][i], err_msg=str(i))
        np.testing.assert_array_equal(labels, minimind3_golden["sft_labels"][i], err_msg=str(i))


@pytest.mark.parametrize("n,seed,key", [(1000, 42, "order/randperm_1000_seed42"),
                                        (80, 42, "order/epoch0"), (80, 43, "order/epoch1"),
                                        (40, 42, "dense/sft_order")])
def test_randperm_without_torch(minimind3_golden, n, seed, key):
    np.testing.assert_array_equal(torch_rng.randperm(n, seed), minimind3_golden[key])


def test_randperm_equals_torch():
    torch = pytest.importorskip("torch")
    for n, seed in ((1, 0), (2, 5), (5000, 7), (70000, 123456789)):
        torch.manual_seed(seed)
        np.testing.assert_array_equal(torch.randperm(n).numpy(), torch_rng.randperm(n, seed))


def _batch_to_minimind3(batch):
    """Our full-row batch (ids, shifted targets + mask) back to minimind-3's (input_ids, labels).
    labels[:, 0] is never a target (the model shifts), so it comes back as -100."""
    ids = batch["input_ids"]
    labels = np.full(ids.shape, -100)
    labels[:, 1:] = np.where(batch["loss_mask"][:, :-1] > 0, batch["labels"][:, :-1], -100)
    assert not batch["loss_mask"][:, -1].any()
    return ids, labels


def test_sft_training_order_through_the_cache(minimind3_golden, tok, spec_tok, tmp_path):
    """The loader (token cache, torch order, per-epoch draws) gives the SFT samples minimind-3's
    trainer consumed, in its order; without randomness, the plain renders."""
    source = open_source(SFT_JSONL, tok, "sft", 64, cache_dir=tmp_path, rules="minimind3",
                         sft_seed=42)
    loader = Loader(source, 4, shuffle=True, seed=42, permutation="torch", prefetch=0)
    np.testing.assert_array_equal(loader.order(0), minimind3_golden["dense/sft_order"])
    got = [_batch_to_minimind3(b) for b in loader.epoch(0)]
    ids = np.concatenate([g[0] for g in got])
    labels = np.concatenate([g[1] for g in got])
    np.testing.assert_array_equal(ids, minimind3_golden["dense/sft_train_input_ids"])
    np.testing.assert_array_equal(labels, minimind3_golden["dense/sft_train_labels"])
    order = loader.order(0)
    system_idx, stripped = source.draws(0, order)
    golden = minimind3_golden
    np.testing.assert_array_equal(system_idx[order], golden["dense/sft_train_system_idx"])
    np.testing.assert_array_equal(stripped[order], golden["dense/sft_train_think_stripped"])

    plain = open_source(SFT_JSONL, tok, "sft", 64, cache_dir=tmp_path, rules="minimind3",
                        sft_random=False)
    first, _ = _batch_to_minimind3(plain.for_epoch(0, order).get_batch(np.arange(40)))
    for i, record in enumerate(_records(SFT_JSONL)):
        np.testing.assert_array_equal(first[i], minimind3_sft_sample(spec_tok, record, 64)[0])


def test_pretrain_through_the_cache(minimind3_golden, tok, tmp_path):
    source = open_source(PRETRAIN_JSONL, tok, "pretrain", 64, cache_dir=tmp_path,
                         rules="minimind3")
    ids, labels = _batch_to_minimind3(source.get_batch(np.arange(80)))
    np.testing.assert_array_equal(ids, minimind3_golden["pre_input_ids"])
    np.testing.assert_array_equal(labels[:, 1:], minimind3_golden["pre_labels"][:, 1:])


def test_tool_conversations_kept_whole_and_rendered_as_transformers(tok):
    """A tool-call conversation: no draws at all, rendered as transformers renders minimind-3's
    template (skips without transformers)."""
    transformers = pytest.importorskip("transformers")
    tools = json.dumps([{"type": "function", "function": {
        "name": "get_weather", "description": "天气 <now>",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        ensure_ascii=False)
    record = {"conversations": [
        {"role": "system", "content": "你是助手", "tools": tools},
        {"role": "user", "content": "北京天气？"},
        {"role": "assistant", "content": "",
         "tool_calls": json.dumps([{"name": "get_weather", "arguments": {"city": "北京"}}])},
        {"role": "tool", "content": "{\"temp\": 20}"},
        {"role": "assistant", "content": "<think>\n想一想\n</think>\n\n20度。"}]}
    messages = minimind3.sft_messages(record)
    assert not minimind3.draws_system_prompt(messages)
    hf = transformers.AutoTokenizer.from_pretrained(str(MINIMIND3_TOKENIZER_DIR))
    hf_messages = [dict(m) for m in messages]
    hf_messages[2]["tool_calls"] = json.loads(hf_messages[2]["tool_calls"])
    expected = hf.apply_chat_template(hf_messages, tokenize=False, tools=json.loads(tools))
    assert minimind3.render(tok, messages) == expected
    assert "<tool_call>" in expected and "# Tools" in expected
