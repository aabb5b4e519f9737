"""Loader: order, resume, shards, padding; packing; no NaN without supervised tokens."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimind_jax.data import packing
from minimind_jax.data.batches import Loader
from minimind_jax.data.rows import open_source
from minimind_jax.data.tokenizer import load_tokenizer
from minimind_jax.errors import UserError
from minimind_jax.model.config import arch_defaults
from minimind_jax.model.loss import masked_cross_entropy
from minimind_jax.model.transformer import MiniMind, init_params
from tests.helpers import MINIMIND3_TOKENIZER_DIR, SFT_JSONL, TINY_SHAPE, TOKENIZER_DIR
from tests.helpers import TINY_CONFIG as TINY


class ArraySource:
    """In-memory rows (a source as `data.rows` defines one): a dict of [N, T] arrays."""

    def __init__(self, arrays):
        self.arrays = {k: np.asarray(v, np.float32 if k == "loss_mask" else np.int32)
                       for k, v in arrays.items()}

    def __len__(self) -> int:
        return len(self.arrays["input_ids"])

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[indices] for k, v in self.arrays.items()}


def numbered_source(n=103, t=4):
    """Row i holds i in every input position, so batches say which rows they carry."""
    ids = np.repeat(np.arange(n)[:, None], t, axis=1)
    return ArraySource({"input_ids": ids, "labels": ids + 1, "loss_mask": np.ones((n, t))})


def rows_of(batch):
    real = batch["loss_mask"].sum(axis=1) > 0
    return batch["input_ids"][real, 0].tolist()


def epoch_rows(loader, epoch, start=0):
    return [rows_of(b) for b in loader.epoch(epoch, start)]


def test_golden_rows_in_file_order(golden):
    source = ArraySource({"input_ids": golden["pre_X"], "labels": golden["pre_Y"],
                          "loss_mask": golden["pre_mask"]})
    loader = Loader(source, 32, shuffle=False)
    batches = list(loader.epoch(0))
    assert loader.batches_per_epoch == 3 and [len(b["input_ids"]) for b in batches] == [32, 32, 16]
    np.testing.assert_array_equal(np.concatenate([b["labels"] for b in batches]), golden["pre_Y"])
    assert batches[0]["input_ids"].dtype == np.int32
    assert batches[0]["loss_mask"].dtype == np.float32


def test_each_sample_once_per_epoch_and_seeded():
    loader = Loader(numbered_source(), 10, seed=7)
    orders = [sum(epoch_rows(loader, e), []) for e in range(3)]
    for order in orders:
        assert sorted(order) == list(range(103))
    assert orders[0] != orders[1] != orders[2]
    assert sum(epoch_rows(Loader(numbered_source(), 10, seed=7), 1), []) == orders[1]
    assert sum(epoch_rows(Loader(numbered_source(), 10, seed=8), 1), []) != orders[1]
    assert sum(epoch_rows(Loader(numbered_source(), 10, shuffle=False), 0), []) == list(range(103))


@pytest.mark.parametrize("start", [0, 1, 5, 10, 11])
def test_resume_yields_the_remaining_batches(start):
    loader = Loader(numbered_source(), 10, seed=3)
    full = list(loader.epoch(2))
    resumed = list(Loader(numbered_source(), 10, seed=3).epoch(2, start_batch=start))
    assert len(resumed) == len(full) - start
    for a, b in zip(resumed, full[start:], strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("pad_to_multiple", [1, 4])
def test_two_shards_partition_each_batch(pad_to_multiple):
    whole = Loader(numbered_source(), 10, seed=5)
    shards = [Loader(numbered_source(), 10, seed=5, num_shards=2, shard_index=i,
                     pad_to_multiple=pad_to_multiple) for i in range(2)]
    for global_batch, *parts in zip(whole.epoch(4), *(s.epoch(4) for s in shards), strict=True):
        assert len({len(p["input_ids"]) for p in parts}) == 1  # same shape on every process
        for part in parts:
            assert len(part["input_ids"]) % pad_to_multiple == 0
        assert rows_of(parts[0]) + rows_of(parts[1]) == rows_of(global_batch)


def test_padding_rows_do_not_change_the_loss():
    rng = np.random.default_rng(0)
    source = numbered_source(n=5, t=6)
    source.arrays["loss_mask"] = (rng.random((5, 6)) > 0.3).astype(np.float32)
    plain = list(Loader(source, 4, shuffle=False).epoch(0))[-1]
    padded = list(Loader(source, 4, shuffle=False, pad_to_multiple=4).epoch(0))[-1]
    assert len(plain["input_ids"]) == 1 and len(padded["input_ids"]) == 4
    assert not padded["loss_mask"][1:].any()
    logits = rng.normal(size=(4, 6, 8)).astype(np.float32)
    logits[1:] = np.nan  # whatever the model does on padding rows must not leak in
    labels = padded["labels"] % 8
    loss_plain = masked_cross_entropy(logits[:1], labels[:1], plain["loss_mask"])
    loss_padded = masked_cross_entropy(logits, labels, padded["loss_mask"])
    assert float(loss_plain) == pytest.approx(float(loss_padded), rel=1e-6)


def test_prefetch_does_not_change_batches():
    a = list(Loader(numbered_source(), 8, seed=1, prefetch=0).epoch(0))
    b = list(Loader(numbered_source(), 8, seed=1, prefetch=4, num_threads=2).epoch(0))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])


def test_loader_argument_errors():
    source = numbered_source()
    with pytest.raises(UserError, match="batch_size 10 must divide by the number of processes 3"):
        Loader(source, 10, num_shards=3)
    with pytest.raises(UserError, match=r"shard_index 2 is not in \[0, 2\)"):
        Loader(source, 10, num_shards=2, shard_index=2)
    with pytest.raises(UserError, match="start batch 12 is outside epoch of 11 batches"):
        Loader(source, 10).epoch(0, start_batch=12)


# --- packing -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_docs(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = ["春", "風", "花", "月", "夜", "the", " cat", " sat", "。", "，", "\n"]
    texts = ["".join(rng.choice(words, rng.integers(1, 30))) for _ in range(60)]
    texts.append("長" * 200)  # truncated to max_seq_len, fills a row alone
    path = tmp_path_factory.mktemp("docs") / "short.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    return path


def test_next_fit_rows_in_file_order():
    order, starts = packing.next_fit(np.array([3, 4, 2, 5, 1]), 7)
    np.testing.assert_array_equal(order, np.arange(5))
    np.testing.assert_array_equal(starts, [0, 2, 4, 5])


def test_best_fit_takes_the_tightest_row():
    # Longest first: 5 opens row A (2 free), 4 opens B (3 free), 3 fills B, 2 fills A, 1 opens C.
    order, starts = packing.best_fit(np.array([3, 4, 2, 5, 1]), 7)
    rows = [order[a:b].tolist() for a, b in zip(starts[:-1], starts[1:], strict=True)]
    assert rows == [[0, 1], [2, 3], [4]]


def test_best_fit_fills_short_documents_without_splitting_them():
    lengths = np.random.default_rng(0).integers(3, 230, 5000)
    order, starts = packing.best_fit(lengths, 512, window=1000)
    assert sorted(order.tolist()) == list(range(len(lengths)))  # every document once, whole
    row_tokens = np.add.reduceat(lengths[order], starts[:-1])
    assert row_tokens.max() <= 512
    assert packing.fill_fraction(lengths, starts, 512) >= 0.99
    assert packing.fill_fraction(lengths, packing.next_fit(lengths, 512)[1], 512) < 0.9
    again = packing.best_fit(lengths.copy(), 512, window=1000)  # a pure function of the lengths
    np.testing.assert_array_equal(again[0], order)
    np.testing.assert_array_equal(again[1], starts)


# packable case -> (stage, data file, max_seq_len, tokenizer, sample rules)
PACKABLE = {"pretrain": ("pretrain", None, 64, TOKENIZER_DIR, "minimind2"),
            "sft": ("sft", SFT_JSONL, 256, TOKENIZER_DIR, "minimind2"),
            "minimind3_sft": ("sft", SFT_JSONL, 256, MINIMIND3_TOKENIZER_DIR, "minimind3")}
# The most packed rows per unpacked one over the windows tested, just above what was measured:
# pretrain 23 of 61 (window 7), sft 18 of 40, minimind-3's 20 of 40 (packed by each
# conversation's longest variant, so looser)
MOST_PACKED_ROWS = {"pretrain": 0.4, "sft": 0.46, "minimind3_sft": 0.5}


@pytest.fixture(params=list(PACKABLE))
def packable(request, short_docs, tmp_path_factory):
    """(open(pack=..., pack_window=...) -> a source, the model, the case's most packed rows
    per unpacked row, MOST_PACKED_ROWS): pretrain documents (short
    ones, one truncated), or the fixture's SFT conversations at 256 tokens (some truncated),
    each of which keeps its own loss mask (the assistant replies) when packed; MiniMind2's or
    minimind-3's (its epoch's random variants, fed as whole rows)."""
    stage, path, max_seq_len, tokenizer, rules = PACKABLE[request.param]
    cache = tmp_path_factory.mktemp("cache")

    def open_it(**pack):
        return open_source(path or short_docs, tokenizer, stage, max_seq_len, cache_dir=cache,
                           log=lambda m: None, rules=rules, **pack)

    model = (TINY if rules == "minimind2" else
             arch_defaults("minimind3").replace(**TINY_SHAPE, dtype="float32"))
    return open_it, model.replace(max_seq_len=max_seq_len), MOST_PACKED_ROWS[request.param]


def unpacked_view(unpacked, packed):
    """The unpacked rows as the packed ones see their samples: minimind-3's variants drawn
    over the conversations in the order epoch 0's rows (in row order) hold them."""
    for_epoch = getattr(unpacked, "for_epoch", None)
    return for_epoch(0, packed.doc_order) if for_epoch else unpacked


