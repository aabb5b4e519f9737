"""Distillation golden parity through the CLI: `minimind-jax distill` reproduces the
references' own train_distillation.py runs (tests/fixtures/post/m2_distill, m3_distill,
m3_distill_moe_teacher; commands in their meta/command) from the same student and teacher
weights: per-step loss within 1e-4 (MiniMind2 does not divide by accumulation; here 1), the
LR exactly, ce and distill as the script computed them, and the final weights.

fp32 on CPU, matmul precision "highest" (conftest).
"""

import numpy as np
import pytest

from minimind_jax import cli
from tests.helpers import FIXTURES, MINIMIND3_TOKENIZER_DIR, TOKENIZER_DIR, metrics
from tests.test_dpo_golden import (
    assert_final_weights,
    assert_reference_lines,
    reference_weights,
)

POST = FIXTURES / "post"
COMMON = ["--dim", "64", "--n_layers", "2", "--max_seq_len", "64", "--dtype", "float32",
          "--batch_size", "4", "--learning_rate", "1e-4", "--epochs", "2", "--grad_clip", "1.0",
          "--accumulation_steps", "1", "--log_interval", "1", "--save_interval", "1000"]
MINIMIND3 = ["--arch", "minimind3", "--recipe", "minimind3", "--tokenizer",
             str(MINIMIND3_TOKENIZER_DIR), "--alpha", "0.5", "--temperature", "1.5"]
CASES = {"m2_distill": ["--recipe", "minimind2", "--tokenizer", str(TOKENIZER_DIR)],
         "m3_distill": MINIMIND3, "m3_distill_moe_teacher": MINIMIND3}


@pytest.mark.parametrize("case", list(CASES))
def test_distill_matches_reference(tmp_path, capsys, case):
    golden = np.load(POST / f"{case}.npz")
    student, teacher = tmp_path / "student.npz", tmp_path / "teacher.npz"
    reference_weights(str(golden["meta/base_weights_file"][0]), student)
    reference_weights(str(golden["meta/teacher_weights_file"][0]), teacher)
    argv = ["distill", "--data_path", str(POST / "lora_sft.jsonl"), "--out_dir",
            str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--init_from",
            str(student), "--teacher", str(teacher), *COMMON, *CASES[case]]
    assert cli.main(argv) == 0
    assert_reference_lines(capsys.readouterr().out, golden)
    run_dir = tmp_path / "out" / "full_dist_64"
    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(20))
    losses = np.array([r["loss"] for r in records])
    diff = np.abs(losses - golden["loss_backward"]).max()  # accumulation 1
    print(f"{case}: max |loss - reference| = {diff:.3g}")
    assert diff <= 1e-4, diff
    np.testing.assert_array_equal([r["lr"] for r in records], golden["lr"])
    ce = golden["ce_loss_raw"] if case.startswith("m3") else golden["ce_loss"]
    np.testing.assert_allclose([r["ce"] for r in records], ce, rtol=0, atol=1e-4)
    np.testing.assert_allclose([r["distill"] for r in records], golden["distill_loss"],
                               rtol=0, atol=1e-5)
    print(f"{case}: max |final weights - reference| = "
          f"{assert_final_weights(run_dir, golden, 1e-4):.3g}")
