"""Train state and the jit-compiled, data-parallel train step `(state, batch) -> (state, metrics)`.

Data parallelism: a 1-D `jax.sharding.Mesh` over all devices (of all processes) with axis
"data"; the batch is split along its first axis. One step implementation, a plain `jax.jit`
on the global view (GSPMD), for either layout of the state:

- replicated (default): params and optimizer state whole on every device; XLA's SPMD
  partitioner all-reduces the gradients.
- FSDP (`state_shardings(..., fsdp=True)`): each param / optimizer-state leaf is split along
  one dimension over "data" (ZeRO-3); the partitioner inserts the all-gathers of params and
  the reduce-scatters of gradients, and global reductions (the clip's norm) span every shard.

The loss of a micro-batch is computed on the whole (global) batch: the masked mean over ALL its
supervised tokens plus the MoE aux loss of the whole batch, so any split of the batch, padding
rows included, gives the same loss and gradients, in either layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from minimind_jax.model.config import ModelConfig
from minimind_jax.model.loss import masked_cross_entropy
from minimind_jax.model.transformer import MiniMind
from minimind_jax.train import optim

DATA_AXIS = "data"
# what a step reads of a host batch (the RL stages' producers add the rest)
BATCH_KEYS = ("input_ids", "labels", "loss_mask", "positions", "segment_ids", "logp_pos",
              "old_logps", "advantages", "rewards", "completion_mask", "row_mask",
              "row_index", "row_real")


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; all leaves are arrays (checkpointed as is)."""

    step: jax.Array  # global micro-steps taken (int32)
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32[2] key; per-step keys are fold_in(rng, step)
    skipped: jax.Array  # micro-steps skipped for a non-finite loss or gradient, in total
    consecutive_skips: jax.Array  # ... in a row, up to now


def _trained(params, partition):
    """The params the optimizer sees: all, or `partition.split(params)[0]` (LoRA: the
    adapters; the rest stays frozen)."""
    return params if partition is None else partition.split(params)[0]


def create_train_state(params, optimizer: optax.GradientTransformation,
                       seed: int = 0, partition=None) -> TrainState:
    """A fresh state at step 0 (the optimizer state is built from the trained `params`)."""
    zero = lambda: jnp.zeros((), jnp.int32)
    return TrainState(step=zero(), params=params,
                      opt_state=optimizer.init(_trained(params, partition)),
                      rng=jax.random.PRNGKey(seed), skipped=zero(), consecutive_skips=zero())


FSDP_MIN_SIZE = 1024  # leaves smaller than this stay replicated (norm scales, counters)


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis "data" over `devices` (default: all devices of all processes).

    Devices are ordered by process, so each process's devices hold one contiguous block of
    the batch rows: the block the loader gives that process.
    """
    devices = jax.devices() if devices is None else devices
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], n_shards: int, min_size: int = FSDP_MIN_SIZE) -> P:
    """Split along the largest dimension divisible by `n_shards` (the first such on ties);
    replicate leaves below `min_size` elements or without such a dimension."""
    candidates = [axis for axis, size in enumerate(shape) if size % n_shards == 0]
    if n_shards == 1 or math.prod(shape) < min_size or not candidates:
        return P()
    axis = max(candidates, key=lambda a: (shape[a], -a))
    return P(*(DATA_AXIS if a == axis else None for a in range(len(shape))))


def state_shardings(abstract_state, mesh: Mesh, *, fsdp: bool = False):
    """A NamedSharding per leaf of `abstract_state` (arrays or ShapeDtypeStructs): replicated,
    or with `fsdp` split over "data" per `fsdp_spec`. Optimizer-state leaves shaped like a
    param get the param's layout, since the rule depends only on the shape."""
    n_shards = mesh.shape[DATA_AXIS]
    if not fsdp:
        return jax.tree.map(lambda _: replicated(mesh), abstract_state)
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, n_shards)),
                        abstract_state)


def abstract_train_state(config: ModelConfig, optimizer: optax.GradientTransformation,
                         mesh: Mesh, *, fsdp: bool = False, partition=None,
                         params_like: Callable | None = None) -> TrainState:
    """The TrainState's shapes and dtypes as ShapeDtypeStructs carrying their shardings
    (`state_shardings`): what a checkpoint is restored into, and where a fresh state goes.
    `params_like()` makes a params tree of the state's shapes (default: the model's)."""
    from minimind_jax.model.transformer import init_params

    params_like = params_like or (lambda: init_params(config, jax.random.PRNGKey(0)))
    shapes = jax.eval_shape(lambda: create_train_state(params_like(), optimizer,
                                                       partition=partition))
    return jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                 sharding=sharding),
                        shapes, state_shardings(shapes, mesh, fsdp=fsdp))


def shardings_of(abstract_state):
    """The per-leaf shardings of an `abstract_train_state`."""
    return jax.tree.map(lambda x: x.sharding, abstract_state)


