"""Recipes: minimind-3's end-of-epoch flush against torch's AdamW, LR formula, stage defaults,
and one resolution of stage defaults and recipe for the command and for Python."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimind_jax import cli
from minimind_jax.errors import UserError
from minimind_jax.model.config import arch_defaults
from minimind_jax.train import flags, optim, recipes
from minimind_jax.train.recipes import RECIPES
from minimind_jax.train.stages import STAGES
from minimind_jax.train.train_config import (
    DataConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)


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


def _command_config(command: str, *argv: str) -> TrainConfig:
    """The TrainConfig the `command` builds from `argv` (its flags, resolved)."""
    args = cli.build_parser().parse_args([command, *argv])
    return flags.config_from_args(args, STAGES[command])


def _defaults(c: TrainConfig) -> tuple:
    return (c.optim.epochs, c.data.batch_size, c.optim.learning_rate, c.optim.accumulation_steps,
            c.model.max_seq_len, c.seed, c.optim.lr_schedule, c.data.shuffle)


def test_stage_defaults_and_recipes():
    assert _defaults(_command_config("pretrain", "--arch", "minimind3", "--recipe",
                                     "minimind3")) == (2, 32, 5e-4, 8, 340, 42, "minimind3", True)
    assert _defaults(_command_config("sft", "--preset", "minimind3", "--batch_size", "4")) == (
        2, 4, 1e-5, 1, 768, 1337, "cosine", True)
    assert _defaults(_command_config("sft", "--recipe", "minimind2")) == (
        1, 32, 5e-5, 1, 512, 1337, "minimind2", False)
    with pytest.raises(UserError, match="uses --lr_schedule minimind3"):
        _command_config("pretrain", "--recipe", "minimind3", "--lr_schedule", "cosine")
    with pytest.raises(UserError, match="drop --no_shuffle"):
        _command_config("pretrain", "--recipe", "minimind3", "--no_shuffle")
    with pytest.raises(UserError, match="is a minimind2 model"):
        _command_config("pretrain", "--arch", "minimind3", "--preset", "minimind2")


@pytest.mark.parametrize("recipe", [None, *RECIPES])
@pytest.mark.parametrize("command", ["pretrain", "sft"])
def test_a_python_config_resolves_as_the_command(recipe, command):
    """TrainConfig(recipe=...) built in Python, resolved, equals the command's config with
    --recipe (the recorded flags aside): one path from stage defaults and recipe to config."""
    arch = "minimind3" if recipe == "minimind3" else "minimind2"
    argv = ["--arch", arch, "--data_path", "data.jsonl"] + (["--recipe", recipe] if recipe
                                                               else [])
    from_command = _command_config(command, *argv)
    model = arch_defaults(arch).replace(vocab_size=from_command.model.vocab_size,
                                        max_seq_len=from_command.model.max_seq_len,
                                        dtype=from_command.model.dtype)
    from_python = TrainConfig(model=model, data=DataConfig(data_path="data.jsonl"),
                              recipe=recipe, vocab_from_tokenizer=True
                              ).resolved(STAGES[command])
    assert from_python.recipe == recipes.recipe_named(recipe)
    assert dataclasses.replace(from_command, run=RunConfig()) == \
        dataclasses.replace(from_python, run=RunConfig(tracker=from_command.run.tracker))
    assert from_python.resolved(STAGES[command]) == from_python  # resolving twice changes nothing


def test_a_python_config_with_a_recipes_other_choice_is_refused():
    model = arch_defaults("minimind2")
    with pytest.raises(UserError, match="reads the data in file order"):
        TrainConfig(model=model, data=DataConfig(data_path="x", shuffle=True),
                    recipe="minimind2").resolved(STAGES["pretrain"])
    with pytest.raises(UserError, match="uses --lr_schedule minimind2, not cosine"):
        TrainConfig(model=model, data=DataConfig(data_path="x"),
                    optim=OptimConfig(lr_schedule="cosine"), recipe="minimind2"
                    ).resolved(STAGES["sft"])
    with pytest.raises(UserError, match="unknown recipe 'minimind4'"):
        TrainConfig(model=model, data=DataConfig(data_path="x"), recipe="minimind4")


def test_round_to_float16():
    x = {"w": np.array([0.1, 1e-6, 3.0, -2e-5], np.float32)}
    got = recipes.round_to_float16(x)["w"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, x["w"].astype(np.float16).astype(np.float32))
    assert got[0] != x["w"][0]
