"""minimind-3 golden parity through the CLI: `pretrain`/`sft --arch minimind3 --recipe
minimind3` reproduce minimind-3's trainer (SPEC3 section 5) from the golden initial weights.

fp32 on CPU; the order, LRs, samples and draws are minimind-3's (seed 42 + epoch), read back
from metrics.jsonl and the checkpoint. The dense pretrain and SFT runs go through the real entry
point (`python -m minimind_jax.cli` in a child, the CLI's XLA:CPU defaults applied, none of the
tests' jax options); the others in this process (matmul precision "highest", conftest).
"""

import json

import jax
import numpy as np
import pytest

from minimind_jax import cli
from minimind_jax.model import weights
from minimind_jax.model.run_checkpoint import CHECKPOINT_DIR
from minimind_jax.model.weights import load_weights
from tests.helpers import (
    MINIMIND3_TOKENIZER_DIR,
    PRETRAIN_JSONL,
    SFT_JSONL,
    assert_within,
    golden_state_dict,
    max_abs_diff,
    run_cli_from_init,
)

TINY_MINIMIND3 = ["--arch", "minimind3", "--recipe", "minimind3", "--dim", "64", "--n_layers", "2",
                  "--max_seq_len", "64", "--dtype", "float32", "--batch_size", "4",
                  "--log_interval", "1"]


def run_cli(tmp_path, command, data, init_sd, extra, entry_point=False):
    return run_cli_from_init(tmp_path, command, data, init_sd,
                             ["--tokenizer", str(MINIMIND3_TOKENIZER_DIR), *TINY_MINIMIND3, *extra],
                             entry_point)


PRETRAIN = ["--accumulation_steps", "2", "--learning_rate", "5e-4", "--epochs", "2"]


@pytest.mark.slow
def test_dense_pretrain_matches_minimind3(tmp_path, minimind3_golden):
    run_dir, records = run_cli(tmp_path, "pretrain", PRETRAIN_JSONL,
                               golden_state_dict(minimind3_golden, "dense/init/"), PRETRAIN,
                               entry_point=True)
    losses = np.array([r["loss"] for r in records])
    assert losses.shape == (40,)
    assert_within("dense pretrain loss",
                  max_abs_diff(losses, minimind3_golden["dense/pretrain_loss"]), 1.4e-5)
    np.testing.assert_array_equal([r["lr"] for r in records], minimind3_golden["dense/pretrain_lr"])

    params, config, _ = load_weights(run_dir)
    got = weights.state_dict_from_params(params, config)
    expected = golden_state_dict(minimind3_golden, "dense/after_pretrain/")
    assert set(got) == set(expected)
    assert_within("dense weights after pretrain",
                  max(max_abs_diff(got[k], expected[k]) for k in expected), 2.0e-5)


@pytest.mark.slow
def test_moe_pretrain_matches_minimind3(tmp_path, minimind3_golden):
    _, records = run_cli(tmp_path, "pretrain", PRETRAIN_JSONL,
                         golden_state_dict(minimind3_golden, "moe/init/"), [*PRETRAIN, "--use_moe"])
    losses = np.array([r["loss"] for r in records])
    assert losses.shape == (40,)
    assert_within("moe pretrain loss",
                  max_abs_diff(losses, minimind3_golden["moe/pretrain_loss"]), 1.7e-5)
    assert_within("moe pretrain aux", max_abs_diff([r["aux"] for r in records],
                                                   minimind3_golden["moe/pretrain_aux"]), 1.1e-9)
    np.testing.assert_array_equal([r["lr"] for r in records], minimind3_golden["moe/pretrain_lr"])


@pytest.mark.slow
def test_dense_sft_matches_minimind3(tmp_path, minimind3_golden):
    """From the golden after-pretrain weights in float32; the recipe rounds them to float16
    as minimind-3's pretrain_64.pth holds them, and draws minimind-3's SFT variants."""
    _, records = run_cli(tmp_path, "sft", SFT_JSONL,
                         golden_state_dict(minimind3_golden, "dense/after_pretrain/"),
                         ["--accumulation_steps", "1", "--learning_rate", "5e-5",
                          "--epochs", "1"], entry_point=True)
    losses = np.array([r["loss"] for r in records])
    assert losses.shape == (10,)
    assert_within("dense sft loss", max_abs_diff(losses, minimind3_golden["dense/sft_loss"]),
                  5.7e-6)
    np.testing.assert_array_equal([r["lr"] for r in records], minimind3_golden["dense/sft_lr"])


@pytest.mark.slow
def test_resume_mid_window_keeps_draws_and_flush(tmp_path, minimind3_golden):
    """SFT with accumulation 3 over 10 batches per epoch (a flush at each epoch's end),
    resumed from the step-7 checkpoint (inside a window): same losses, LRs and weights as
    the uninterrupted run (order, draws, accumulator and flush all restored)."""
    import shutil

    extra = ["--accumulation_steps", "3", "--learning_rate", "1e-3", "--epochs", "2",
             "--save_interval", "7"]
    run_dir, records = run_cli(tmp_path, "sft", SFT_JSONL,
                               golden_state_dict(minimind3_golden, "dense/after_pretrain/"), extra)
    final, config, _ = load_weights(run_dir)
    for step_dir in (run_dir / CHECKPOINT_DIR).iterdir():
        if step_dir.name != "7":
            shutil.rmtree(step_dir)
    argv = ["sft", "--data_path", str(SFT_JSONL), "--tokenizer", str(MINIMIND3_TOKENIZER_DIR),
            "--out_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"),
            "--resume", *TINY_MINIMIND3, *extra]
    assert cli.main(argv) == 0
    resumed = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = ("step", "epoch", "batch", "update", "loss", "lr")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in records]
    again, _, _ = load_weights(run_dir)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
