"""Reading a training run's orbax checkpoints: the params and model config of its newest
intact checkpoint (`restore_params`, under `model.weights.load_weights`), and the pieces the
writer (train.checkpoint) shares.

A run folder holds `checkpoints/<step>/` with the items `params`, `train` and `meta` (JSON,
with the model config); train.checkpoint describes the layout and writes it. Readers take the
newest checkpoint that restores: a damaged one (a truncated or missing file, an empty step
folder) is skipped with a one-line warning; orbax's own log lines and tracebacks from its
background threads are not printed.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import sys
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

from minimind_jax.errors import UserError
from minimind_jax.model.config import ModelConfig

CHECKPOINT_DIR = "checkpoints"
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


def quiet_orbax() -> None:
    """Install the filters above once per process (every manager calls it)."""
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


def reader(root: pathlib.Path) -> ocp.CheckpointManager:
    """A manager that only reads the checkpoints in `root` (creates and cleans nothing)."""
    quiet_orbax()
    return ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(
        create=False, read_only=True))


def step_folders(root: pathlib.Path) -> list[int]:
    """Steps of the `<step>/` folders in a checkpoints folder, newest first."""
    if not root.is_dir():
        return []
    return sorted((int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir()),
                  reverse=True)


def failure_reason(err: BaseException) -> str:
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
            warn(f"warning: checkpoint {root / str(step)} is damaged ({failure_reason(err)}); "
                 + (f"trying the next older one ({older[0]})" if older else "no older one"))
    if not steps:
        raise UserError(f"no checkpoint in {root}")
    raise UserError(f"no intact checkpoint in {root} (damaged: "
                    + ", ".join(map(str, damaged)) + "; see the warnings above)")


def restore_meta(manager: ocp.CheckpointManager, step: int | None = None) -> dict:
    """The JSON metadata of checkpoint `step` (default: the latest)."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise UserError(f"no checkpoint in {manager.directory}")
    return dict(manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"])


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


def _as_saved(step_dir: pathlib.Path, sharding) -> Any:
    """The shapes and dtypes of a checkpoint's params tree as saved (any tree: PPO's actor and
    critic) on `sharding`: a restore target that works whatever devices it was saved from."""
    saved = ocp.StandardCheckpointHandler().metadata(step_dir / "params")
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                          sharding=sharding), saved)


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
        if path := meta.get("lm_params_at"):  # e.g. PPO's {"actor": LM, "critic": ...}
            params = manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_as_saved(root / str(step), device))))["params"]
            for key in path:
                params = params[key]
            return params, config
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
            jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0))))
        params = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract)))["params"]
        return params, config

    if warn is None and jax.process_index() != 0:
        warn = lambda message: None  # noqa: E731 -- process 0 speaks for all
    with reader(root) as manager:
        if len(steps) == 1:  # one checkpoint named: its own error, no fallback
            try:
                return *restore(steps[0]), str(root / str(steps[0]))
            except UserError:
                raise
            except Exception as err:
                raise UserError(f"checkpoint {root / str(steps[0])} is damaged: "
                                f"{failure_reason(err)}") from None
        (params, config), step, _ = restore_newest_intact(root, restore, warn)
    return params, config, str(root / str(step))

