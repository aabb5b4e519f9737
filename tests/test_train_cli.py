"""`pretrain` then `sft` end to end from the CLI on the small fixture JSONL files."""

import json

import jax
import numpy as np
import pytest
import torch

from minimind_jax import cli, train
from minimind_jax.data.batches import Loader
from minimind_jax.data.rows import open_source
from minimind_jax.errors import UserError
from minimind_jax.model import run_checkpoint
from minimind_jax.model.config import arch_defaults
from minimind_jax.model.loss import masked_cross_entropy
from minimind_jax.model.transformer import MiniMind
from minimind_jax.model.weights import load_weights
from minimind_jax.train import DataConfig, OptimConfig, RunConfig, TrainConfig, checkpoint
from tests.helpers import (
    MINIMIND3_TOKENIZER_DIR,
    PRETRAIN_JSONL,
    SFT_JSONL,
    TINY_CONFIG,
    TINY_MINIMIND3_FLAGS,
    TINY_SHAPE,
    TOKENIZER_DIR,
    golden_state_dict,
    metrics,
    tiny_run_argv,
)


def tiny_run(tmp_path, command, *extra):
    """A tiny `command` run in tmp_path/out (cache tmp_path/cache) on the fixture data."""
    return tiny_run_argv(command, tmp_path / "out", tmp_path / "cache", *extra)


def test_pretrain_then_sft_restores_the_pretrain_weights(tmp_path, capsys):
    code = cli.main(tiny_run(tmp_path, "pretrain", "--batch_size", "8", "--accumulation_steps",
                             "2", "--max_steps", "6", "--save_interval", "4",
                             "--log_interval", "1"))
    out = capsys.readouterr().out
    assert code == 0
    run_dir = tmp_path / "out" / "pretrain_64"
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 192 + 2 * 64  # attention, SwiGLU, norms
    n_params = 6400 * 64 + 2 * per_layer + 64
    assert f"model parameters: {n_params / 1e6:.3f} M ({n_params:,})" in out
    assert "Epoch:[1/1](0/10) loss:" in out and "Epoch:[1/1](5/10) loss:" in out
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["4", "6"]
    assert json.loads((run_dir / "config.json").read_text())["dim"] == 64
    assert list((run_dir / "tb").iterdir()), "no TensorBoard events"
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()
    pre = metrics(run_dir)
    assert [r["step"] for r in pre] == list(range(6))
    assert pre[0]["loss"] == pytest.approx(np.log(6400), abs=0.3)  # random init: ~uniform
    assert [r["update"] for r in pre] == [0, 1, 1, 2, 2, 3]
    for key in ("epoch", "loss", "aux", "lr", "tokens_per_sec", "elapsed_s"):
        assert all(key in r for r in pre), key
    assert all("grad_norm" in r for r in pre[1::2])

    code = cli.main(tiny_run(tmp_path, "sft", "--batch_size", "4", "--max_steps", "3",
                             "--log_interval", "1"))
    out = capsys.readouterr().out
    assert code == 0
    assert f"initial weights: {run_dir / 'checkpoints' / '6'}" in out
    sft = metrics(tmp_path / "out" / "full_sft_64")
    assert len(sft) == 3

    # The first SFT loss is the loss of the final pretrain weights on the first SFT batch.
    params, config, _ = load_weights(run_dir)
    source = open_source(SFT_JSONL, str(TOKENIZER_DIR), "sft", 64,
                         cache_dir=tmp_path / "cache")
    first = next(Loader(source, 4, shuffle=True, seed=1337).epoch(0))
    logits, _ = MiniMind(config).apply({"params": params}, first["input_ids"])
    expected = float(masked_cross_entropy(logits, first["labels"], first["loss_mask"]))
    assert sft[0]["loss"] == pytest.approx(expected, abs=1e-5)


def test_sft_without_pretrain_checkpoint_names_the_missing_path(tmp_path, capsys):
    code = cli.main(tiny_run(tmp_path, "sft", "--max_steps", "1"))
    err = capsys.readouterr().err
    assert code != 0
    assert str(tmp_path / "out" / "pretrain_64") in err
    assert not (tmp_path / "out" / "full_sft_64" / "checkpoints").exists() or not any(
        (tmp_path / "out" / "full_sft_64" / "checkpoints").iterdir())


def test_init_from_torch_pth(tmp_path, golden):
    pth = tmp_path / "pretrain_64.pth"
    torch.save({k: torch.from_numpy(np.array(v))
                for k, v in golden_state_dict(golden, "dense/init/").items()}, pth)
    code = cli.main(tiny_run(tmp_path, "pretrain", "--init_from", str(pth), "--batch_size", "4",
                             "--accumulation_steps", "2", "--no_shuffle", "--lr_schedule",
                             "minimind2", "--max_steps", "3", "--log_interval", "1"))
    assert code == 0
    losses = [r["loss"] for r in metrics(tmp_path / "out" / "pretrain_64")]
    # The reference's first loss (same weights, same first batch) -- the .pth was really used.
    assert losses[0] == pytest.approx(float(golden["dense/pretrain_loss"][0]), abs=1e-4)


