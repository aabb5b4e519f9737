"""Experiment trackers for real, offline (TensorBoard, wandb, SwanLab): the recorded history
equals metrics.jsonl, a resumed run continues the same tracker run, and a missing package is a
clear error."""

import json
import sys

import numpy as np
import pytest

from minimind_jax import cli
from minimind_jax.train import flags, tracking
from minimind_jax.train.stages import STAGES
from minimind_jax.train.train_config import resolve_settings
from tests.helpers import PRETRAIN_JSONL, TINY_FLAGS, TOKENIZER_DIR
from tests.tracker_logs import run_ids, swanlab_history, tensorboard_history, wandb_history

TINY = [*TINY_FLAGS, "--tokenizer", str(TOKENIZER_DIR), "--data_path", str(PRETRAIN_JSONL),
        "--batch_size", "8", "--accumulation_steps", "1", "--log_interval", "1", "--eval_data",
        str(PRETRAIN_JSONL), "--eval_batches", "2"]
OFFLINE = {"wandb": ("WANDB_MODE", "offline"), "swanlab": ("SWANLAB_MODE", "offline")}
HISTORY = {"wandb": wandb_history, "swanlab": swanlab_history,
           "tensorboard": lambda run_dir: tensorboard_history(run_dir / "tb")}
FLAGS = {"wandb": ["--use_wandb", "--wandb_project", "minimind-jax-test"],
         "swanlab": ["--tracker", "swanlab", "--wandb_project", "minimind-jax-test"],
         "tensorboard": []}
# the package that reads the records back: tensorboardX's protobuf classes for our event files
READER = {"wandb": "wandb", "swanlab": "swanlab", "tensorboard": "tensorboardX"}


def test_tracker_choice_and_run_name():
    parse = cli.build_parser().parse_args

    def kind(argv):
        args = parse(argv)
        return tracking.tracker_kind(args.tracker, args.use_wandb)

    assert kind(["pretrain"]) == "tensorboard"
    assert kind(["pretrain", "--use_wandb"]) == "wandb"
    assert kind(["sft", "--use_wandb", "--tracker", "swanlab"]) == "swanlab"
    sft = STAGES["sft"]
    settings = resolve_settings(flags.settings_from_args(parse(["sft"])),
                                sft.defaults_for("minimind2"))
    optim = settings["optim"]  # as the run resolves them before it opens the tracker
    assert tracking.run_name(sft.tracker_project, optim.epochs, settings["data"].batch_size,
                             optim.learning_rate) == \
        "MiniMind-Full-SFT-Epoch-1-BatchSize-32-LearningRate-5e-05"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["wandb", "swanlab", "tensorboard"])
def test_offline_run_records_the_logged_losses_and_resumes_the_same_run(kind, tmp_path,
                                                                        monkeypatch):
    pytest.importorskip(READER[kind])
    if kind in OFFLINE:
        monkeypatch.setenv(*OFFLINE[kind])
    monkeypatch.setenv("WANDB_SILENT", "true")
    common = ["pretrain", "--out_dir", str(tmp_path / "out"), "--cache_dir",
              str(tmp_path / "cache"), *TINY, *FLAGS[kind]]
    assert cli.main([*common, "--max_steps", "3", "--save_interval", "2",
                     "--eval_interval", "2"]) == 0
    assert cli.main([*common, "--max_steps", "5", "--resume", "--eval_interval", "2"]) == 0

    run_dir = tmp_path / "out" / "pretrain_64"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    history = HISTORY[kind](run_dir)
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert sorted(losses) == [0, 1, 2, 3, 4] and sorted(evals) == [2, 3, 4, 5]  # 3, 5: ends
    if kind == "tensorboard":  # float32 values; the resume's purge at its first step (3) also
        # drops the first run's closing eval at step 3 (metrics.jsonl keeps it)
        losses, lrs, evals = ({s: np.float32(v) for s, v in d.items()}
                              for d in (losses, lrs, evals))
        del evals[3]
    assert history["train/loss"] == losses
    assert history["train/lr"] == lrs
    assert history["eval/loss"] == evals
    if kind in OFFLINE:  # an external tracker: the resumed run continued the same run
        saved = json.loads((run_dir / tracking.STATE_FILE).read_text())
        ids = run_ids(run_dir, kind)
        assert saved["kind"] == kind and len(ids) == 2 and set(ids) == {saved["id"]}


def test_missing_package_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    code = cli.main(["pretrain", "--out_dir", str(tmp_path / "out"), "--cache_dir",
                     str(tmp_path / "cache"), *TINY, "--max_steps", "1", "--use_wandb"])
    assert code == 2
    assert "pip install 'minimind_jax[wandb]'" in capsys.readouterr().err
