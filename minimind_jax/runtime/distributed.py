"""Joining a multi-process (multi-host) run on JAX's own distributed runtime.

Every process runs the same command. Under SLURM (`srun`), Open MPI, a Cloud TPU pod or a
Kubernetes JobSet, jax detects the process count, rank and coordinator itself; anywhere else
pass `--coordinator_address HOST:PORT --num_processes N --process_id I` on each process. After
`initialize`, `jax.devices()` lists the devices of all processes and one mesh spans them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import warnings

import jax

from minimind_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """jax.distributed's explicit settings (None: auto-detected) and the parameter layout."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    fsdp: bool = False  # shard params and optimizer state instead of replicating them


def _device_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from None


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """The multi-process flags (all optional; none needed where jax detects the cluster)."""
    g = parser.add_argument_group(
        "multi-host (jax.distributed; auto-detected under SLURM, Open MPI, TPU pods)")
    g.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                   help="address of process 0, where the coordination service listens; the "
                        "same on every process")
    g.add_argument("--num_processes", type=int, default=None,
                   help="number of processes in the run (one per host is typical)")
    g.add_argument("--process_id", type=int, default=None,
                   help="rank of this process, 0 .. num_processes-1 (0 writes logs and metrics)")
    g.add_argument("--local_device_ids", type=_device_ids, default=None, metavar="IDS",
                   help="comma-separated local GPU ids this process uses (default: all; under "
                        "SLURM/Open MPI jax gives each process one GPU)")


def config_from_args(args: argparse.Namespace) -> DistributedConfig:
    """The `add_distributed_args` flags (and --fsdp) of a parsed command line."""
    ids = getattr(args, "local_device_ids", None)
    return DistributedConfig(
        coordinator_address=getattr(args, "coordinator_address", None),
        num_processes=getattr(args, "num_processes", None),
        process_id=getattr(args, "process_id", None),
        local_device_ids=tuple(ids) if ids is not None else None,
        fsdp=bool(getattr(args, "fsdp", False)))


def detected_cluster() -> str | None:
    """Name of the cluster environment jax.distributed would auto-detect, if it runs more than
    one process (a one-task SLURM job or a single TPU VM needs no distributed runtime)."""
    try:
        # jax's own registry of launchers (SLURM, Open MPI, TPU pods, k8s); no public API.
        from jax._src.clusters import ClusterEnv

        environments = ClusterEnv._cluster_types
    except (ImportError, AttributeError):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Kubernetes detected but package missing"
        for env in environments:
            if env.opt_in_only_method or not env.is_env_present():
                continue
            # The first present environment is the one jax.distributed.initialize() would use.
            name = env.name or env.__name__
            try:
                count = env.get_process_count()
            except Exception as err:  # e.g. a Kubernetes pod outside a JobSet
                raise UserError(f"jax detected a {name} environment but cannot read its "
                                f"process count ({err}); pass --num_processes 1 to train in this "
                                "process alone, or --coordinator_address, --num_processes and "
                                "--process_id") from None
            return name if count > 1 else None
    return None


def initialize(settings: DistributedConfig) -> bool:
    """Start jax.distributed if this run has several processes; True when it does.

    `settings` holds the explicit values (None = unset).
    Explicit flags win (`--num_processes 1` alone keeps the process on its own); otherwise
    jax's auto-detection decides. Must run before any other JAX call of the process (those
    initialise the single-process backend). A no-op when jax's distributed runtime is up.
    """
    if jax.distributed.is_initialized():
        return True
    explicit = {name: getattr(settings, name) for name in
                ("coordinator_address", "num_processes", "process_id", "local_device_ids")}
    explicit = {name: list(value) if isinstance(value, tuple) else value
                for name, value in explicit.items() if value is not None}
    if explicit.get("num_processes") == 1 and explicit.get("process_id", 0) == 0 \
            and "coordinator_address" not in explicit:
        return False  # asked to stay single-process, whatever the environment says
    if not explicit and detected_cluster() is None:
        return False
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        # CPU devices of different processes talk over gloo (TCP); without collectives a
        # multi-process CPU run cannot all-reduce. GPUs/TPUs use NCCL/ICI regardless.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**explicit)
    except (ValueError, TypeError) as err:
        raise UserError(f"cannot start the multi-process run: {err} (outside SLURM, Open MPI "
                        "and TPU pods pass --coordinator_address, --num_processes and "
                        "--process_id on every process)") from None
    except RuntimeError as err:  # backend already up, coordinator unreachable, ...
        raise UserError(f"cannot start the multi-process run: {err}") from None
    return True


def is_main_process() -> bool:
    """Process 0 writes logs, metrics, TensorBoard and the console; every process computes."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process got here (no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(ok: bool) -> bool:
    """Process 0's `ok`, on every process (a single process gets its own back)."""
    if jax.process_count() == 1:
        return ok
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