def test_init_from_errors_list_the_problem(tmp_path, golden, capsys):
    missing = tmp_path / "nope.pth"
    assert cli.main(tiny_run(tmp_path, "pretrain", "--init_from", str(missing),
                             "--max_steps", "1")) == 2
    assert str(missing) in capsys.readouterr().err

    wrong = tmp_path / "wrong.npz"
    sd = golden_state_dict(golden, "dense/init/")
    del sd["norm.weight"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    np.savez(wrong, **sd)
    assert cli.main(tiny_run(tmp_path, "pretrain", "--init_from", str(wrong), "--n_layers", "3",
                             "--max_steps", "1")) == 2
    err = capsys.readouterr().err
    assert "norm.weight" in err and "extra.weight" in err and "layers.2.attention.wq" in err
    assert "Traceback" not in err


def test_many_non_finite_steps_in_a_row_stop_with_a_checkpoint(tmp_path, capsys):
    code = cli.main(tiny_run(tmp_path, "pretrain", "--batch_size", "4", "--accumulation_steps",
                             "1", "--learning_rate", "1e38", "--max_consecutive_skips", "3",
                             "--log_interval", "1"))
    err = capsys.readouterr().err
    assert code == 2
    assert "3 micro-steps in a row" in err
    run_dir = tmp_path / "out" / "pretrain_64"
    # The first update blows the weights up; every later gradient is non-finite and skipped.
    logged = metrics(run_dir)
    assert [r.get("skipped", 0) for r in logged] in ([0, 1, 2, 3], [0, 1, 2, 3, 4])
    assert run_checkpoint.latest_checkpoint(run_dir) is not None
    params, _, _ = load_weights(run_dir)  # saved without the skipped steps' effects
    assert all(bool(np.all(np.isfinite(x))) for x in jax.tree.leaves(params))
    manager = checkpoint.open_manager(run_dir, create=False)
    assert run_checkpoint.restore_meta(manager)["elapsed_s"] > 0  # saved like every checkpoint
    checkpoint.close(manager)


# (recipe, the command's extra flags, the model of the Python config, its tokenizer)
RECIPE_RUNS = {
    None: ([], TINY_CONFIG, TOKENIZER_DIR),
    "minimind2": (["--recipe", "minimind2"], TINY_CONFIG, TOKENIZER_DIR),
    "minimind3": ([*TINY_MINIMIND3_FLAGS, "--tokenizer", str(MINIMIND3_TOKENIZER_DIR)],
                  arch_defaults("minimind3").replace(**TINY_SHAPE, max_seq_len=64,
                                                     dtype="float32"), MINIMIND3_TOKENIZER_DIR),
}


@pytest.mark.parametrize("recipe", list(RECIPE_RUNS))
def test_training_from_python_matches_the_command(tmp_path, capsys, recipe):
    """`train.run(TrainConfig(recipe=...))` is the `pretrain --recipe ...` command without the
    flags: the recipe's data order, schedule and seed, and the stage's defaults (accumulation,
    learning rate) reach both the same way."""
    flags, model, tokenizer = RECIPE_RUNS[recipe]
    assert cli.main(tiny_run(tmp_path, "pretrain", "--batch_size", "4", "--max_steps", "3",
                             "--log_interval", "1", *flags)) == 0
    from_cli = metrics(tmp_path / "out" / "pretrain_64")
    config = TrainConfig(
        model=model, vocab_from_tokenizer=True, recipe=recipe,
        data=DataConfig(data_path=str(PRETRAIN_JSONL), tokenizer=str(tokenizer),
                        batch_size=4, cache_dir=str(tmp_path / "cache")),
        optim=OptimConfig(max_steps=3),
        run=RunConfig(out_dir=str(tmp_path / "py"), log_interval=1))
    assert train.run(config, "pretrain") == 0
    capsys.readouterr()
    run_dir = tmp_path / "py" / "pretrain_64"
    from_python = metrics(run_dir)
    keys = ("step", "update", "loss", "aux", "lr", "grad_norm")
    assert len(from_python) == 3
    assert [{k: r.get(k) for k in keys} for r in from_python] == \
        [{k: r.get(k) for k in keys} for r in from_cli]
    recorded = json.loads((run_dir / "train_args.json").read_text())
    assert recorded["optim"]["learning_rate"] == 5e-4 and recorded["model"]["dim"] == 64
    assert recorded["optim"]["accumulation_steps"] == 8  # pretrain's, as the command's
    assert recorded["recipe"]["name"] == recipe


def test_training_from_python_checks_its_numbers_first(tmp_path):
    config = TrainConfig(model=arch_defaults("minimind2"),
                         data=DataConfig(data_path=str(PRETRAIN_JSONL), batch_size=0),
                         optim=OptimConfig(learning_rate=1e-3),
                         run=RunConfig(out_dir=str(tmp_path / "out")))
    with pytest.raises(UserError, match="^--batch_size must be >= 1, got 0$"):
        train.run(config, "pretrain")
    assert not (tmp_path / "out").exists()


def test_help_explains_every_flag(capsys):
    for command in ("pretrain", "sft"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = capsys.readouterr().out
        for flag in ("--out_dir", "--epochs", "--batch_size", "--learning_rate", "--dtype",
                     "--accumulation_steps", "--grad_clip", "--warmup_iters", "--log_interval",
                     "--save_interval", "--dim", "--n_layers", "--max_seq_len", "--use_moe",
                     "--data_path", "--tokenizer", "--n_heads", "--n_kv_heads", "--seed",
                     "--no_shuffle", "--lr_schedule", "--weight_decay", "--init_from",
                     "--resume", "--pack", "--pack_window", "--max_steps"):
            assert flag in text, (command, flag)
