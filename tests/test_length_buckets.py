"""Length buckets (data.batches): a batch cut to its bucket width gives the full-width batch's
loss (DPO pairs, SFT rows, distill_reason's tag-weighted loss; tiny model), and an epoch feeds
no more widths than buckets; the RL stages (a batch producer) are never cut."""

import jax
import numpy as np
import pytest

from minimind_jax.data.batches import Loader, bucket_width, bucket_widths, supervised_extent
from minimind_jax.data.pairs import PairSource
from minimind_jax.data.rows import open_source
from minimind_jax.data.tokenizer import load_tokenizer
from minimind_jax.errors import UserError
from minimind_jax.model.loss import masked_cross_entropy
from minimind_jax.model.transformer import MiniMind, init_params
from minimind_jax.train.setup import length_buckets
from minimind_jax.train.stages import Objective, distill_reason, named
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


def _epochs(source, buckets: int, loss_columns=None):
    """(full-width batches, cut batches) of one epoch, batch 4, the same order."""
    def loader(n):
        return Loader(source, 4, seed=3, prefetch=0, length_buckets=n,
                      loss_columns=loss_columns)
    return list(loader(0).epoch(0)), list(loader(buckets).epoch(0))


def _check_cut(full, cut, buckets: int) -> None:
    widths = {b["input_ids"].shape[-1] for b in cut}
    assert len(widths) <= buckets and min(widths) < WIDTH - 1  # some padding was cut
    for f, c in zip(full, cut, strict=True):
        width = c["input_ids"].shape[-1]
        assert not f["loss_mask"][..., width:].any()  # only unsupervised columns were cut
        for key in f:
            np.testing.assert_array_equal(f[key][..., :width], c[key])


@pytest.mark.parametrize("average", [True, False])
def test_dpo_loss_same_when_cut(average):
    source = PairSource(FIXTURES / "post" / "dpo_pairs.jsonl", load_tokenizer(TOKENIZER_DIR),
                        WIDTH, log=lambda m: None)
    full, cut = _epochs(source, 4)
    _check_cut(full, cut, 4)
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    reference = init_params(CONFIG, jax.random.PRNGKey(1))
    loss = jax.jit(dpo_loss_fn(CONFIG, 0.1, average=average, with_aux=False))
    for f, c in zip(full, cut, strict=True):
        (want, _), (got, _) = loss(params, f, reference), loss(params, c, reference)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_sft_loss_same_when_cut(tmp_path):
    source = open_source(SFT_JSONL, TOKENIZER_DIR, "sft", WIDTH, cache_dir=tmp_path,
                         log=lambda m: None)
    full, cut = _epochs(source, 3)
    _check_cut(full, cut, 3)
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    model = MiniMind(CONFIG)

    @jax.jit
    def loss(batch):
        logits, _ = model.apply({"params": params}, batch["input_ids"])
        return masked_cross_entropy(logits, batch["labels"], batch["loss_mask"])

    for f, c in zip(full, cut, strict=True):
        np.testing.assert_allclose(loss(c), loss(f), rtol=1e-5, atol=1e-6)


def _dpo_run(tmp_path, buckets: int) -> tuple[list[dict], str]:
    out = tmp_path / f"b{buckets}"
    printed = run_command(["dpo", "--data_path", str(FIXTURES / "post" / "dpo_pairs.jsonl"),
                           "--tokenizer", str(TOKENIZER_DIR), "--out_dir", str(out),
                           "--init_from", "none", *TINY_FLAGS, "--max_seq_len", str(WIDTH),
                           "--batch_size", "4", "--epochs", "1", "--learning_rate", "1e-3",
                           "--log_interval", "1", "--length_buckets", str(buckets)])
    return metrics(next(out.glob("rlhf_*"))), printed


def test_dpo_run_same_when_cut(tmp_path):
    """Whole train steps (gradients, updates) on cut batches follow the full-width run."""
    (full, _), (cut, printed) = _dpo_run(tmp_path, 0), _dpo_run(tmp_path, 4)
    assert "cut to widths 32/64/128/255 per batch" in printed
    for key in ("loss", "grad_norm", "reward_margin"):
        np.testing.assert_allclose([r[key] for r in cut], [r[key] for r in full],
                                   rtol=1e-4, atol=1e-6, err_msg=key)


def test_distill_reason_loss_same_when_cut(tmp_path):
    """Its loss also reads tagged targets outside the loss mask: cut after those too."""
    source = open_source(FIXTURES / "post" / "reason_sft.jsonl", TOKENIZER_DIR, "sft", WIDTH,
                         cache_dir=tmp_path, log=lambda m: None)
    ids = distill_reason.tag_ids(load_tokenizer(TOKENIZER_DIR))
    full, cut = _epochs(source, 4, distill_reason.loss_columns(ids))
    _check_cut(full, cut, 4)
    loss = jax.jit(distill_reason.weighted_lm_loss(CONFIG, ids), static_argnums=2)
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    for f, c in zip(full, cut, strict=True):
        np.testing.assert_allclose(loss(params, c, None)[0], loss(params, f, None)[0],
                                   rtol=1e-5, atol=1e-6)


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
