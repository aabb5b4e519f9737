"""minimind-3 golden parity through the CLI: `pretrain`/`sft --arch minimind3 --recipe
minimind3` reproduce minimind-3's trainer (SPEC3 section 5) from the golden initial weights.

fp32 on CPU, matmul precision "highest" (conftest); the order, LRs, samples and draws are
minimind-3's (seed 42 + epoch), read back from metrics.jsonl and the checkpoint.
"""

import json

import jax
import numpy as np
import pytest

from minimind_jax import cli
from minimind_jax.model import weights
from minimind_jax.model.weights import load_weights
from minimind_jax.train import checkpoint
from tests.helpers import (
    MINIMIND3_TOKENIZER_DIR,
    PRETRAIN_JSONL,
    SFT_JSONL,
    golden_state_dict,
    run_cli_from_init,
)

TINY_MINIMIND3 = ["--arch", "minimind3", "--recipe", "minimind3", "--dim", "64", "--n_layers", "2",
                  "--max_seq_len", "64", "--dtype", "float32", "--batch_size", "4",
                  "--log_interval", "1"]


def run_cli(tmp_path, command, data, init_sd, extra):
    return run_cli_from_init(tmp_path, command, data, init_sd,
                             ["--tokenizer", str(MINIMIND3_TOKENIZER_DIR), *TINY_MINIMIND3, *extra])


PRETRAIN = ["--accumulation_steps", "2", "--learning_rate", "5e-4", "--epochs", "2"]


@pytest.mark.slow
def test_dense_pretrain_matches_minimind3(tmp_path, minimind3_golden):
    run_dir, records = run_cli(tmp_path, "pretrain", PRETRAIN_JSONL,
                               golden_state_dict(minimind3_golden, "dense/init/"), PRETRAIN)
    losses = np.array([r["loss"] for r in records])
    assert losses.shape == (40,)
    diff = np.abs(losses - minimind3_golden["dense/pretrain_loss"]).max()
    print(f"dense pretrain: max |loss - golden| = {diff:.3g}")
    assert diff <= 1e-4, diff
    np.testing.assert_array_equal([r["lr"] for r in records], minimind3_golden["dense/pretrain_lr"])

    params, config, _ = load_weights(run_dir)
    got = weights.state_dict_from_params(params, config)
    expected = golden_state_dict(minimind3_golden, "dense/after_pretrain/")
    assert set(got) == set(expected)
    worst = max(float(np.abs(got[k] - expected[k]).max()) for k in expected)
    print(f"dense after pretrain: max |w - golden| = {worst:.3g}")
    assert worst <= 1e-4, worst


@pytest.mark.slow
def test_moe_pretrain_matches_minimind3(tmp_path, minimind3_golden):
    _, records = run_cli(tmp_path, "pretrain", PRETRAIN_JSONL,
                         golden_state_dict(minimind3_golden, "moe/init/"), [*PRETRAIN, "--use_moe"])
    losses = np.array([r["loss"] for r in records])
    assert losses.shape == (40,)
    diff = np.abs(losses - minimind3_golden["moe/pretrain_loss"]).max()
    aux = np.array([r["aux"] for r in records])
    aux_diff = np.abs(aux - minimind3_golden["moe/pretrain_aux"]).max()
    print(f"moe pretrain: max |loss - golden| = {diff:.3g}, max |aux - golden| = {aux_diff:.3g}")
    assert diff <= 1e-4 and aux_diff <= 1e-6, (diff, aux_diff)
    np.testing.assert_array_equal([r["lr"] for r in records], minimind3_golden["moe/pretrain_lr"])


@pytest.mark.slow
def test_dense_sft_matches_minimind3(tmp_path, minimind3_golden):
    """From the golden after-pretrain weights in float32; the recipe rounds them to float16
    as minimind-3's pretrain_64.pth holds them, and draws minimind-3's SFT variants."""
    _, records = run_cli(tmp_path, "sft", SFT_JSONL,
                         golden_state_dict(minimind3_golden, "dense/after_pretrain/"),
                         ["--accumulation_steps", "1", "--learning_rate", "5e-5",
                          "--epochs", "1"])
    losses = np.array([r["loss"] for r in records])
    assert losses.shape == (10,)
    diff = np.abs(losses - minimind3_golden["dense/sft_loss"]).max()
    print(f"dense sft: max |loss - golden| = {diff:.3g}")
    assert diff <= 1e-4, diff
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
    for step_dir in (run_dir / checkpoint.CHECKPOINT_DIR).iterdir():
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