@pytest.mark.parametrize("window", [packing.DEFAULT_WINDOW, 7, 0])
def test_packed_rows_keep_every_document_target(packable, window):
    open_it, _, most_rows = packable
    unpacked = open_it()
    packed = open_it(pack=True, pack_window=window)
    assert len(packed) <= most_rows * len(unpacked), (len(packed), len(unpacked))
    assert packed.padding_fraction < unpacked.padding_fraction / 3
    rows = packed.get_batch(np.arange(len(packed)))
    docs = unpacked_view(unpacked, packed).get_batch(np.arange(len(unpacked)))
    # Walk the packed rows document by document: positions restart at 0, segment ids count
    # 1, 2, ... within a row, and the supervised (input, label) pairs are the document's own.
    seen = []
    for r in range(len(packed)):
        seg, pos = rows["segment_ids"][r], rows["positions"][r]
        for s, doc in enumerate(packed.documents(r), start=1):
            where = np.flatnonzero(seg == s)
            np.testing.assert_array_equal(pos[where], np.arange(len(where)))
            n = len(where)
            np.testing.assert_array_equal(rows["input_ids"][r, where], docs["input_ids"][doc, :n])
            mask = rows["loss_mask"][r, where]
            np.testing.assert_array_equal(mask, docs["loss_mask"][doc, :n])
            np.testing.assert_array_equal(rows["labels"][r, where][mask > 0],
                                          docs["labels"][doc, :n][mask > 0])
            seen.append(doc)
        assert seg.max() == len(packed.documents(r))
        assert not rows["loss_mask"][r, seg == 0].any()
    assert sorted(seen) == list(range(len(unpacked)))
    assert rows["loss_mask"].sum() == docs["loss_mask"].sum() > 0