def place(tree, shardings):
    """Global arrays laid out as `shardings` from a pytree that every process holds in full
    (numpy or local jax arrays, the same values everywhere). Each device receives only its
    own block, as fresh (donatable) buffers; no cross-process traffic or equality check."""

    def put(x, sharding):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def put_replicated(tree, mesh: Mesh):
    """Place a pytree replicated on every device of the mesh, as fresh (donatable) buffers."""
    return place(tree, jax.tree.map(lambda _: replicated(mesh), tree))


def gathered(tree, mesh: Mesh):
    """`tree` whole on every device, inside a jitted function: with --fsdp the all-gathers of
    its shards (a no-op when replicated)."""
    return jax.lax.with_sharding_constraint(tree, jax.tree.map(lambda _: replicated(mesh), tree))


def init_train_state(params, optimizer: optax.GradientTransformation, seed: int,
                     shardings, partition=None) -> TrainState:
    """`create_train_state` laid out as `shardings` (from `state_shardings`): params are
    placed from the host, the optimizer state is built on the devices, shard by shard."""
    params = place(params, shardings.params)
    build = jax.jit(lambda p: create_train_state(p, optimizer, seed, partition),
                    out_shardings=shardings)
    return build(params)


def local_bytes(tree) -> int:
    """Bytes of `tree` held by this process's first device (its share of the arrays)."""
    device = jax.local_devices()[0]
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree)
               for shard in leaf.addressable_shards if shard.device == device)


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble the global batch from this process's rows, split along the "data" axis.

    Each process passes its own rows; their number must be a multiple of its local devices.
    """
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items() if k in BATCH_KEYS}


def to_host(tree):
    """Numpy copies of replicated arrays (works when other processes hold other devices)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def _loss_terms(model: MiniMind, params, batch: dict):
    """(masked mean CE, MoE aux) of a batch."""
    logits_BTV, aux = model.apply({"params": params}, batch["input_ids"],
                                  positions=batch.get("positions"),
                                  segment_ids=batch.get("segment_ids"))
    ce = masked_cross_entropy(logits_BTV, batch["labels"], batch["loss_mask"])
    return ce, aux


def _real_rows(batch: dict) -> jax.Array:
    """Rows that are not loader padding (padding rows are all zeros; a row may be [2, T], a
    DPO pair; a packed batch says which in `row_real`)."""
    if "row_real" in batch:
        real = batch["row_real"]
        return jnp.any(real.reshape(real.shape[0], -1), axis=1).sum()
    ids = batch["input_ids"]
    return jnp.any(ids.reshape(ids.shape[0], -1) != 0, axis=1).sum()


# Why a micro-step was skipped (metric "nonfinite"): what first came out non-finite.
NONFINITE_REASONS = {1: "loss", 2: "gradient", 3: "update (new weights or optimizer state)"}


