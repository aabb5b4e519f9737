"""Length buckets (data.batches): a batch cut to its bucket width, or its rows packed into fewer
rows, gives the full-width batch's loss (DPO pairs, SFT rows, distillation, distill_reason's
tag-weighted loss; tiny model), and an epoch feeds no more shapes than buckets; the RL stages (a
batch producer) are never cut."""

import jax
import numpy as np
import pytest

from minimind_jax.data.batches import (
    Loader,
    bucket_width,
    bucket_widths,
    pack_batch,
    row_buckets,
    row_extents,
    supervised_extent,
)
from minimind_jax.data.pairs import PairSource
from minimind_jax.data.rows import open_source
from minimind_jax.data.tokenizer import load_tokenizer
from minimind_jax.errors import UserError
from minimind_jax.model.loss import masked_cross_entropy
from minimind_jax.model.transformer import MiniMind, init_params
from minimind_jax.train.setup import batch_packing, length_buckets
from minimind_jax.train.stages import Objective, distill_reason, named
from minimind_jax.train.stages.distill import distill_loss_fn
from minimind_jax.train.stages.dpo import dpo_loss_fn
from minimind_jax.train.train_config import DataConfig
from tests.helpers import (
    FIXTURES,
    SFT_JSONL,
    TINY_CONFIG,
    TINY_FLAGS,
    TOKENIZER_DIR,
    metrics,
    run_command,
)

WIDTH = 256
CONFIG = TINY_CONFIG.replace(max_seq_len=WIDTH)


def test_bucket_widths():
    assert bucket_widths(511, 4) == [64, 128, 256, 511]
    assert bucket_widths(340, 4) == [48, 96, 176, 340]
    assert bucket_widths(8, 4) == [8]
    assert bucket_width(511, 4, 0) == 64 and bucket_width(511, 4, 129) == 256
    mask = np.zeros((2, 2, 10))
    mask[1, 0, 6] = 1
    assert supervised_extent(mask) == 7 and supervised_extent(mask[:1]) == 0


def _epochs(source, buckets: int, loss_columns=None, packing: bool = False):
    """(full-width batches, cut or packed batches) of one epoch, batch 4, the same order."""
    def loader(n):
        return Loader(source, 4, seed=3, prefetch=0, length_buckets=n,
                      loss_columns=loss_columns, batch_packing=packing)
    return list(loader(0).epoch(0)), list(loader(buckets).epoch(0))


def test_pack_batch_layout():
    """Two pairs and a padding pair: each row whole up to its last supervised column, its
    positions from 0, its own segment; the row count one of the buckets."""
    ids = np.zeros((3, 2, 10), np.int32)
    mask = np.zeros((3, 2, 10), np.float32)
    for pair, lengths in enumerate([(4, 8), (6, 3)]):
        for side, n in enumerate(lengths):
            ids[pair, side, :n + 2] = np.arange(1, n + 3)  # two trailing unsupervised tokens
            mask[pair, side, 1:n] = 1
    assert row_extents(mask > 0).tolist() == [[4, 8], [6, 3], [0, 0]]
    assert row_buckets(6, 4) == [2, 3, 5, 6] and row_buckets(8, 4, 2) == [2, 4, 6, 8]
    packed = pack_batch({"input_ids": ids, "labels": ids + 100, "loss_mask": mask},
                        row_extents(mask > 0), 4)
    assert packed["input_ids"].shape == (3, 10)  # 21 tokens, 3 rows: a bucket (of 2/3/5/6)
    rows = packed["row_index"]
    for i in range(4):  # each real row once, its tokens in order from its position 0
        at = rows == i
        n = int(row_extents(mask > 0).ravel()[i])
        assert at.sum() == n and len(set(packed["segment_ids"][at])) == 1
        np.testing.assert_array_equal(packed["positions"][at], np.arange(n))
        np.testing.assert_array_equal(packed["input_ids"][at], ids.reshape(6, 10)[i, :n])
        np.testing.assert_array_equal(packed["labels"][at], ids.reshape(6, 10)[i, :n] + 100)
        np.testing.assert_array_equal(packed["loss_mask"][at], mask.reshape(6, 10)[i, :n])
    free = rows == 6
    assert not packed["loss_mask"][free].any() and not packed["segment_ids"][free].any()
    assert packed["row_real"].tolist() == [[True, True], [True, True], [False, False]]


def _check_packed(full, packed, buckets: int) -> None:
    counts = {b["input_ids"].shape[0] for b in packed}
    assert len(counts) <= buckets and min(counts) < full[0]["input_ids"][..., 0].size
    for f, p in zip(full, packed, strict=True):
        assert f["loss_mask"].sum() == p["loss_mask"].sum()
        assert p["row_real"].shape == f["input_ids"].shape[:-1]


