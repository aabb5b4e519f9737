"""Train state and the jit-compiled, data-parallel train step `(state, batch) -> (state, metrics)`.

Data parallelism: a 1-D `jax.sharding.Mesh` over all devices with axis "data". Params and
optimizer state are replicated, the batch is split along its first axis, each device
differentiates its own share of the loss and `lax.pmean` averages the gradients. The loss of a
micro-batch is the masked mean over ALL its supervised tokens (not a mean of per-device means),
so any split of the batch, padding rows included, gives the same loss and gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from minimind_jax import optim
from minimind_jax.config import ModelConfig
from minimind_jax.loss import masked_cross_entropy
from minimind_jax.model import MiniMind

DATA_AXIS = "data"
BATCH_KEYS = ("input_ids", "labels", "loss_mask", "positions", "segment_ids")


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; all leaves are arrays (checkpointed as is)."""

    step: jax.Array  # global micro-steps taken (int32)
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32[2] key; per-step keys are fold_in(rng, step)
    skipped: jax.Array  # micro-steps skipped for a non-finite loss or gradient, in total
    consecutive_skips: jax.Array  # ... in a row, up to now


def create_train_state(params, optimizer: optax.GradientTransformation,
                       seed: int = 0) -> TrainState:
    """A fresh state at step 0 (the optimizer state is built from `params`)."""
    zero = lambda: jnp.zeros((), jnp.int32)
    return TrainState(step=zero(), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.PRNGKey(seed), skipped=zero(), consecutive_skips=zero())


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis "data" over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_replicated(tree, mesh: Mesh):
    """Place a pytree replicated on every device of the mesh, as fresh (donatable) buffers."""
    return jax.device_put(tree, replicated(mesh), may_alias=False)


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


def make_train_step(config: ModelConfig, optimizer: optax.GradientTransformation,
                    schedule: Callable[[jax.Array], jax.Array],
                    mesh: Mesh) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The jitted step; the incoming state's buffers are donated.

    One micro-batch: loss = masked mean CE + MoE aux; gradients go into the MultiSteps
    accumulator, and every `accumulation_steps` micro-steps clip + AdamW are applied with the LR
    `schedule(step)`. A non-finite loss or gradient leaves params and optimizer state untouched
    (the micro-step still counts, so data position and schedule stay aligned) and is counted.
    Metrics: loss, aux, lr, grad_norm (of the latest update), updated, update, skipped,
    consecutive_skips, n_tokens.
    """
    model = MiniMind(config)
    n_devices = mesh.shape[DATA_AXIS]

    def per_device(state: TrainState, batch: dict):
        # Differentiate w.r.t. a per-device copy so that the gradient is this device's own;
        # the explicit pmean below is then the only cross-device reduction.
        params_local = jax.lax.pcast(state.params, DATA_AXIS, to="varying")

        def objective(params):
            logits_BTV, aux = model.apply({"params": params}, batch["input_ids"],
                                          positions=batch.get("positions"),
                                          segment_ids=batch.get("segment_ids"))
            ce_share = masked_cross_entropy(logits_BTV, batch["labels"], batch["loss_mask"],
                                            axis_name=DATA_AXIS)
            # pmean over devices of this objective is the global loss.
            return n_devices * ce_share + aux, (ce_share, aux)

        (_, (ce_share, aux)), grads = jax.value_and_grad(objective, has_aux=True)(params_local)
        grads = jax.lax.pmean(grads, DATA_AXIS)
        aux = jax.lax.pmean(aux, DATA_AXIS)
        loss = jax.lax.psum(ce_share, DATA_AXIS) + aux
        n_tokens = jax.lax.psum(batch["loss_mask"].sum(), DATA_AXIS)

        lr = schedule(state.step)
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))

        def apply_update(params, opt_state):
            updates, opt_state = optimizer.update(grads, opt_state, params, learning_rate=lr)
            return optax.apply_updates(params, updates), opt_state

        params, opt_state = jax.lax.cond(finite, apply_update, lambda p, o: (p, o),
                                         state.params, state.opt_state)
        skip = (~finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state,
            skipped=state.skipped + skip,
            consecutive_skips=(state.consecutive_skips + 1) * skip)
        updated = optim.updates_applied(opt_state) > optim.updates_applied(state.opt_state)
        metrics = {"loss": loss, "aux": aux, "lr": lr,
                   "grad_norm": optim.last_grad_norm(opt_state), "updated": updated,
                   "update": optim.updates_applied(opt_state), "skipped": new_state.skipped,
                   "consecutive_skips": new_state.consecutive_skips, "n_tokens": n_tokens}
        return new_state, metrics

    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS)),
                            out_specs=(P(), P()))
    return jax.jit(sharded, donate_argnums=0)
