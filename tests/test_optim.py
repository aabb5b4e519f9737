"""Optimizer, schedules and loss against the reference's formulas and torch's AdamW."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from minimind_jax.model.loss import masked_cross_entropy
from minimind_jax.train import optim


def test_minimind2_schedule_equals_golden_lrs(golden):
    schedule = optim.Schedule("minimind2", 5e-4, total_steps=60, accumulation_steps=2)
    host = np.array([schedule.host(s) for s in range(60)])
    np.testing.assert_array_equal(host, golden["dense/pretrain_lr"])
    device = np.array(jax.vmap(schedule)(jnp.arange(60)))
    np.testing.assert_allclose(device, golden["dense/pretrain_lr"], rtol=1e-6)
    sft = optim.Schedule("minimind2", 5e-5, total_steps=20)
    np.testing.assert_array_equal([sft.host(s) for s in range(20)], golden["dense/sft_lr"])


def test_cosine_schedule_warmup_then_decay_per_update():
    lr, accum = 1e-3, 4
    schedule = optim.Schedule("cosine", lr, total_steps=40 * accum, accumulation_steps=accum,
                              warmup_iters=5)
    per_update = [schedule.host(u * accum) for u in range(40)]
    # One LR per update: every micro-step of an accumulation window agrees.
    for u in range(40):
        window = [schedule.host(u * accum + i) for i in range(accum)]
        assert window == [per_update[u]] * accum
    np.testing.assert_allclose(per_update[:5], [lr * (u + 1) / 5 for u in range(5)])
    assert per_update[5] == pytest.approx(lr)
    assert per_update[-1] == pytest.approx(lr / 10)
    assert all(a >= b for a, b in zip(per_update[5:], per_update[6:], strict=False))
    device = np.array(jax.vmap(schedule)(jnp.arange(40 * accum)))
    np.testing.assert_allclose(device, [schedule.host(s) for s in range(40 * accum)], rtol=1e-6)


def test_cosine_without_warmup_starts_at_lr():
    schedule = optim.Schedule("cosine", 2e-4, total_steps=10)
    assert schedule.host(0) == pytest.approx(2e-4)
    assert schedule.host(9) == pytest.approx(2e-5)


def test_unknown_schedule_rejected():
    with pytest.raises(ValueError, match="unknown lr schedule"):
        optim.Schedule("linear", 1e-3, total_steps=10)


def test_optimizer_matches_torch_adamw_with_accumulation_and_clipping():
    """Reference loop: backward(loss/accum) per micro-step, clip 1.0 + AdamW every accum."""
    rng = np.random.default_rng(0)
    shapes = {"a": (5, 3), "b": (7,)}
    params0 = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    accum, n_micro, lr = 3, 12, 0.05
    # Large gradients so clipping is active on some updates and not on others.
    grads = [{k: (rng.normal(size=s) * (3.0 if (i // accum) % 2 else 0.05)).astype(np.float32)
              for k, s in shapes.items()} for i in range(n_micro)]
    schedule = optim.Schedule("minimind2", lr, total_steps=n_micro, accumulation_steps=accum)

    torch_params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params0.items()}
    opt = torch.optim.AdamW(list(torch_params.values()), lr=lr)
    for s, g in enumerate(grads):
        for group in opt.param_groups:
            group["lr"] = schedule.host(s)
        for k, p in torch_params.items():
            contribution = torch.tensor(g[k]) / accum
            p.grad = contribution if p.grad is None else p.grad + contribution
        if (s + 1) % accum == 0:
            torch.nn.utils.clip_grad_norm_(list(torch_params.values()), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    tx = optim.make_optimizer(accumulation_steps=accum, grad_clip=1.0, weight_decay=0.01)
    params = jax.tree.map(jnp.asarray, params0)
    state = tx.init(params)
    norms = []
    for s, g in enumerate(grads):
        updates, state = tx.update(g, state, params, learning_rate=schedule(s))
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        if (s + 1) % accum == 0:
            norms.append(float(optim.last_grad_norm(state)))
    assert int(optim.updates_applied(state)) == n_micro // accum
    for k in shapes:
        np.testing.assert_allclose(np.asarray(params[k]), torch_params[k].detach().numpy(),
                                   atol=2e-6)
    mean_grads = [np.sqrt(sum(np.sum(np.mean([grads[i][k] for i in range(u * accum,
                                                                          (u + 1) * accum)],
                                             axis=0) ** 2) for k in shapes))
                  for u in range(n_micro // accum)]
    np.testing.assert_allclose(norms, mean_grads, rtol=1e-5)
    assert max(norms) > 1.0 > min(norms)  # both the clipped and the unclipped path ran


def test_masked_cross_entropy_matches_torch():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    labels = rng.integers(0, 11, size=(3, 5)).astype(np.int32)
    mask = (rng.random((3, 5)) > 0.4).astype(np.float32)
    per_token = torch.nn.functional.cross_entropy(
        torch.tensor(logits).reshape(-1, 11), torch.tensor(labels, dtype=torch.long).reshape(-1),
        reduction="none").reshape(3, 5)
    expected = float((per_token * torch.tensor(mask)).sum() / mask.sum())
    got = float(masked_cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                                     jnp.asarray(mask)))
    assert got == pytest.approx(expected, rel=1e-6)


def test_masked_cross_entropy_without_targets_is_zero_with_zero_grad():
    logits = jnp.ones((2, 4, 7))
    labels = jnp.zeros((2, 4), jnp.int32)
    mask = jnp.zeros((2, 4))
    loss, grad = jax.value_and_grad(masked_cross_entropy)(logits, labels, mask)
    assert float(loss) == 0.0
    assert bool(jnp.all(grad == 0))


def test_masked_cross_entropy_ignores_non_finite_masked_out_tokens():
    logits = jnp.zeros((1, 3, 4)).at[0, 2].set(jnp.nan)
    labels = jnp.zeros((1, 3), jnp.int32)
    mask = jnp.array([[1.0, 1.0, 0.0]])
    loss, grad = jax.value_and_grad(masked_cross_entropy)(logits, labels, mask)
    assert float(loss) == pytest.approx(math.log(4), rel=1e-6)
    assert bool(jnp.all(jnp.isfinite(grad[0, :2])))
