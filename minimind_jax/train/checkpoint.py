"""Orbax checkpoints of a training run, and loading weights to start from.

A run folder holds `checkpoints/<step>/` (step = global micro-steps done) with three items:
`params` (the param pytree), `train` (optimizer state, step, RNG, skip counters) and `meta`
(JSON: step, loader position {epoch, batch} of the next batch, model config, stage). Orbax
writes each checkpoint into a temporary folder and renames it only once complete, so a crash
mid-save never touches the latest complete checkpoint; the last `keep` are kept.

Readers take the newest checkpoint that restores: a damaged one (a truncated or missing file,
an empty step folder) is skipped with a one-line warning. A save that fails (full disk,
permissions, I/O) becomes one RunFailure line naming the checkpoint, the reason and the intact
checkpoint, after its temporary folder is removed; orbax's own log lines and tracebacks from
its background threads are not printed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from minimind_jax.errors import ENVIRONMENT_ERRNOS, RunFailure, UserError
from minimind_jax.model.config import ModelConfig

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"  # where --resume sets aside damaged checkpoints it skips
CONFIG_FILE = "config.json"
TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax's suffix of a checkpoint being written


class _DropOrbaxRecords(logging.Filter):
    """Orbax logs its background threads' failures (tracebacks included) through absl; the
    same failures reach us as exceptions, which become one line each."""

    def filter(self, record: logging.LogRecord) -> bool:
        return f"{os.sep}orbax{os.sep}" not in record.pathname


class _DropOrbaxTaskErrors(logging.Filter):
    """asyncio reports an orbax write whose error nobody awaited (a full disk fails every
    parallel write, and orbax raises only the first) when its task or future is collected,
    often at interpreter exit after our error line; the failure already ended the run with one
    line. Such an error is raised in orbax's code, or (tensorstore's futures, no traceback)
    names a file of a checkpoint being written."""

    def filter(self, record: logging.LogRecord) -> bool:
        # "Task ...", "Future ...", "_GatheringFuture exception was never retrieved"
        if not record.getMessage().split("\n", 1)[0].endswith("exception was never retrieved"):
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and TMP_MARKER in str(exc):
            return False
        tb = exc.__traceback__ if exc is not None else None
        while tb is not None:
            if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
                return False
            tb = tb.tb_next
        return True


def _is_closed_loop_callback(exc_type, exc, tb) -> bool:
    """tensorstore's late callback into the event loop of an orbax read that already failed
    (a damaged checkpoint): harmless, and printed by the C++ thread as a bare traceback."""
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (exc_type is RuntimeError and str(exc) == "Event loop is closed" and tb is not None
            and tb.tb_frame.f_code.co_name == "_check_closed")


def _quiet_orbax() -> None:
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropOrbaxRecords) for f in logger.filters):
        logger.addFilter(_DropOrbaxRecords())
    tasks = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropOrbaxTaskErrors) for f in tasks.filters):
        tasks.addFilter(_DropOrbaxTaskErrors())
    hook = sys.unraisablehook  # where pybind11 reports an exception in a C++ callback
    if not getattr(hook, "drops_closed_loop_callbacks", False):
        def unraisablehook(unraisable):
            if not _is_closed_loop_callback(unraisable.exc_type, unraisable.exc_value,
                                            unraisable.exc_traceback):
                hook(unraisable)

        unraisablehook.drops_closed_loop_callbacks = True
        sys.unraisablehook = unraisablehook


def open_manager(run_dir: str | pathlib.Path, *, keep: int = 3,
                 create: bool = True) -> ocp.CheckpointManager:
    """The CheckpointManager of `run_dir/checkpoints` (async saves, last `keep` kept)."""
    _quiet_orbax()
    directory = pathlib.Path(run_dir).absolute() / CHECKPOINT_DIR
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory, options=options)


def _reader(root: pathlib.Path) -> ocp.CheckpointManager:
    """A manager that only reads the checkpoints in `root` (creates and cleans nothing)."""
    _quiet_orbax()
    return ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(
        create=False, read_only=True))


def step_folders(root: pathlib.Path) -> list[int]:
    """Steps of the `<step>/` folders in a checkpoints folder, newest first."""
    if not root.is_dir():
        return []
    return sorted((int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir()),
                  reverse=True)


def _reason(err: BaseException) -> str:
    """One short line saying why an orbax/tensorstore call failed."""
    while err.__cause__ is not None:  # orbax wraps tensorstore's own, clearer error
        err = err.__cause__
    text = str(err.args[0] if isinstance(err, KeyError) and err.args else err).strip()
    code = re.search(r"os_error_code='(\d+)'", text)
    if code:  # tensorstore names the OS error by number at the end of a long message
        return os.strerror(int(code.group(1)))
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    first = text.splitlines()[0] if text else type(err).__name__
    if '": ' in first:  # tensorstore: 'CODE: Error reading "key" in ... file "path": cause'
        first = first.split(": ", 1)[0] + ": " + first.rsplit('": ', 1)[1]
    first = first.split(" [tensorstore_spec=")[0]
    return first if len(first) <= 200 else first[:197] + "..."


def restore_newest_intact(root: pathlib.Path, restore: Callable[[int], Any],
                          warn: Callable[[str], None] | None = None,
                          ) -> tuple[Any, int, list[int]]:
    """(restore(step), step, damaged steps) for the newest step of `root` that restores.

    Steps that fail to restore are skipped with a warning line each; a UserError from
    `restore` (e.g. another model shape) is not damage and propagates. No step, or none
    intact, is a UserError.
    """
    warn = warn or (lambda message: print(message, file=sys.stderr))
    damaged = []
    steps = step_folders(root)
    for step in steps:
        try:
            return restore(step), step, damaged
        except UserError:
            raise
        except Exception as err:  # orbax/tensorstore raise many types for damaged files
            damaged.append(step)
            older = [s for s in steps if s < step]
            warn(f"warning: checkpoint {root / str(step)} is damaged ({_reason(err)}); "
                 + (f"trying the next older one ({older[0]})" if older else "no older one"))
    if not steps:
        raise UserError(f"no checkpoint in {root}")
    raise UserError(f"no intact checkpoint in {root} (damaged: "
                    + ", ".join(map(str, damaged)) + "; see the warnings above)")


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
    return RunFailure(f"saving checkpoint {where} failed: {_reason(err)}; "
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


def restore_meta(manager: ocp.CheckpointManager, step: int | None = None) -> dict:
    """The JSON metadata of checkpoint `step` (default: the latest)."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise UserError(f"no checkpoint in {manager.directory}")
    return dict(manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"])


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

    with _reader(root) as manager:
        (state, meta), _, damaged = restore_newest_intact(root, restore, warn)
    return state, meta, damaged


def _locate(path: pathlib.Path) -> tuple[pathlib.Path, list[int]]:
    """(checkpoints folder, steps to try, newest first) for a run folder, a checkpoints folder
    or one step folder (then only that step)."""
    if not path.exists():
        raise UserError(f"checkpoint folder not found: {path}")
    if not path.is_dir():
        raise UserError(f"{path} is a file, not a checkpoint folder")
    if path.name.isdigit() and (path.parent.name == CHECKPOINT_DIR or (path / "params").is_dir()):
        return path.parent, [int(path.name)]
    root = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
    steps = step_folders(root)
    if not steps:
        raise UserError(f"no checkpoint in {path} (expected {CHECKPOINT_DIR}/<step>/ inside)")
    return root, steps


def latest_checkpoint(run_dir: str | pathlib.Path) -> pathlib.Path | None:
    """Folder of the newest checkpoint of a run (intact or not), or None."""
    try:
        root, steps = _locate(pathlib.Path(run_dir))
    except UserError:
        return None
    return root / str(steps[0])


def restore_params(path: str | pathlib.Path, warn: Callable[[str], None] | None = None
                   ) -> tuple[dict, ModelConfig, str]:
    """(params, ModelConfig, the checkpoint folder read) from a run folder (its newest intact
    checkpoint, skipping damaged ones with a warning) or a checkpoint folder: the orbax
    primitive of `model.weights.load_weights`, which callers use.

    Params come back whole on this process's first device, whatever layout (replicated or
    FSDP-sharded) they were saved in.
    """
    from minimind_jax.model.transformer import init_params

    root, steps = _locate(pathlib.Path(path).absolute())
    # This process's own device: jax.devices()[0] belongs to process 0 in multi-process
    # runs, where every process restores the whole params (e.g. sft's starting weights).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def restore(step: int):
        meta = restore_meta(manager, step)
        try:
            config = ModelConfig.from_dict(meta["model_config"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"unreadable model config in meta: {err}") from None
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
            jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0))))
        params = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract)))["params"]
        return params, config

    if warn is None and jax.process_index() != 0:
        warn = lambda message: None  # noqa: E731 -- process 0 speaks for all
    with _reader(root) as manager:
        if len(steps) == 1:  # one checkpoint named: its own error, no fallback
            try:
                return *restore(steps[0]), str(root / str(steps[0]))
            except UserError:
                raise
            except Exception as err:
                raise UserError(f"checkpoint {root / str(steps[0])} is damaged: "
                                f"{_reason(err)}") from None
        (params, config), step, _ = restore_newest_intact(root, restore, warn)
    return params, config, str(root / str(step))

