"""Orbax checkpoints of a training run, and loading weights to start from.

A run folder holds `checkpoints/<step>/` (step = global micro-steps done) with three items:
`params` (the param pytree), `train` (optimizer state, step, RNG, skip counters) and `meta`
(JSON: step, loader position {epoch, batch} of the next batch, model config, stage). Orbax
writes each checkpoint into a temporary folder and renames it only once complete, so a crash
mid-save never touches the latest complete checkpoint; the last `keep` are kept.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from minimind_jax.config import ModelConfig
from minimind_jax.errors import UserError

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"


def open_manager(run_dir: str | pathlib.Path, *, keep: int = 3,
                 create: bool = True) -> ocp.CheckpointManager:
    """The CheckpointManager of `run_dir/checkpoints` (async saves, last `keep` kept)."""
    directory = pathlib.Path(run_dir).absolute() / CHECKPOINT_DIR
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory, options=options)


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
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        train=ocp.args.StandardSave(_train_item(state)),
        meta=ocp.args.JsonSave(meta)), force=True)
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


def _locate(path: pathlib.Path) -> tuple[pathlib.Path, int]:
    """(checkpoints folder, step) for a run folder, a checkpoints folder or a step folder."""
    if not path.is_dir():
        raise UserError(f"checkpoint folder not found: {path}")
    if (path / "params").is_dir() and path.name.isdigit():
        return path.parent, int(path.name)
    root = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
    steps = [int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "params").is_dir()]
    if not steps:
        raise UserError(f"no complete checkpoint in {path} (expected {CHECKPOINT_DIR}/<step>/ "
                        "with params/ inside)")
    return root, max(steps)


def latest_checkpoint(run_dir: str | pathlib.Path) -> pathlib.Path | None:
    """Folder of the latest complete checkpoint of a run, or None."""
    try:
        root, step = _locate(pathlib.Path(run_dir))
    except UserError:
        return None
    return root / str(step)


def restore_params(path: str | pathlib.Path) -> tuple[dict, ModelConfig]:
    """(params, ModelConfig) from a run folder (its latest checkpoint) or a checkpoint folder.

    Params come back whole on this process's first device, whatever layout (replicated or
    FSDP-sharded) they were saved in.
    """
    root, step = _locate(pathlib.Path(path).absolute())
    with ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(
            create=False)) as manager:
        meta = restore_meta(manager, step)
        try:
            config = ModelConfig.from_dict(meta["model_config"])
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{root / str(step)}: unreadable model config in meta: {err}"
                            ) from None
        from minimind_jax.model import init_params

        # This process's own device: jax.devices()[0] belongs to process 0 in multi-process
        # runs, where every process restores the whole params (e.g. sft's starting weights).
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
            jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0))))
        params = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract)))["params"]
    return params, config


def load_init_params(path: str | pathlib.Path, config: ModelConfig) -> dict:
    """Weights to start training from: an orbax run/checkpoint folder, .pth, .safetensors, .npz.

    They must fit `config` exactly (reference keys and shapes); otherwise a UserError lists the
    missing, unexpected and mis-shaped keys. Never falls back to a random init.
    """
    from minimind_jax import convert

    path = pathlib.Path(path)
    if not path.exists():
        raise UserError(f"--init_from: {path} does not exist")
    if path.is_dir():
        params, saved_config = restore_params(path)
        state_dict = convert.state_dict_from_params(params, saved_config)
    else:
        state_dict = convert.load_state_dict(path)
    params = convert.params_from_state_dict(state_dict, config, source=str(path))
    return jax.tree.map(np.asarray, params)
