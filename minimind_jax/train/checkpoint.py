"""Orbax checkpoints of a training run: saving them, and resuming from one.

A run folder holds `checkpoints/<step>/` (step = global micro-steps done) with three items:
`params` (the param pytree), `train` (optimizer state, step, RNG, skip counters) and `meta`
(JSON: step, loader position {epoch, batch} of the next batch, model config, stage). Orbax
writes each checkpoint into a temporary folder and renames it only once complete, so a crash
mid-save never touches the latest complete checkpoint; the last `keep` are kept.

The read side shared with everything that loads weights (the newest intact checkpoint, damaged
ones skipped with a warning; `restore_params`) is model.run_checkpoint. A save that fails (full
disk, permissions, I/O) becomes one RunFailure line naming the checkpoint, the reason and the
intact checkpoint, after its temporary folder is removed.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from minimind_jax.errors import ENVIRONMENT_ERRNOS, RunFailure, UserError
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.run_checkpoint import (
    CHECKPOINT_DIR,
    TMP_MARKER,
    failure_reason,
    quiet_orbax,
    reader,
    restore_meta,
    restore_newest_intact,
    step_folders,
)

DAMAGED_DIR = "damaged_checkpoints"  # where --resume sets aside damaged checkpoints it skips
CONFIG_FILE = "config.json"


def open_manager(run_dir: str | pathlib.Path, *, keep: int = 3,
                 create: bool = True) -> ocp.CheckpointManager:
    """The CheckpointManager of `run_dir/checkpoints` (async saves, last `keep` kept)."""
    quiet_orbax()
    directory = pathlib.Path(run_dir).absolute() / CHECKPOINT_DIR
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory, options=options)


def set_aside(run_dir: pathlib.Path, steps: list[int]) -> list[pathlib.Path]:
    """Move damaged checkpoints out of `checkpoints/` (to `damaged_checkpoints/`), so that the
    resumed run saves those steps afresh and nothing reads them again; returns the new paths."""
    moved = []
    for step in steps:
        target = run_dir / DAMAGED_DIR / str(step)
        n = 1
        while target.exists():
            target, n = run_dir / DAMAGED_DIR / f"{step}.{n}", n + 1
        target.parent.mkdir(exist_ok=True)
        os.replace(run_dir / CHECKPOINT_DIR / str(step), target)
        moved.append(target)
    return moved


def _remove_temporaries(root: pathlib.Path, settle_s: float = 0.2, limit_s: float = 10.0) -> None:
    """Delete orbax's temporary folders of unfinished saves in `root`. A failed save's other
    write tasks can still be finishing in orbax's thread (only the first error is raised) and
    recreate files, so delete until none has reappeared for `settle_s` (at most `limit_s`)."""
    deadline = time.monotonic() + limit_s
    while root.is_dir():
        left = [path for path in root.iterdir() if TMP_MARKER in path.name]
        for path in left:
            shutil.rmtree(path, ignore_errors=True)
        if not left or time.monotonic() > deadline:
            return
        time.sleep(settle_s)


def _save_failure(root: pathlib.Path, step: int | None, err: Exception) -> Exception:
    """RunFailure for a failed save (after removing its temporary folder), or `err` itself
    when the failure is not the environment's (a bug keeps its traceback)."""
    text = str(err)
    environmental = ("os_error_code=" in text or "RESOURCE_EXHAUSTED" in text
                     or "PERMISSION_DENIED" in text
                     or (isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS))
    if not environmental:
        return err
    named = re.search(r"/(\d+)" + re.escape(TMP_MARKER), text)
    step = int(named.group(1)) if named else step
    _remove_temporaries(root)
    where = root / str(step) if step is not None else root
    return RunFailure(f"saving checkpoint {where} failed: {failure_reason(err)}; "
                      + intact_note(root, but=step))


def intact_note(root: pathlib.Path, but: int | None = None) -> str:
    """Which checkpoint of `root` a resumed run would start from, in words."""
    intact = [s for s in step_folders(root) if s != but]
    if not intact:
        return "no checkpoint of this run is saved"
    return f"the latest complete checkpoint is {root / str(intact[0])} (continue with --resume)"


def finish(manager: ocp.CheckpointManager) -> None:
    """Wait for the pending save and close the manager; a failed save is a RunFailure."""
    try:
        manager.wait_until_finished()
    except Exception as err:
        close(manager)
        raise _save_failure(pathlib.Path(manager.directory), None, err) from None
    manager.close()


def close(manager: ocp.CheckpointManager | None) -> None:
    """Close on an error path: its background work ends here, and its failures (already
    reported, or beside the point of the error being raised) are not raised again."""
    if manager is None:
        return
    with contextlib.suppress(Exception):  # the error being raised is the one to show
        manager.close()
    _remove_temporaries(pathlib.Path(manager.directory))


@contextlib.contextmanager
def _sigint_deferred():
    """Hold a Ctrl-C back until the block ends: interrupting orbax inside its event loop
    leaves its writer threads failing noisily; after the block the save finishes in the
    background and the KeyboardInterrupt unwinds through the usual close."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _train_item(state) -> dict:
    return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng,
            "skipped": state.skipped, "consecutive_skips": state.consecutive_skips}


def save(manager: ocp.CheckpointManager, state, *, epoch: int, batch: int,
         config: ModelConfig, stage: str, **extra_meta) -> int:
    """Start saving `state` (asynchronously) under its step; (epoch, batch) is the next batch.

    Returns the step. Saving the same step twice is a no-op.
    """
    step = int(np.asarray(state.step.addressable_data(0)))
    if step in manager.all_steps():
        return step
    meta = {"step": step, "epoch": int(epoch), "batch": int(batch), "stage": stage,
            "model_config": config.to_dict(), **extra_meta}
    try:
        with _sigint_deferred():
            manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                train=ocp.args.StandardSave(_train_item(state)),
                meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as err:  # this save, or the previous (asynchronous) one, failed
        close(manager)
        raise _save_failure(pathlib.Path(manager.directory), step, err) from None
    return step


def restore_train_state(manager: ocp.CheckpointManager, abstract_state,
                        step: int | None = None) -> tuple[Any, dict]:
    """(state, meta) of `step` (default: the latest), laid out like `abstract_state`.

    `abstract_state` is a TrainState of jax.ShapeDtypeStruct carrying the target shardings.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise UserError(f"no checkpoint to resume from in {manager.directory}")
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_state.params),
        train=ocp.args.StandardRestore(_train_item(abstract_state)),
        meta=ocp.args.JsonRestore()))
    train = restored["train"]
    state = abstract_state.replace(params=restored["params"], **train)
    return state, dict(restored["meta"])


def resume_state(run_dir: pathlib.Path, abstract_state, check_meta: Callable[[dict], None],
                 warn: Callable[[str], None] | None = None) -> tuple[Any, dict, list[int]]:
    """(state, meta, damaged steps) of the newest intact checkpoint of a run, for --resume.

    `check_meta(meta)` may reject a checkpoint with a UserError (e.g. another model shape).
    """
    root = pathlib.Path(run_dir).absolute() / CHECKPOINT_DIR
    if not step_folders(root):
        raise UserError(f"--resume: no checkpoint in {root}")

    def restore(step: int):
        meta = restore_meta(manager, step)
        check_meta(meta)
        return restore_train_state(manager, abstract_state, step)

    with reader(root) as manager:
        (state, meta), _, damaged = restore_newest_intact(root, restore, warn)
    return state, meta, damaged


