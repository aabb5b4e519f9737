"""GRPO's parts written from shared/SPEC_RL.md, checked against small hand computations: rule
rewards, group advantages, the completion mask, the annealed LR, the prompts' draws; and a tiny
run with canned completions through `train.run` (the batch producer on the real path)."""

import json
import math
import random
import shutil

import jax
import numpy as np
import pytest

from minimind_jax import cli, train
from minimind_jax.data import minimind3
from minimind_jax.data.prompts import PromptSource
from minimind_jax.data.tokenizer import load_tokenizer
from minimind_jax.errors import UserError
from minimind_jax.model.config import arch_defaults
from minimind_jax.model.run_checkpoint import CHECKPOINT_DIR
from minimind_jax.model.weights import load_weights
from minimind_jax.train import optim, rewards, stages
from minimind_jax.train.stages import grpo
from tests.helpers import FIXTURES, MINIMIND3_TOKENIZER_DIR, metrics
from tests.test_dpo_golden import reference_weights


def test_rule_rewards():
    assert rewards.rep_penalty("") == 0.0
    assert rewards.rep_penalty("a b c a b c") == pytest.approx(min(0.5, 1 * 0.5 * 2 / 4))
    think = "x" * 25
    reward, answer = rewards.rule_reward(f"{think}</think>  the answer  ")
    assert answer == "the answer"
    assert reward == np.float32(0.5 + 1.0 + 0.25)
    reward, answer = rewards.rule_reward("short")
    assert (reward, answer) == (np.float32(-0.5), "short")
    reward, _ = rewards.rule_reward(f"{think}</think>a</think>b")
    assert reward == np.float32(0.5 + 1.0 - 0.25)
    prompt = ("<|im_start|>system\n sys <|im_end|>\n<|im_start|>user\nq?<|im_end|>\n"
              "<|im_start|>assistant\n<think>\n")
    assert rewards.prompt_messages(prompt) == [{"role": "system", "content": "sys"},
                                               {"role": "user", "content": "q?"}]


def test_advantages_mask_and_lr():
    r = np.array([1.0, 2.0, 4.0, 3.0, 3.0, 3.0], np.float32)
    a = grpo.advantages(r, 3)
    g = r[:3]
    np.testing.assert_allclose(a[:3], (g - g.mean()) / (g.std() + 1e-4), rtol=1e-6)
    assert np.all(a[3:] == 0)  # a group without variance
    done = grpo.completion_mask(np.array([[5, 2, 2, 2], [5, 6, 7, 8]]), eos_id=2)
    np.testing.assert_array_equal(done, [[1, 1, 0, 0], [1, 1, 1, 1]])
    # torch's CosineAnnealingLR(T_max=4, eta_min=lr/10), stepped per update of 2 micro-steps,
    # 3 batches an epoch (a flushed partial window), 2 epochs
    schedule = optim.Schedule("annealing", 1e-3, total_steps=6, accumulation_steps=2,
                              epoch_batches=3)
    updates_done = [0, 0, 1, 2, 2, 3]
    assert [schedule.host(s) for s in range(6)] == pytest.approx(
        [grpo.annealed_lr(1e-3, 4, k) for k in updates_done])
    assert grpo.annealed_lr(1e-3, 2, 1) == pytest.approx(5.5e-4)  # SPEC_RL 1.4's example
    assert grpo.annealed_lr(1e-3, 2, 2) == pytest.approx(1e-4)


