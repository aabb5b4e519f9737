"""The train step: non-finite micro-batches are skipped and counted, donation, accumulation."""

import jax
import numpy as np
import pytest

from minimind_jax.model.transformer import init_params
from minimind_jax.train import optim, train_step
from tests.helpers import TINY_CONFIG as CONFIG


def batch(labels_offset=0, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 6400, size=(2, 16)).astype(np.int32)
    labels = np.roll(ids, -1, axis=1)
    # An out-of-vocabulary label makes that token's cross-entropy NaN.
    labels[0, 3] += labels_offset
    return {"input_ids": ids, "labels": labels, "loss_mask": np.ones((2, 16), np.float32)}


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope="module")
def setup():
    mesh = train_step.data_mesh()
    optimizer = optim.make_optimizer(accumulation_steps=1)
    schedule = optim.Schedule("minimind2", 1e-3, total_steps=10)
    step_fn = train_step.make_train_step(CONFIG, optimizer, schedule, mesh)
    state = train_step.put_replicated(
        train_step.create_train_state(init_params(CONFIG, 0), optimizer), mesh)
    return mesh, step_fn, state


def test_non_finite_micro_batch_is_skipped_and_counted(setup):
    mesh, step_fn, state = setup
    state, m0 = step_fn(state, train_step.put_batch(batch(), mesh))
    assert np.isfinite(float(m0["loss"])) and bool(m0["updated"])
    before = host((state.params, state.opt_state))

    state, m1 = step_fn(state, train_step.put_batch(batch(labels_offset=10_000), mesh))
    assert not np.isfinite(float(m1["loss"]))
    assert (int(m1["skipped"]), int(m1["consecutive_skips"]), bool(m1["updated"])) == (1, 1, False)
    after = host((state.params, state.opt_state))
    jax.tree.map(np.testing.assert_array_equal, before, after)  # nothing moved
    assert int(state.step) == 2  # but the micro-step counts (data and schedule stay aligned)

    state, m2 = step_fn(state, train_step.put_batch(batch(seed=1), mesh))
    assert (int(m2["skipped"]), int(m2["consecutive_skips"]), bool(m2["updated"])) == (1, 0, True)
    assert int(m2["update"]) == 2
    moved = host(state.params)
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(before[0]), jax.tree.leaves(moved), strict=True))


def test_state_buffers_are_donated(setup):
    mesh, step_fn, _ = setup
    optimizer = optim.make_optimizer(accumulation_steps=1)
    state = train_step.put_replicated(
        train_step.create_train_state(init_params(CONFIG, 1), optimizer), mesh)
    old_leaf = jax.tree.leaves(state.params)[0]
    new_state, _ = step_fn(state, train_step.put_batch(batch(), mesh))
    assert old_leaf.is_deleted()
    assert not jax.tree.leaves(new_state.params)[0].is_deleted()


def test_batch_without_targets_gives_zero_loss_and_finite_update(setup):
    mesh, step_fn, _ = setup
    optimizer = optim.make_optimizer(accumulation_steps=1)
    state = train_step.put_replicated(
        train_step.create_train_state(init_params(CONFIG, 2), optimizer), mesh)
    empty = batch()
    empty["loss_mask"][:] = 0
    state, metrics = step_fn(state, train_step.put_batch(empty, mesh))
    assert float(metrics["loss"]) == 0.0
    assert int(metrics["skipped"]) == 0 and float(metrics["grad_norm"]) == 0.0


def test_non_finite_update_is_skipped_like_a_non_finite_gradient():
    # Finite loss and gradient, but lr x decay x weight overflows float32: the new weights
    # would be inf. The step must keep the old state and say why it skipped.
    mesh = train_step.data_mesh()
    optimizer = optim.make_optimizer(accumulation_steps=1, weight_decay=1e38)
    schedule = optim.Schedule("minimind2", 1e38, total_steps=10)
    step_fn = train_step.make_train_step(CONFIG, optimizer, schedule, mesh)
    state = train_step.put_replicated(
        train_step.create_train_state(init_params(CONFIG, 0), optimizer), mesh)
    before = host((state.params, state.opt_state))
    state, m = step_fn(state, train_step.put_batch(batch(), mesh))
    assert np.isfinite(float(m["loss"]))
    assert (int(m["skipped"]), int(m["nonfinite"]), bool(m["updated"])) == (1, 3, False)
    assert train_step.NONFINITE_REASONS[3].startswith("update")
    jax.tree.map(np.testing.assert_array_equal, before, host((state.params, state.opt_state)))
