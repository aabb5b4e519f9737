"""Recipes: HEAD's end-of-epoch flush against torch's AdamW, LR formula, stage defaults."""

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimind_jax.errors import UserError
from minimind_jax.train import optim, recipes


def test_flush_of_partial_window_equals_torch_loop():
    """k = 3, 8 micro-steps: two full windows and a flush of 2, as HEAD's train_epoch with
    torch AdamW + clip_grad_norm_ (loss / k backward, so .grad = sum g / k)."""
    torch = pytest.importorskip("torch")
    k, n, lr0 = 3, 8, 1e-2
    rng = np.random.default_rng(0)
    init = {"a": rng.normal(size=(4, 5)).astype(np.float32),
            "b": rng.normal(size=(7,)).astype(np.float32)}
    grads = [{name: rng.normal(size=v.shape).astype(np.float32) * 0.8
              for name, v in init.items()} for _ in range(n)]
    lr = [lr0 * (0.1 + 0.45 * (1 + math.cos(math.pi * s / n))) for s in range(1, n + 1)]

    tparams = {name: torch.nn.Parameter(torch.tensor(v)) for name, v in init.items()}
    opt = torch.optim.AdamW(list(tparams.values()), lr=lr0)

    def torch_step():
        torch.nn.utils.clip_grad_norm_(list(tparams.values()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for s in range(1, n + 1):
        for group in opt.param_groups:
            group["lr"] = lr[s - 1]
        for name, p in tparams.items():
            g = torch.tensor(grads[s - 1][name]) / k
            p.grad = g if p.grad is None else p.grad + g
        if s % k == 0:
            torch_step()
    if n % k:
        torch_step()

    tx = optim.make_optimizer(accumulation_steps=k)
    params = jax.tree.map(jnp.asarray, init)
    state = tx.init(params)
    for s in range(n):
        updates, state = tx.update(jax.tree.map(jnp.asarray, grads[s]), state, params,
                                   learning_rate=lr[s])
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    params, state = optim.flush_partial_window(optim.make_inner_optimizer(), state, params,
                                               lr[-1], k)
    assert int(state.mini_step) == 0 and int(state.gradient_step) == 3
    for name, p in tparams.items():
        np.testing.assert_allclose(np.asarray(params[name]), p.detach().numpy(), atol=2e-6)
    # A second flush with an empty window changes nothing.
    again, _ = optim.flush_partial_window(optim.make_inner_optimizer(), state, params, lr[-1], k)
    for name in params:
        np.testing.assert_array_equal(again[name], params[name])


def test_minimind3_schedule_is_heads_get_lr():
    schedule = optim.Schedule("minimind3", 5e-4, 40)
    expected = [5e-4 * (0.1 + 0.45 * (1 + math.cos(math.pi * s / 40))) for s in range(1, 41)]
    assert [schedule.host(s) for s in range(40)] == expected
    np.testing.assert_allclose([float(schedule(s)) for s in range(40)], expected, rtol=1e-6)


def _args(**kw):
    base = dict(arch=None, preset=None, recipe=None, epochs=None, batch_size=None,
                learning_rate=None, accumulation_steps=None, max_seq_len=None, seed=None,
                lr_schedule=None, no_shuffle=False)
    return argparse.Namespace(**{**base, **kw})


def test_stage_defaults_and_recipes():
    args = _args(arch="minimind3", recipe="minimind3")
    recipes.apply_defaults(args, "pretrain")
    assert (args.epochs, args.batch_size, args.learning_rate, args.accumulation_steps,
            args.max_seq_len, args.seed, args.lr_schedule, args.no_shuffle) == (
        2, 32, 5e-4, 8, 340, 42, "minimind3", False)
    args = _args(preset="minimind3", batch_size=4)
    recipes.apply_defaults(args, "sft")
    assert (args.epochs, args.batch_size, args.learning_rate, args.accumulation_steps,
            args.max_seq_len, args.seed, args.lr_schedule) == (2, 4, 1e-5, 1, 768, 1337,
                                                               "cosine")
    args = _args(recipe="minimind2")
    recipes.apply_defaults(args, "sft")
    assert (args.epochs, args.batch_size, args.learning_rate, args.max_seq_len,
            args.lr_schedule, args.no_shuffle) == (1, 32, 5e-5, None, "minimind2", True)
    with pytest.raises(UserError, match="uses --lr_schedule minimind3"):
        recipes.apply_defaults(_args(recipe="minimind3", lr_schedule="cosine"), "pretrain")
    with pytest.raises(UserError, match="drop --no_shuffle"):
        recipes.apply_defaults(_args(recipe="minimind3", no_shuffle=True), "pretrain")
    with pytest.raises(UserError, match="is a minimind2 model"):
        recipes.apply_defaults(_args(arch="minimind3", preset="minimind2"), "pretrain")


def test_round_to_float16():
    x = {"w": np.array([0.1, 1e-6, 3.0, -2e-5], np.float32)}
    got = recipes.round_to_float16(x)["w"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, x["w"].astype(np.float16).astype(np.float32))
    assert got[0] != x["w"][0]