def all_finite(tree) -> jax.Array:
    """Whether every float leaf of `tree` is finite (a scalar bool array)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _apply_gradients(state: TrainState, grads, totals: dict, optimizer, schedule,
                     partition=None):
    """The update: skip non-finite steps, else accumulate / clip / AdamW at LR
    schedule(step). A step is skipped (params and optimizer state unchanged) when its loss, its
    gradient, or the weights and optimizer state it would produce are not finite. `totals` are
    the global loss, aux, n_tokens and n_rows. With a `partition`, `grads` are those of the
    trained part only, and only that part changes."""
    lr = schedule(state.step)
    trained, frozen = ((state.params, None) if partition is None
                       else partition.split(state.params))
    loss_ok = jnp.isfinite(totals["loss"])
    grads_ok = jnp.isfinite(optax.tree.norm(grads))

    def apply_update(params, opt_state):
        updates, new_opt_state = optimizer.update(grads, opt_state, params, learning_rate=lr)
        new_params = optax.apply_updates(params, updates)
        ok = all_finite((new_params, new_opt_state))
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        return (jax.tree.map(keep, new_params, params),
                jax.tree.map(keep, new_opt_state, opt_state), ok)

    params, opt_state, update_ok = jax.lax.cond(
        loss_ok & grads_ok, apply_update, lambda p, o: (p, o, jnp.asarray(True)),
        trained, state.opt_state)
    if partition is not None:
        params = partition.join(params, frozen)
    finite = loss_ok & grads_ok & update_ok
    nonfinite = jnp.where(~loss_ok, 1, jnp.where(~grads_ok, 2, jnp.where(~update_ok, 3, 0)))
    skip = (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        skipped=state.skipped + skip,
        consecutive_skips=(state.consecutive_skips + 1) * skip)
    updated = optim.updates_applied(opt_state) > optim.updates_applied(state.opt_state)
    metrics = {**totals, "lr": lr, "grad_norm": optim.last_grad_norm(opt_state),
               "updated": updated, "update": optim.updates_applied(opt_state),
               "skipped": new_state.skipped, "consecutive_skips": new_state.consecutive_skips,
               "nonfinite": nonfinite.astype(jnp.int32)}
    return new_state, metrics


def lm_objective(config: ModelConfig) -> Callable:
    """The pretrain/SFT objective: masked mean CE + MoE aux (no frozen params)."""
    model = MiniMind(config)

    def objective(params, batch: dict, frozen):
        del frozen
        ce, aux = _loss_terms(model, params, batch)
        return ce + aux, {"loss": ce + aux, "aux": aux}

    return objective


def make_train_step(config: ModelConfig, optimizer: optax.GradientTransformation,
                    schedule: Callable[[jax.Array], jax.Array], mesh: Mesh,
                    shardings=None, partition=None, *, objective: Callable | None = None,
                    frozen=None, fsdp: bool = False
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The jitted step; the incoming state's buffers are donated.

    One micro-batch: loss = masked mean CE + MoE aux; gradients go into the MultiSteps
    accumulator, and every `accumulation_steps` micro-steps clip + AdamW are applied with the LR
    `schedule(step)`. A non-finite loss, gradient or update leaves params and optimizer state
    untouched (the micro-step still counts, so data position and schedule stay aligned) and is
    counted. Metrics: loss, aux, lr, grad_norm (of the latest update), updated, update, skipped,
    consecutive_skips, nonfinite (a NONFINITE_REASONS key, or 0), n_tokens, n_rows.

    Another training objective (DPO, distillation): `objective(params, batch, frozen) ->
    (value to differentiate, metrics)`, the metrics holding at least `loss` (what the
    non-finite guard checks and the log shows) and `aux`; its other metrics come back under
    `parts`. `frozen` is a second params tree the objective reads but never trains (DPO's
    reference model, distillation's teacher): placed once, replicated, or with `fsdp` split
    over "data" by the params' rule (`fsdp_spec`), and passed to every step.

    The state is laid out as `shardings` (a TrainState of NamedShardings from
    `state_shardings`, e.g. with `fsdp=True`), replicated on every device without it; the
    batch is split over "data". Params are gathered whole for the forward pass (a no-op when
    replicated); their gradients come back in the params' layout, so the optimizer update runs
    on each device's share.

    `partition` (e.g. `model.lora.Partition`): gradients, accumulation, clip and AdamW cover
    only `partition.split(params)[0]`; the rest of the params is frozen.
    """
    objective = objective or lm_objective(config)
    whole = replicated(mesh)

    def step(state: TrainState, batch: dict, frozen):
        base = None if partition is None else partition.split(state.params)[1]

        def value(trained):
            params = trained if partition is None else partition.join(trained, base)
            params, frozen_whole = gathered((params, frozen), mesh)
            return objective(params, batch, frozen_whole)

        (_, parts), grads = jax.value_and_grad(value, has_aux=True)(
            _trained(state.params, partition))
        parts = dict(parts)
        totals = {"loss": parts.pop("loss"), "aux": parts.pop("aux"),
                  "n_tokens": batch["loss_mask"].sum(), "n_rows": _real_rows(batch)}
        if parts:
            totals["parts"] = parts
        return _apply_gradients(state, grads, totals, optimizer, schedule, partition)

    # A single sharding stands for every leaf of the state (a pytree prefix).
    state_layout = whole if shardings is None else shardings
    batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
    frozen_layout = (whole if frozen is None
                     else state_shardings(frozen, mesh, fsdp=fsdp))
    jitted = jax.jit(step, in_shardings=(state_layout, batch_sharding, frozen_layout),
                     out_shardings=(state_layout, whole), donate_argnums=0)
    if frozen is None:
        return lambda state, batch: jitted(state, batch, None)
    frozen = place(frozen, frozen_layout)
    return lambda state, batch: jitted(state, batch, frozen)


def make_flush_step(inner_optimizer, schedule: Callable[[jax.Array], jax.Array],
                    accumulation_steps: int, shardings,
                    partition=None) -> Callable[[TrainState], TrainState]:
    """The jitted end-of-epoch flush (`optim.flush_partial_window`) at the LR of the last
    micro-step (of the trained part of the params, see `make_train_step`); the state keeps the
    layout `shardings` and its buffers are donated."""

    def flush(state: TrainState) -> TrainState:
        trained, frozen = ((state.params, None) if partition is None
                           else partition.split(state.params))
        params, opt_state = optim.flush_partial_window(
            inner_optimizer, state.opt_state, trained, schedule(state.step - 1),
            accumulation_steps)
        if partition is not None:
            params = partition.join(params, frozen)
        return state.replace(params=params, opt_state=opt_state)

    return jax.jit(flush, out_shardings=shardings, donate_argnums=0)
