"""TensorBoard event files written without tensorboardX: checked against the CRC-32C check
value and decoded by tensorboardX's own protobuf classes, resume purge included."""

import time

import numpy as np
import pytest

from minimind_jax.train import tb_events
from tests.tracker_logs import tensorboard_history


def test_crc32c_matches_the_standard_check_value():
    assert tb_events.crc32c(b"123456789") == 0xE3069283  # RFC 3720's CRC-32C check value
    assert tb_events.crc32c(b"") == 0


def test_a_resumed_writer_replaces_the_steps_from_its_purge_step(tmp_path):
    pytest.importorskip("tensorboardX")  # decodes our files independently
    first = tb_events.EventWriter(tmp_path)
    for step in range(4):
        first.add_scalars({"train/loss": 10.0 - step, "train/lr": 1e-3}, step)
    first.close()
    time.sleep(1.1)  # file names carry whole seconds: the resumed file sorts after
    resumed = tb_events.EventWriter(tmp_path, purge_step=2)
    for step in range(2, 5):
        resumed.add_scalars({"train/loss": 20.0 - step, "eval/ppl": np.float32(3.5)}, step)
    resumed.close()

    history = tensorboard_history(tmp_path)
    assert history["train/loss"] == {0: 10.0, 1: 9.0, 2: 18.0, 3: 17.0, 4: 16.0}
    assert history["train/lr"] == {0: np.float32(1e-3), 1: np.float32(1e-3)}
    assert history["eval/ppl"] == {2: 3.5, 3: 3.5, 4: 3.5}