@pytest.fixture(scope="module")
def rlaif(tmp_path_factory):
    path = tmp_path_factory.mktemp("rl") / "rlaif.jsonl"
    rows = [[{"role": "user", "content": q}, {"role": "assistant", "content": "无"}]
            for q in ("你好", "什么是机器学习？", "讲个笑话", "如何学习编程？", "天为什么是蓝的？")]
    rows.append([{"role": "system", "content": "你是一个助手"},
                 {"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "无"}])
    path.write_text("".join(json.dumps({"conversations": c}, ensure_ascii=False) + "\n"
                            for c in rows))
    return path


def test_prompt_draws_follow_pythons_random(rlaif):
    """The script's draws in the epoch's order: the system coin (then random.choice) only for
    prompts without a system message, then the thinking coin, from random.seed(42 + epoch)."""
    tokenizer = load_tokenizer(MINIMIND3_TOKENIZER_DIR)
    source = PromptSource(rlaif, tokenizer, 64, seed=42, thinking_ratio=0.5)
    order = np.array([3, 5, 0, 1, 4, 2])
    system, thinking = source.draws(1, order)
    rng = random.Random(43)
    for item in order:
        expected_system = -1
        if item != 5 and rng.random() < 0.2:
            prompts = minimind3.SYSTEM_PROMPTS
            expected_system = prompts.index(rng.choice(prompts))
        assert system[item] == expected_system
        assert thinking[item] == (rng.random() < 0.5)
    batch = source.for_epoch(1, order).get_batch(np.array([5, 0]))
    text = batch["prompt_text"][0]
    assert text.startswith("<|im_start|>system\n你是一个助手") and "无" not in text
    assert text.endswith("<|im_start|>assistant\n<think>\n" if thinking[5]
                         else "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and mask[:, -1].all() and (ids[mask == 0] == 0).all()
    assert tokenizer.decode(ids[1][mask[1] > 0].tolist()) == batch["prompt_text"][1]


def test_bad_settings_are_one_error_each(rlaif, tmp_path):
    model = arch_defaults("minimind3")
    with pytest.raises(UserError, match="a group of one has zero advantage"):
        grpo.check_options(grpo.GrpoOptions(num_generations=1), model)
    with pytest.raises(UserError, match="--rollout_engine sglang"):
        grpo.check_options(grpo.GrpoOptions(rollout_engine="sglang"), model)
    with pytest.raises(UserError, match="--reward_model_path none"):
        rewards.reward_model(str(tmp_path / "nope"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"role": "user", "content": "q"}]}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: .*the prompt is empty"):
        PromptSource(bad, load_tokenizer(MINIMIND3_TOKENIZER_DIR), 64)


def test_a_tiny_run_with_canned_completions(rlaif, tmp_path):
    """Canned completions: every group's rewards are equal, so A = 0 and the loss is the KL
    term alone, which is 0 while the policy equals the reference (the first update's step)."""
    canned = ("<think>\n" + "想" * 25 + "\n</think>\n答案。",)
    stage = stages.named("grpo").with_options(num_generations=2, max_gen_len=40,
                                              reward_model_path="none", script=canned)
    config = train.TrainConfig(
        model=arch_defaults("minimind3").replace(dim=64, n_layers=2, max_seq_len=64,
                                                 dtype="float32"),
        data=train.DataConfig(data_path=str(rlaif), tokenizer=str(MINIMIND3_TOKENIZER_DIR),
                              batch_size=2),
        optim=train.OptimConfig(learning_rate=1e-3),
        run=train.RunConfig(out_dir=str(tmp_path), init_from="none", log_interval=1),
        recipe="minimind3", vocab_from_tokenizer=True)
    assert train.run(config, stage) == 0
    records = metrics(tmp_path / "grpo_64")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[0]["reward"] == pytest.approx(0.5 + 1.0 + 0.25)
    assert all(r["advantages_std"] == 0 for r in records)
    assert records[0]["loss"] == 0.0 and abs(records[0]["kl_ref"]) < 1e-7  # measured 1.4e-8
    assert records[0]["lr"] == pytest.approx(1e-3)
    assert math.isfinite(records[-1]["loss"])
    saved = [p.name for p in (tmp_path / "grpo_64").glob("grpo_64.*")]
    assert saved in (["grpo_64.pth"], ["grpo_64.npz"])  # the script's float16 file (npz: no torch)


@pytest.mark.parametrize("loss_type", ["cispo", "grpo"])
def test_widened_rows_give_the_same_loss(loss_type):
    """Rollout rows padded on the right to a bucket width (rl.widened; a few programs instead
    of one per prompt width and completion length): the same old log-probs, loss, metrics and
    gradient as the exact width, for a dense model."""
    from minimind_jax.model.transformer import init_params
    from minimind_jax.train.stages import rl

    assert rl.padded_width(70 + 300, 768 + 1024) == 448  # steps of 224
    assert rl.padded_width(16, 64 + 16) == 16 and rl.padded_width(17, 80) == 32
    config = arch_defaults("minimind3").replace(dim=64, n_layers=2, max_seq_len=64,
                                                dtype="float32")
    params, reference = init_params(config, 1), init_params(config, 2)
    rng = np.random.default_rng(0)
    N, P, R = 4, 6, 9
    ids = rng.integers(3, config.vocab_size, (N, P + R)).astype(np.int32)
    ids[1, :2] = 0  # left padding
    ids[0, P + 4] = ids[2, P + 7] = 2  # EOS: rows 0 and 2 end early
    rows = {"input_ids": ids, "segment_ids": (ids != 0).astype(np.int32),
            "logp_pos": np.broadcast_to(P - 1 + np.arange(R, dtype=np.int32), (N, R)).copy()}
    done = rl.completion_mask(ids[:, P:], 2)
    options = grpo.GrpoOptions(loss_type=loss_type)
    old_logps = rl.old_logps_fn(config)
    loss = jax.jit(jax.value_and_grad(
        lambda p, b: grpo.grpo_loss_fn(config, options)(p, b, reference), has_aux=True))

    def batch(rows, done):
        old = np.asarray(old_logps(params, rows["input_ids"], rows["segment_ids"],
                                   rows["logp_pos"])) - 0.05  # off-policy: the clamps act
        return {**rows, "old_logps": old, "completion_mask": done, "loss_mask": done,
                "advantages": np.float32([1.0, -0.5, 0.25, -1.0]),
                "rewards": np.float32([1, 0, 2, 0]), "row_mask": np.ones(N, np.float32)}

    exact = batch(rows, done)
    wide = batch(*rl.widened(rows, done, 16, 32))
    assert wide["input_ids"].shape == (N, 32) and wide["completion_mask"].shape == (N, 16)
    np.testing.assert_allclose(wide["old_logps"][:, :R], exact["old_logps"], rtol=0, atol=3e-6,
                               err_msg="old log-probs: measured up to 9.5e-7 apart")
    (want, want_metrics), want_grads = loss(params, exact)
    (got, got_metrics), got_grads = loss(params, wide)
    np.testing.assert_allclose(got, want, rtol=1.2e-6, atol=0,
                               err_msg="loss: measured up to 4.1e-7 relative")
    for key in want_metrics:
        np.testing.assert_allclose(got_metrics[key], want_metrics[key], rtol=2.7e-6, atol=0,
                                   err_msg=f"{key}: measured up to 8.8e-7 relative (kl_ref)")
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)


RL = FIXTURES / "rl"
TINY_GRPO = ["--arch", "minimind3", "--recipe", "minimind3", "--tokenizer",
             str(MINIMIND3_TOKENIZER_DIR), "--dim", "64", "--n_layers", "2", "--max_seq_len",
             "64", "--dtype", "float32", "--batch_size", "2", "--max_gen_len", "16",
             "--reward_model_path", "none", "--log_interval", "1"]


@pytest.mark.parametrize("extra, lines, message", [
    ([], ['{"messages": []}'], "rl.jsonl:1: missing field 'conversations'"),
    ([], ['{"conversations": [{"role": "user", "content": "q"}]}'], "the prompt is empty"),
    (["--num_generations", "1"], None, "a group of one has zero advantage"),
    (["--max_gen_len", "40000"], None, "past the 32768 positions"),
    (["--rollout_engine", "sglang"], None, "--rollout_engine sglang"),
    (["--reward_model_path", "{tmp}/nope"], None, "--reward_model_path none"),
])
def test_bad_input_is_one_error_line(tmp_path, capsys, extra, lines, message):
    assert_one_error_line(["grpo", *TINY_GRPO], tmp_path, capsys, extra, lines, message)


def assert_one_error_line(command: list, tmp_path, capsys, extra: list, lines, message: str):
    """`command` on the fixture's RLAIF rows (or on `lines`) with `extra` flags ({tmp}: the
    test's folder) exits 2 with one `error:` line holding `message`, and creates nothing."""
    data = tmp_path / "rl.jsonl"
    if lines is None:
        shutil.copy(RL / "rlaif.jsonl", data)
    else:
        data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    argv = [*command, "--data_path", str(data), "--out_dir", str(out), "--init_from", "none",
            *[a.format(tmp=tmp_path) for a in extra]]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists() or not any(out.iterdir()), list(out.rglob("*"))


def test_resume_mid_window_replays_the_same_run(tmp_path):
    """Resumed from a checkpoint inside an accumulation window (the later ones deleted, as a
    kill -9 leaves them), the replayed run's records and weights equal the uninterrupted run's:
    the rollouts are keyed by step, the reference model is loaded again."""
    init = tmp_path / "init.npz"
    reference_weights("weights_m3_dense64.npz", init)
    argv = ["grpo", "--data_path", str(RL / "rlaif.jsonl"), "--out_dir", str(tmp_path / "out"),
            "--init_from", str(init), *TINY_GRPO, "--num_generations", "2", "--loss_type",
            "grpo", "--accumulation_steps", "2", "--learning_rate", "5e-4",
            "--save_interval", "3", "--replay", str(RL / "m3_grpo_acc2.npz")]
    run_dir = tmp_path / "out" / "grpo_64"
    assert cli.main(argv) == 0
    records = metrics(run_dir)
    final, _, _ = load_weights(run_dir)
    for step_dir in (run_dir / CHECKPOINT_DIR).iterdir():
        if step_dir.name != "3":
            shutil.rmtree(step_dir)
    assert cli.main([*argv, "--resume"]) == 0
    resumed = metrics(run_dir)
    keys = ("step", "update", "loss", "lr", "reward", "kl_ref")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in records]
    again, _, _ = load_weights(run_dir)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