def test_packed_logits_equal_unpacked(packable):
    """Attention does not cross documents (conversations): each one's logits in the packed row
    with the most of them are its unpacked row's."""
    open_it, config, _ = packable
    packed, unpacked = open_it(pack=True), open_it()
    busiest = max(range(len(packed)), key=lambda r: len(packed.documents(r)))
    row = packed.get_batch(np.array([busiest]))
    n_docs = int(row["segment_ids"].max())
    assert n_docs >= 3
    docs = unpacked_view(unpacked, packed).get_batch(packed.documents(busiest))
    model, params = MiniMind(config), init_params(config, 0)
    packed_logits, _ = model.apply({"params": params}, jnp.asarray(row["input_ids"]),
                                   positions=jnp.asarray(row["positions"]),
                                   segment_ids=jnp.asarray(row["segment_ids"]))
    doc_logits, _ = model.apply({"params": params}, jnp.asarray(docs["input_ids"]))
    for s in range(1, n_docs + 1):
        where = np.flatnonzero(row["segment_ids"][0] == s)
        np.testing.assert_allclose(packed_logits[0, where], doc_logits[s - 1, :len(where)],
                                   atol=1e-5)


def test_no_supervised_token_gives_no_nan(tmp_path):
    # Replies truncated away (long user turns) -> an all-zero loss mask, padded rows included.
    path = tmp_path / "sft.jsonl"
    turns = [{"role": "user", "content": "很" * 300}, {"role": "assistant", "content": "好"}]
    path.write_text(json.dumps({"conversations": turns}, ensure_ascii=False) + "\n")
    source = open_source(path, load_tokenizer(TOKENIZER_DIR), "sft", 64, log=lambda m: None)
    batch = next(Loader(source, 1, pad_to_multiple=2).epoch(0))
    assert batch["loss_mask"].sum() == 0
    params = init_params(TINY, 0)

    def loss_fn(p):
        logits, _ = MiniMind(TINY).apply({"params": p}, jnp.asarray(batch["input_ids"]))
        return masked_cross_entropy(logits, batch["labels"], batch["loss_mask"])

    loss, grads = jax.value_and_grad(loss_fn)(params)
    assert float(loss) == 0.0
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_packed_padding_rows_keep_gradients_finite(short_docs):
    # A partial last batch padded with all-zero rows (segment 0 everywhere) on packed data.
    packed = open_source(short_docs, TOKENIZER_DIR, "pretrain", 64, pack=True,
                         log=lambda m: None)
    loader = Loader(packed, 4, shuffle=False, pad_to_multiple=4)
    batch = list(loader.epoch(0, start_batch=loader.batches_per_epoch - 1))[0]
    assert len(packed) % 4 and not batch["segment_ids"][-1].any()
    params = init_params(TINY, 0)

    def loss_fn(p):
        logits, _ = MiniMind(TINY).apply({"params": p}, jnp.asarray(batch["input_ids"]),
                                         positions=jnp.asarray(batch["positions"]),
                                         segment_ids=jnp.asarray(batch["segment_ids"]))
        return masked_cross_entropy(logits, batch["labels"], batch["loss_mask"])

    loss, grads = jax.value_and_grad(loss_fn)(params)
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_pack_is_pretrain_or_sft_only(short_docs):
    with pytest.raises(UserError, match="--pack works with pretrain or SFT samples only"):
        open_source(short_docs, TOKENIZER_DIR, "pairs", 64, pack=True)
    with pytest.raises(UserError, match="--pack works with MiniMind2's pretrain samples only"):
        open_source(short_docs, TOKENIZER_DIR, "pretrain", 64, pack=True, rules="minimind3")
    with pytest.raises(UserError, match="--pack_window must be 0"):
        open_source(short_docs, TOKENIZER_DIR, "pretrain", 64, pack=True, pack_window=-1,
                    log=lambda m: None)


def test_packed_epochs_resume_and_shard_alike(short_docs):
    # Two processes each build their own packing from the same cache: together they must give
    # one process's batches, and a resumed epoch must continue exactly where it stopped.
    def packed():
        return open_source(short_docs, TOKENIZER_DIR, "pretrain", 64, pack=True, pack_window=16,
                           log=lambda m: None)

    whole = list(Loader(packed(), 4, seed=3).epoch(1))
    halves = [list(Loader(packed(), 4, seed=3, num_shards=2, shard_index=i).epoch(1))
              for i in range(2)]
    resumed = list(Loader(packed(), 4, seed=3).epoch(1, start_batch=2))
    for k, batch in enumerate(whole):
        for key, value in batch.items():
            np.testing.assert_array_equal(
                value, np.concatenate([halves[0][k][key], halves[1][k][key]]))
            if k >= 2:
                np.testing.assert_array_equal(value, resumed[k - 2][key])
