"""dpo and distill resumed from a mid-run checkpoint (inside an accumulation window) give the
uninterrupted run's losses, LRs and weights: the frozen model (DPO's reference = the initial
weights, the teacher) is loaded again, not taken from the resumed state."""

import json
import shutil

import jax
import numpy as np
import pytest

from minimind_jax import cli
from minimind_jax.model.run_checkpoint import CHECKPOINT_DIR
from minimind_jax.model.weights import load_weights
from tests.helpers import FIXTURES, MINIMIND3_TOKENIZER_DIR, metrics
from tests.test_dpo_golden import reference_weights

POST = FIXTURES / "post"
TINY = ["--arch", "minimind3", "--recipe", "minimind3", "--tokenizer",
        str(MINIMIND3_TOKENIZER_DIR), "--dim", "64", "--n_layers", "2", "--max_seq_len", "64",
        "--dtype", "float32", "--batch_size", "4", "--learning_rate", "1e-3", "--epochs", "2",
        "--accumulation_steps", "4", "--log_interval", "1", "--save_interval", "7"]


@pytest.mark.parametrize("command", ["dpo", "distill"])
def test_resume_mid_window(tmp_path, command):
    init = tmp_path / "init.npz"
    reference_weights("weights_m3_dense64.npz", init)
    argv = [command, "--out_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"),
            "--init_from", str(init), *TINY]
    if command == "dpo":
        argv += ["--data_path", str(POST / "dpo_pairs.jsonl")]
        run_dir = tmp_path / "out" / "dpo_64"
    else:
        teacher = tmp_path / "teacher.npz"
        reference_weights("weights_m3_dense96_teacher.npz", teacher)
        argv += ["--data_path", str(POST / "lora_sft.jsonl"), "--teacher", str(teacher)]
        run_dir = tmp_path / "out" / "full_dist_64"
    assert cli.main(argv) == 0
    records = metrics(run_dir)
    final, _, _ = load_weights(run_dir)
    for step_dir in (run_dir / CHECKPOINT_DIR).iterdir():
        if step_dir.name != "7":
            shutil.rmtree(step_dir)
    assert cli.main([*argv, "--resume"]) == 0
    resumed = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = ("step", "epoch", "batch", "update", "loss", "lr")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in records]
    again, _, _ = load_weights(run_dir)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
