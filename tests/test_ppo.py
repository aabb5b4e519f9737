"""PPO's parts (GAE, whitening, minibatch orders, the value head's start), its bad input, and a
resume from the middle of a run (test_ppo_golden.py holds the parity with train_ppo.py)."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimind_jax import cli
from minimind_jax.errors import UserError
from minimind_jax.model.config import arch_defaults
from minimind_jax.model.run_checkpoint import CHECKPOINT_DIR
from minimind_jax.model.weights import load_weights
from minimind_jax.train.stages import ppo
from tests.helpers import FIXTURES, metrics
from tests.test_grpo import TINY_GRPO, assert_one_error_line

RL = FIXTURES / "rl"


def test_gae_and_whitening_are_the_scripts_loops():
    """The script's reversed loop and masked whitening, written out in float64."""
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    mask = (np.arange(7)[None] < np.array([[7], [4], [1]])).astype(np.float64)
    gamma, lam = 0.9, 0.8
    expected, last = np.zeros((3, 7)), np.zeros(3)
    for t in reversed(range(7)):
        following = values[:, t + 1] if t < 6 else 0.0
        last = rewards[:, t] + gamma * following - values[:, t] + gamma * lam * last
        expected[:, t] = last
    got = np.asarray(ppo.gae(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32),
                             gamma, lam))
    np.testing.assert_allclose(got, expected, atol=1.2e-6)  # float32: 4.1e-7 measured
    mean = (expected * mask).sum() / mask.sum()
    var = ((expected - mean) ** 2 * mask).sum() / mask.sum()  # no Bessel correction
    whitened = np.asarray(ppo.whiten(jnp.asarray(expected, jnp.float32),
                                     jnp.asarray(mask, jnp.float32)))
    np.testing.assert_allclose(whitened, (expected - mean) / np.sqrt(var + 1e-8) * mask,
                               atol=5e-7)  # 1.5e-7 measured
    assert (whitened[mask == 0] == 0).all()


def test_minibatch_orders_and_the_value_heads_start(tmp_path):
    seeded = ppo.minibatch_orders(ppo.PpoOptions(ppo_update_iters=3), seed=42)
    orders = seeded(5, 4)
    assert orders.shape == (3, 4) and all(sorted(o) == [0, 1, 2, 3] for o in orders.tolist())
    np.testing.assert_array_equal(orders, seeded(5, 4))
    assert not np.array_equal(orders, seeded(6, 4))
    # a replay: the recorded orders, -1 where the reference stopped before an epoch
    golden = np.load(RL / "m3_ppo.npz")
    recorded = ppo.minibatch_orders(ppo.PpoOptions(replay=str(RL / "m3_ppo.npz")), seed=42)
    assert int(golden["micro0/n_ppo_epochs_run"]) == 1
    np.testing.assert_array_equal(recorded(0, 2)[0], golden["micro0/ppo_perm0"])
    assert (recorded(0, 2)[1] == -1).all()

    model = arch_defaults("minimind3").replace(dim=64)
    head = ppo.initial_value_head(ppo.PpoOptions(), model, seed=0)
    assert head["kernel"].shape == (64, 1) and head["bias"].shape == (1,)
    assert float(jnp.abs(head["kernel"]).max()) <= 1 / 8 and float(head["bias"][0]) != 0
    imported = ppo.initial_value_head(ppo.PpoOptions(value_head_from=str(RL / "m3_ppo.npz")),
                                      model, seed=0)
    np.testing.assert_array_equal(imported["kernel"].T, golden["critic_init/value_head.weight"])
    wrong = tmp_path / "head.npz"
    np.savez(wrong, **{"value_head.weight": np.zeros((1, 32)), "value_head.bias": np.zeros(1)})
    with pytest.raises(UserError, match=r"value_head.weight \(1, 32\).*expected \(1, 64\)"):
        ppo.initial_value_head(ppo.PpoOptions(value_head_from=str(wrong)), model, seed=0)


