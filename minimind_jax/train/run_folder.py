"""The run folder `{out_dir}/{prefix}_{dim}[_moe]/`: who owns it (the lock), what an earlier
run left in it, the files a run writes beside its checkpoints, and write failures reported as
such."""

from __future__ import annotations

import contextlib
import json
import pathlib
import shutil

from minimind_jax.errors import ENVIRONMENT_ERRNOS, RunFailure, UserError, os_error_line
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.run_checkpoint import CHECKPOINT_DIR, latest_checkpoint, step_folders
from minimind_jax.runtime import distributed
from minimind_jax.train import checkpoint, run_lock
from minimind_jax.train.train_config import RunConfig, TrainConfig


def run_dir_for(out_dir: str, run_prefix: str, config: ModelConfig) -> pathlib.Path:
    """OUT_DIR/{run_prefix}_{dim}[_moe]: the reference's weight-file name, as a folder."""
    return pathlib.Path(out_dir) / f"{run_prefix}_{config.tag}"


def saved_weights(out_dir: str, name: str) -> pathlib.Path | None:
    """The weights a run saved under `name` (e.g. `full_sft_512`): our run folder OUT_DIR/NAME
    when it holds a checkpoint, else the reference's OUT_DIR/NAME.pth; None if neither."""
    folder = pathlib.Path(out_dir) / name
    if folder.is_dir() and latest_checkpoint(folder) is not None:
        return folder
    file = folder.with_name(name + ".pth")
    return file if file.is_file() else None


def find_saved_weights(out_dir: str, name: str, what: str) -> pathlib.Path:
    """`saved_weights`, or UserError saying what `what` needs and how to make or pass it."""
    found = saved_weights(out_dir, name)
    if found is not None:
        return found
    folder = pathlib.Path(out_dir) / name
    raise UserError(f"{what}, but neither {folder} (a run folder with a checkpoint) nor "
                    f"{folder}.pth exists: train them first with the same --out_dir and model "
                    "flags, or pass --init_from (a run folder, .pth, .safetensors or .npz)")


def write_run_files(run_dir: pathlib.Path, model: ModelConfig, config: TrainConfig,
                     tokenizer_dir: pathlib.Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / checkpoint.CONFIG_FILE).write_text(model.to_json() + "\n")
    (run_dir / "train_args.json").write_text(json.dumps(config.record(), indent=2, default=str)
                                             + "\n")
    target = run_dir / "tokenizer"
    if tokenizer_dir.resolve() != target.resolve():
        if tokenizer_dir.is_dir():
            shutil.copytree(tokenizer_dir, target, dirs_exist_ok=True)
        else:
            target.mkdir(exist_ok=True)
            shutil.copy2(tokenizer_dir, target / tokenizer_dir.name)


@contextlib.contextmanager
def write_failures(run_dir: pathlib.Path):
    """An environment error writing a run file (disk full, ...) becomes a RunFailure that says
    so, and which checkpoints are intact."""
    try:
        yield
    except OSError as err:
        if err.errno not in ENVIRONMENT_ERRNOS:
            raise
        raise RunFailure(f"writing {os_error_line(err)}; "
                         + checkpoint.intact_note(run_dir / CHECKPOINT_DIR)
                         ) from None


@contextlib.contextmanager
def own(run_dir: pathlib.Path):
    """Process 0 holds the run folder's lock for the block; every process stops with the
    same error when it is in use."""
    with contextlib.ExitStack() as stack:
        refused = None
        if distributed.is_main_process():
            try:
                stack.enter_context(run_lock.hold(run_dir))
            except UserError as err:
                refused = err
        if not distributed.agree(refused is None):
            raise refused or UserError(f"run folder {run_dir} is in use (see process 0)")
        yield


def previous_run(run_dir: pathlib.Path) -> str | None:
    """What an earlier run left in `run_dir` that starting afresh would delete, if anything."""
    steps = step_folders(run_dir / CHECKPOINT_DIR)
    if steps:
        return f"checkpoints up to step {steps[0]}"
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        return "metrics.jsonl of a run without checkpoints"
    return None


def check_start(run: RunConfig, run_dir: pathlib.Path) -> str | None:
    """Refuse --resume without a checkpoint, and a fresh start over an earlier run without
    --overwrite; returns what that earlier run left (`previous_run`)."""
    previous = previous_run(run_dir)
    if run.resume and not step_folders(run_dir / CHECKPOINT_DIR):
        raise UserError(f"--resume: no checkpoint in {run_dir / CHECKPOINT_DIR}")
    if not run.resume and previous and not run.overwrite:
        raise UserError(f"{run_dir} already holds a run ({previous}): pass --resume to "
                        "continue it, or --overwrite to delete its checkpoints, metrics and "
                        "TensorBoard events and start over")
    return previous
