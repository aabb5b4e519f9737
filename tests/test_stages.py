"""Stages as one table: every stage run from Python (`train.run(TrainConfig(...), name)`) is its
command's run (the same run folder, the same logged records), under no recipe and both
generations' recipes; and a stage's batch producer feeds the step batches made from the
current train state."""

import dataclasses
import shutil

import jax
import numpy as np
import pytest

from minimind_jax import train
from minimind_jax.model.config import arch_defaults
from minimind_jax.train import stages
from minimind_jax.train.stages.stage import Objective
from tests.helpers import (
    FIXTURES,
    MINIMIND3_TOKENIZER_DIR,
    PRETRAIN_JSONL,
    SFT_JSONL,
    TINY_FLAGS,
    TINY_SHAPE,
    TOKENIZER_DIR,
    metrics,
    run_command,
)

DATA = {"pretrain": PRETRAIN_JSONL, "dpo": FIXTURES / "post" / "dpo_pairs.jsonl",
        "grpo": FIXTURES / "rl" / "rlaif.jsonl", "ppo": FIXTURES / "rl" / "rlaif.jsonl"}
# each stage's own options, as flags and as the Python side gives them (the teacher: below)
OPTIONS = {"grpo": dict(reward_model_path="none", max_gen_len=6, num_generations=2),
           "ppo": dict(reward_model_path="none", max_gen_len=6, mini_batch_size=1)}
# (recipe, arch): ours on either generation, and each reference's recipe
COMBOS = [(None, "minimind2"), ("minimind2", "minimind2"), (None, "minimind3"),
          ("minimind3", "minimind3")]
STEPS = 2
TIMING = ("time", "per_s", "elapsed", "eta", "mfu")


def _tokenizer(arch: str):
    return MINIMIND3_TOKENIZER_DIR if arch == "minimind3" else TOKENIZER_DIR


@pytest.fixture(scope="module")
def start_weights(tmp_path_factory):
    """arch -> a tiny pretrained run folder: every stage's start weights and the teacher."""
    found = {}
    for arch in ("minimind2", "minimind3"):
        base = tmp_path_factory.mktemp(f"start_{arch}")
        run_command(["pretrain", "--data_path", PRETRAIN_JSONL, "--tokenizer", _tokenizer(arch),
                     "--out_dir", base, "--cache_dir", base / "cache", *TINY_FLAGS, "--arch",
                     arch, "--max_steps", "1", "--batch_size", "2"])
        found[arch] = base / "pretrain_64"
    return found


def _prepare(out_dir, stage, arch: str, start_run) -> None:
    """The stage's start weights where its command looks for them (none: a random init)."""
    out_dir.mkdir()
    if stage.start_from is not None:
        shutil.copytree(start_run, out_dir / f"{stage.start_from[arch]}_64")


def _records(run_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)}
            for r in metrics(run_dir)]


@pytest.mark.slow
@pytest.mark.parametrize("recipe, arch", COMBOS)
@pytest.mark.parametrize("name", list(stages.STAGES))
def test_a_stage_from_python_is_its_command(tmp_path, start_weights, name, recipe, arch):
    data = DATA.get(name, SFT_JSONL)
    teacher = start_weights[arch]
    by_command, by_python = tmp_path / "command", tmp_path / "python"
    stage = stages.named(name)
    for out_dir in (by_command, by_python):
        _prepare(out_dir, stage, arch, start_weights[arch])
    before = {p.name for p in by_command.iterdir()}
    run_command([name, "--data_path", data, "--tokenizer", _tokenizer(arch), "--out_dir",
                 by_command, "--cache_dir", tmp_path / "cache", *TINY_FLAGS, "--arch", arch,
                 "--max_steps", STEPS, "--batch_size", "2", "--log_interval", "1",
                 *(["--recipe", recipe] if recipe else []),
                 *(["--teacher", teacher] if name == "distill" else []),
                 *[f for k, v in OPTIONS.get(name, {}).items() for f in (f"--{k}", v)]])
    if name == "distill":
        stage = stage.with_options(teacher=str(teacher))
    if name in OPTIONS:
        stage = stage.with_options(**OPTIONS[name])
    config = train.TrainConfig(
        model=arch_defaults(arch).replace(**TINY_SHAPE, max_seq_len=64, dtype="float32"),
        data=train.DataConfig(data_path=str(data), tokenizer=str(_tokenizer(arch)),
                              batch_size=2, cache_dir=str(tmp_path / "cache")),
        optim=train.OptimConfig(max_steps=STEPS), run=train.RunConfig(out_dir=str(by_python),
                                                                      log_interval=1),
        recipe=recipe, vocab_from_tokenizer=True)
    assert train.run(config, stage if stage.options is not None else name) == 0
    made = {p.name for p in by_command.iterdir()} - before
    assert made == {p.name for p in by_python.iterdir()} - before
    assert len(made) == 1 and made.pop().endswith("_64")
    run_name = ({p.name for p in by_python.iterdir()} - before).pop()
    expected = stage.defaults_for(arch)["run_prefix"] + "_64"
    assert run_name == expected
    ours, theirs = _records(by_python / run_name), _records(by_command / run_name)
    assert [r["step"] for r in ours] == list(range(STEPS))
    assert ours == theirs


def test_a_batch_producer_sees_the_current_state(tmp_path):
    """A trivial producer: each step's batch is made from the state the previous step left
    (it records the step counter and the params it saw) and the step trains on what it
    returns (at step 1 it masks out every target: that step's loss is 0)."""
    seen = []

    def produce(state, batch, info):
        seen.append((int(np.asarray(state.step)), info["step"],
                     sum(float(np.asarray(x).sum()) for x in jax.tree.leaves(state.params))))
        if info["step"] == 1:
            batch = {**batch, "loss_mask": np.zeros_like(batch["loss_mask"])}
        return batch

    stage = dataclasses.replace(stages.named("sft"), start_from=None,
                                objective=lambda context: Objective(produce=produce))
    config = train.TrainConfig(
        model=arch_defaults("minimind2").replace(**TINY_SHAPE, max_seq_len=64,
                                                 dtype="float32"),
        data=train.DataConfig(data_path=str(SFT_JSONL), tokenizer=str(TOKENIZER_DIR),
                              batch_size=2, cache_dir=str(tmp_path / "cache")),
        optim=train.OptimConfig(max_steps=3, learning_rate=1e-2),
        run=train.RunConfig(out_dir=str(tmp_path), log_interval=1), vocab_from_tokenizer=True)
    assert train.run(config, stage) == 0
    assert [s[:2] for s in seen] == [(0, 0), (1, 1), (2, 2)]
    sums = [s[2] for s in seen]
    assert sums[0] != sums[1] != sums[2]  # the params each step left behind
    losses = [r["loss"] for r in metrics(tmp_path / "full_sft_64")]
    assert losses[1] == 0.0 and losses[0] > 0 and losses[2] > 0