@pytest.mark.parametrize("extra, lines, message", [
    ([], ['{"messages": []}'], "rl.jsonl:1: missing field 'conversations'"),
    ([], ['{"conversations": [{"role": "user", "content": "q"}]}'], "the prompt is empty"),
    (["--max_gen_len", "40000"], None, "past the 32768 positions"),
    (["--rollout_engine", "sglang"], None, "--rollout_engine sglang"),
    (["--reward_model_path", "{tmp}/nope"], None, "--reward_model_path none"),
    (["--mini_batch_size", "0"], None, "--mini_batch_size must be >= 1, got 0"),
    (["--gamma", "nan"], None, "--gamma must be a finite number >= 0, got nan"),
    (["--value_head_from", "{tmp}/nope.npz"], None, "--value_head_from"),
])
def test_bad_input_is_one_error_line(tmp_path, capsys, extra, lines, message):
    assert_one_error_line(["ppo", *TINY_GRPO], tmp_path, capsys, extra, lines, message)


@pytest.mark.slow
def test_resume_mid_run_replays_the_same_run(tmp_path, monkeypatch):
    """Resumed from the checkpoint after the first rollout step (the later ones deleted, as a
    kill -9 leaves them), the replayed run's records and both models equal the uninterrupted
    run's: the minibatch counter that carries accumulation windows across steps (acc 3 over 4
    minibatches a step) is in the checkpoint, the rollouts and orders are keyed by step."""
    pytest.importorskip("transformers")
    from tests.test_grpo_golden import _layout
    from tests.test_ppo_golden import saved_params

    case = RL / "m3_ppo_moe_acc3.npz"
    golden = np.load(case)
    monkeypatch.chdir(_layout(tmp_path, golden))
    argv = ["ppo", *map(str, golden["meta/argv"][1:]), "--recipe", "minimind3", "--replay",
            str(case), "--value_head_from", str(case), "--save_interval", "1"]
    run_dir = tmp_path / "out" / "ppo_actor_64_moe"
    assert cli.main(argv) == 0
    records, (final, _) = metrics(run_dir), saved_params(run_dir)
    for step_dir in (run_dir / CHECKPOINT_DIR).iterdir():
        if step_dir.name != "1":
            shutil.rmtree(step_dir)
    assert cli.main([*argv, "--resume"]) == 0
    keys = ("step", "loss", "reward", "critic_loss", "approx_kl", "actor_lr", "critic_lr")
    resumed = metrics(run_dir)
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in records]
    again, _ = saved_params(run_dir)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    # the run folder loads as its actor (generate, eval, convert, --init_from)
    actor, _, _ = load_weights(run_dir)
    for a, b in zip(jax.tree.leaves(actor), jax.tree.leaves(again["actor"]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_completion_log_probs_in_chunks_are_the_full_log_softmax():
    """The chunked log-probs (never the whole [N, L, V] at once) and their gradient equal a
    log_softmax over the full logits, whatever the chunk, and with the rows in slices."""
    from minimind_jax.model.transformer import MiniMind, init_params
    from minimind_jax.train.stages import rl

    config = arch_defaults("minimind3").replace(dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                                vocab_size=300, dtype="float32")
    model, params = MiniMind(config), init_params(config, 0)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 300, (3, 20)), jnp.int32)
    seg = jnp.ones_like(ids).at[0, :3].set(0)
    pos = jnp.broadcast_to(jnp.arange(8, 19), (3, 11))

    def full(params):
        logits, _ = model.apply({"params": params}, ids, segment_ids=seg)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return jnp.take_along_axis(jnp.take_along_axis(logp, ids[:, 1:, None], 2)[..., 0],
                                   pos, 1)

    expected, expected_grad = full(params), jax.grad(lambda p: full(p).sum())(params)
    assert [rl.row_slices(config, 3, 20, t) for t in (60, 59, 40, 20, 1)] == [1, 3, 3, 3, 3]
    assert rl.row_slices(config, 12, 1070, rl.PASS_TOKENS) == 4  # GRPO's defaults: 4 x 3 rows
    assert rl.row_slices(config.replace(use_moe=True), 12, 1070, rl.PASS_TOKENS) == 1
    for chunk, pass_tokens in ((256, 60), (11, 60), (4, 60), (3, 60), (11, 20)):
        got = rl.completion_logps(model, params, ids, seg, pos, chunk=chunk,
                                  pass_tokens=pass_tokens)[0]
        np.testing.assert_allclose(got, expected, atol=2e-6)  # 9.5e-7 measured
        grad = jax.grad(lambda p, c=chunk, t=pass_tokens: rl.completion_logps(
            model, p, ids, seg, pos, chunk=c, pass_tokens=t)[0].sum())(params)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(expected_grad), strict=True):
            np.testing.assert_allclose(a, b, atol=2e-6)  # 1.7e-6 measured