def _check_cut(full, cut, buckets: int) -> None:
    widths = {b["input_ids"].shape[-1] for b in cut}
    assert len(widths) <= buckets and min(widths) < WIDTH - 1  # some padding was cut
    for f, c in zip(full, cut, strict=True):
        width = c["input_ids"].shape[-1]
        assert not f["loss_mask"][..., width:].any()  # only unsupervised columns were cut
        for key in f:
            np.testing.assert_array_equal(f[key][..., :width], c[key])


@pytest.mark.parametrize("packing", [False, True], ids=["cut", "packed"])
@pytest.mark.parametrize("average", [True, False])
def test_dpo_loss_same_when_cut(average, packing):
    source = PairSource(FIXTURES / "post" / "dpo_pairs.jsonl", load_tokenizer(TOKENIZER_DIR),
                        WIDTH, log=lambda m: None)
    full, cut = _epochs(source, 4, packing=packing)
    (_check_packed if packing else _check_cut)(full, cut, 4)
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    reference = init_params(CONFIG, jax.random.PRNGKey(1))
    loss = jax.jit(dpo_loss_fn(CONFIG, 0.1, average=average, with_aux=False))
    for f, c in zip(full, cut, strict=True):
        (want, want_terms), (got, got_terms) = loss(params, f, reference), loss(params, c,
                                                                                 reference)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        for key in want_terms:  # the rewards rebuilt per pair, in pair order
            np.testing.assert_allclose(got_terms[key], want_terms[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("packing", [False, True], ids=["cut", "packed"])
def test_sft_loss_same_when_cut(tmp_path, packing):
    source = open_source(SFT_JSONL, TOKENIZER_DIR, "sft", WIDTH, cache_dir=tmp_path,
                         log=lambda m: None)
    full, cut = _epochs(source, 3, packing=packing)
    (_check_packed if packing else _check_cut)(full, cut, 3)
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    model = MiniMind(CONFIG)

    @jax.jit
    def loss(batch):
        logits, _ = model.apply({"params": params}, batch["input_ids"],
                                positions=batch.get("positions"),
                                segment_ids=batch.get("segment_ids"))
        return masked_cross_entropy(logits, batch["labels"], batch["loss_mask"])

    # packed: measured up to 1.1e-7 relative
    tolerance = dict(rtol=3.2e-7, atol=0) if packing else dict(rtol=1e-5, atol=1e-6)
    for f, c in zip(full, cut, strict=True):
        np.testing.assert_allclose(loss(c), loss(f), **tolerance)


@pytest.mark.parametrize("generation", ["minimind2", "minimind3"])
def test_distill_loss_same_when_packed(tmp_path, generation):
    """Student and teacher (another shape) read the packed rows; CE and KL per position."""
    source = open_source(SFT_JSONL, TOKENIZER_DIR, "sft", WIDTH, cache_dir=tmp_path,
                         log=lambda m: None)
    full, packed = _epochs(source, 4, packing=True)
    _check_packed(full, packed, 4)
    teacher = CONFIG.replace(dim=CONFIG.dim * 2)
    rules = ({"alpha": 0.0, "temperature": 1.0, "ce_ignores_pad": True}
             if generation == "minimind2" else {"alpha": 0.5, "temperature": 1.5,
                                                "ce_eps": 1e-8})
    loss = jax.jit(distill_loss_fn(CONFIG, teacher, **rules))
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    teacher_params = init_params(teacher, jax.random.PRNGKey(1))
    for f, p in zip(full, packed, strict=True):
        (want, want_parts), (got, got_parts) = (loss(params, f, teacher_params),
                                                loss(params, p, teacher_params))
        message = "measured up to 2.7e-7 relative"
        np.testing.assert_allclose(got, want, rtol=8e-7, atol=0, err_msg=message)
        np.testing.assert_allclose(got_parts["ce"], want_parts["ce"], rtol=8e-7, atol=0,
                                   err_msg=message)


def _dpo_run(tmp_path, buckets: int, *flags: str) -> tuple[list[dict], str]:
    out = tmp_path / f"b{buckets}{''.join(flags)}"
    printed = run_command(["dpo", "--data_path", str(FIXTURES / "post" / "dpo_pairs.jsonl"),
                           "--tokenizer", str(TOKENIZER_DIR), "--out_dir", str(out),
                           "--init_from", "none", *TINY_FLAGS, "--max_seq_len", str(WIDTH),
                           "--batch_size", "4", "--epochs", "1", "--learning_rate", "1e-3",
                           "--log_interval", "1", "--length_buckets", str(buckets), *flags])
    return metrics(next(out.glob("rlhf_*"))), printed


def test_dpo_run_same_when_cut(tmp_path):
    """Whole train steps (gradients, updates) on cut and on packed batches follow the
    full-width run."""
    full, _ = _dpo_run(tmp_path, 0)
    cut, printed = _dpo_run(tmp_path, 4, "--no-batch_packing")
    assert "cut to widths 32/64/128/255 per batch" in printed
    packed, printed = _dpo_run(tmp_path, 4)
    assert "each batch packed into 2/4/6/8 rows of 255" in printed
    for key in ("loss", "grad_norm", "reward_margin"):
        for name, run in (("cut", cut), ("packed", packed)):
            np.testing.assert_allclose([r[key] for r in run], [r[key] for r in full],
                                       rtol=1e-4, atol=1e-6, err_msg=f"{name}: {key}")


@pytest.mark.parametrize("packing", [False, True], ids=["cut", "packed"])
def test_distill_reason_loss_same_when_cut(tmp_path, packing):
    """Its loss also reads tagged targets outside the loss mask: cut (or packed) after those
    too."""
    source = open_source(FIXTURES / "post" / "reason_sft.jsonl", TOKENIZER_DIR, "sft", WIDTH,
                         cache_dir=tmp_path, log=lambda m: None)
    ids = distill_reason.tag_ids(load_tokenizer(TOKENIZER_DIR))
    full, cut = _epochs(source, 4, distill_reason.loss_columns(ids), packing)
    (_check_packed if packing else _check_cut)(full, cut, 4)
    loss = jax.jit(distill_reason.weighted_lm_loss(CONFIG, ids), static_argnums=2)
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    # packed: measured up to 2.3e-7 relative
    tolerance = dict(rtol=7e-7, atol=0) if packing else dict(rtol=1e-5, atol=1e-6)
    for f, c in zip(full, cut, strict=True):
        np.testing.assert_allclose(loss(params, c, None)[0], loss(params, f, None)[0],
                                   **tolerance)


class _Rows:
    """Two fixed 128-wide rows: the first supervised up to column 9, the second with one tagged
    target at column 40 outside the loss mask."""

    def __init__(self, tag: int):
        self.labels = np.zeros((2, 128), np.int32)
        self.mask = np.zeros((2, 128), np.int32)
        self.mask[0, :10] = 1
        self.labels[1, 40] = tag

    def __len__(self):
        return 2

    def get_batch(self, indices):
        return {"input_ids": self.labels[indices], "labels": self.labels[indices],
                "loss_mask": self.mask[indices]}


def test_loss_columns_widen_the_cut():
    ids = distill_reason.tag_ids(load_tokenizer(TOKENIZER_DIR))

    def width(loss_columns=None, num_shards=1):
        return next(Loader(_Rows(int(ids[0])), 2, shuffle=False, prefetch=0, length_buckets=4,
                           loss_columns=loss_columns, num_shards=num_shards)
                    .epoch(0))["input_ids"].shape[-1]

    assert width() == 16  # the loss mask's extent, 10 columns
    assert width(distill_reason.loss_columns(ids)) == 64  # the tagged target at column 40
    assert width(distill_reason.loss_columns(ids), num_shards=2) == 64  # the global batch's


def test_producer_stages_not_cut():
    data, dense = DataConfig(data_path="x"), CONFIG
    assert length_buckets(named("sft"), data, dense, Objective()) == 4
    assert length_buckets(named("sft"), data, dense.replace(use_moe=True), Objective()) == 0
    for name in ("grpo", "ppo"):
        producer = Objective(produce=lambda state, batch, info: batch)
        assert length_buckets(named(name), data, dense, producer) == 0
        assert length_buckets(named(name), DataConfig("x", length_buckets=0), dense,
                              producer) == 0
        with pytest.raises(UserError, match=f"--length_buckets: {name} makes its batches"):
            length_buckets(named(name), DataConfig("x", length_buckets=4), dense, producer)


def test_batch_packing_where_the_loss_reads_it():
    data, dense = DataConfig(data_path="x"), CONFIG
    packs = Objective(loss=lambda *a: None, packs_rows=True)
    assert batch_packing(named("sft"), data, dense, Objective())  # the LM loss
    assert batch_packing(named("dpo"), data, dense, packs)
    assert not batch_packing(named("dpo"), data, dense, Objective(loss=lambda *a: None))
    assert not batch_packing(named("sft"), data, dense.replace(use_moe=True), Objective())
    assert not batch_packing(named("sft"), DataConfig("x", batch_packing=False), dense,
                             Objective())
    assert not batch_packing(named("sft"), DataConfig("x", pack=True), dense, Objective())
    with pytest.raises(UserError, match="--batch_packing: there are no length buckets"):
        batch_packing(named("sft"), DataConfig("x", length_buckets=0, batch_packing=True),
                      dense, Objective())
