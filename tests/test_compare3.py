"""`compare` reads minimind-3 logs and its wandb/SwanLab CSV exports."""

import numpy as np
import pytest

from minimind_jax.errors import UserError
from minimind_jax.tools import compare
from minimind_jax.train import log_lines

_TAIL = ", logits_loss: 0, aux_loss: 0.0010, lr: 0.0004, epoch_time: 0.0min"
MINIMIND3_LOG = "\n".join([
    "Model Params: 0.533M",
    "Epoch:[1/2](1/3), loss: 8.7663" + _TAIL,
    "Epoch:[1/2](2/3), loss: 8.7000" + _TAIL,
    "Epoch:[1/2](3/3), loss: 8.6000" + _TAIL,
    "Epoch:[2/2](1/3), loss: 8.5000" + _TAIL,
])


def test_minimind3_log_lines_are_one_based(tmp_path):
    path = tmp_path / "minimind3.log"
    path.write_text(MINIMIND3_LOG)
    curve = compare.load_curve(path)
    assert curve.source == "reference log"
    np.testing.assert_array_equal(curve.steps, [0, 1, 2, 3])
    np.testing.assert_allclose(curve.losses, [8.7663, 8.7, 8.6, 8.5])


def test_minimind2_lines_stay_zero_based(tmp_path):
    path = tmp_path / "ref.log"
    path.write_text("Epoch:[2/2](1/3) loss:8.500 lr:0.000300000000 epoch_Time:0.0min:\n")
    np.testing.assert_array_equal(compare.load_curve(path).steps, [4])


def test_minimind3_csv_export_log_calls_to_micro_steps(tmp_path):
    """HEAD logs at s % 2 == 0 and s == iters (5): micro-steps 1, 3, 4, then 6, 8, 9."""
    logged = log_lines.logged_steps(2, 5)
    assert [next(logged) for _ in range(6)] == [1, 3, 4, 6, 8, 9]
    path = tmp_path / "wandb.csv"
    path.write_text('"Step","run - loss","run - logits_loss","run - aux_loss"\n'
                    + "".join(f"{k},{9 - k / 10},{9 - k / 10},0.001\n" for k in range(6)))
    curve = compare.load_curve(path, csv_log_steps=(2, 5))
    np.testing.assert_array_equal(curve.steps, [1, 3, 4, 6, 8, 9])
    np.testing.assert_allclose(curve.losses, [9 - k / 10 for k in range(6)])
    with pytest.raises(UserError, match="INTERVAL:ITERS"):
        compare.parse_log_steps("2")
