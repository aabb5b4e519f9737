"""Golden parity through the CLI: `pretrain`/`sft` reproduce the PyTorch reference's run.

fp32 on CPU, the golden initial weights given with --init_from, file order and the reference's
minimind2 schedule; everything else is exactly what a user's `minimind-jax pretrain ...` runs,
read back from metrics.jsonl and the checkpoint. The dense runs go through the real entry point
(`python -m minimind_jax.cli` in a child, the CLI's XLA:CPU defaults applied, none of the tests'
jax options); the MoE run in this process (matmul precision "highest", conftest).
"""

import numpy as np

from minimind_jax.model import weights
from minimind_jax.model.weights import load_weights
from tests.helpers import (
    PRETRAIN_JSONL,
    SFT_JSONL,
    TINY_FLAGS,
    TOKENIZER_DIR,
    assert_within,
    golden_state_dict,
    max_abs_diff,
    run_cli_from_init,
)


def run_cli(tmp_path, golden, command, data, init_prefix, extra, entry_point=False):
    return run_cli_from_init(tmp_path, command, data, golden_state_dict(golden, init_prefix),
                             ["--tokenizer", str(TOKENIZER_DIR), "--batch_size", "4",
                              "--no_shuffle", "--lr_schedule", "minimind2", "--log_interval", "1",
                              *TINY_FLAGS, *extra], entry_point)


def test_dense_pretrain_matches_reference(tmp_path, golden):
    run_dir, records = run_cli(tmp_path, golden, "pretrain", PRETRAIN_JSONL, "dense/init/",
                               ["--accumulation_steps", "2", "--learning_rate", "5e-4",
                                "--epochs", "3"], entry_point=True)
    losses = np.array([r["loss"] for r in records])
    assert losses.shape == (60,)
    assert_within("dense pretrain loss", max_abs_diff(losses, golden["dense/pretrain_loss"]),
                  2.0e-5)
    np.testing.assert_array_equal([r["lr"] for r in records], golden["dense/pretrain_lr"])
    assert [r["update"] for r in records] == [(s + 1) // 2 for s in range(60)]
    assert all(("grad_norm" in r) == (s % 2 == 1) for s, r in enumerate(records))

    params, config, _ = load_weights(run_dir)
    got = weights.state_dict_from_params(params, config)
    expected = golden_state_dict(golden, "dense/after_pretrain/")
    assert set(got) == set(expected)
    assert_within("dense weights after pretrain",
                  max(max_abs_diff(got[k], expected[k]) for k in expected), 8.8e-6)


def test_dense_sft_matches_reference(tmp_path, golden):
    _, records = run_cli(tmp_path, golden, "sft", SFT_JSONL, "dense/after_pretrain/",
                         ["--accumulation_steps", "1", "--learning_rate", "5e-5",
                          "--epochs", "2"], entry_point=True)
    losses = np.array([r["loss"] for r in records])
    assert losses.shape == (20,)
    assert_within("dense sft loss", max_abs_diff(losses, golden["dense/sft_loss"]), 5.7e-6)
    np.testing.assert_array_equal([r["lr"] for r in records], golden["dense/sft_lr"])


def test_moe_pretrain_matches_reference(tmp_path, golden):
    _, records = run_cli(tmp_path, golden, "pretrain", PRETRAIN_JSONL, "moe/init/",
                         ["--accumulation_steps", "2", "--learning_rate", "5e-4",
                          "--epochs", "3", "--use_moe"])
    losses = np.array([r["loss"] for r in records])
    assert losses.shape == (60,)
    assert_within("moe pretrain loss", max_abs_diff(losses, golden["moe/pretrain_loss"]), 1.1e-3)
    assert_within("moe pretrain aux",
                  max_abs_diff([r["aux"] for r in records], golden["moe/pretrain_aux"]), 2.6e-5)
    np.testing.assert_array_equal([r["lr"] for r in records], golden["moe/pretrain_lr"])
