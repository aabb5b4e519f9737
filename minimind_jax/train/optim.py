"""Optimizer and learning-rate schedules: AdamW behind global-norm clipping, in optax.MultiSteps.

The learning rate is a function of the global micro-step and is passed to every update as the
extra argument `learning_rate`, so the update applied at micro-step s uses the LR of s exactly
as the reference sets it (its `get_lr` runs every micro-batch, the optimizer steps every
`accumulation_steps` of them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from minimind_jax.errors import ConfigError

SCHEDULES = ("cosine", "minimind2", "minimind3", "annealing")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """LR as a function of the global micro-step s (0-based) of a run of `total_steps`.

    `minimind2`: lr/10 + lr/2 * (1 + cos(pi * s / total)), the reference's `get_lr` (starts at
    1.1 * lr, no warmup). `minimind3`: lr * (0.1 + 0.45 * (1 + cos(pi * (s + 1) / total))),
    minimind-3's `get_lr` of the 1-based micro-step (starts at ~lr, ends at lr/10).
    `annealing`: minimind-3's RL scripts' torch CosineAnnealingLR(T_max=T, eta_min=lr/10)
    stepped once per update: lr/10 + 0.9 lr (1 + cos(pi k / T)) / 2 with k the updates done
    before micro-step s, counted per epoch of `epoch_batches` (each epoch's partial window is
    flushed: ceil(epoch_batches / accumulation_steps) updates an epoch, T of them in all).
    `cosine`: counted in updates u = s // accumulation_steps: linear
    warmup lr * (u + 1) / warmup_iters over the first `warmup_iters` updates, then a cosine from
    lr down to lr/10 at the last update.
    """

    name: str
    learning_rate: float
    total_steps: int
    accumulation_steps: int = 1
    warmup_iters: int = 0
    epoch_batches: int | None = None  # `annealing`: micro-steps per epoch (None: all of them)

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ConfigError(f"unknown lr schedule {self.name!r}; choose from {SCHEDULES}")
        if self.total_steps < 1 or self.accumulation_steps < 1 or self.warmup_iters < 0:
            raise ConfigError(f"invalid schedule {self}")

    def __call__(self, step):
        """LR at micro-step `step` as a float32 array (traceable inside jit)."""
        return self._value(jnp.asarray(step, jnp.float32), jnp)

    def host(self, step: int) -> float:
        """The same LR in float64 on the host, for logs (the reference logs Python floats)."""
        return float(self._value(float(step), math))

    def _value(self, step, xp):
        lr = self.learning_rate
        if self.name == "minimind2":
            return lr / 10 + 0.5 * lr * (1 + xp.cos(math.pi * step / self.total_steps))
        if self.name == "minimind3":
            return lr * (0.1 + 0.45 * (1 + xp.cos(math.pi * (step + 1) / self.total_steps)))
        if self.name == "annealing":
            per_epoch = self.epoch_batches or self.total_steps
            updates_per_epoch = -(-per_epoch // self.accumulation_steps)
            total_updates = updates_per_epoch * -(-self.total_steps // per_epoch)
            done = (step // per_epoch * updates_per_epoch
                    + step % per_epoch // self.accumulation_steps)
            return lr / 10 + 0.45 * lr * (1 + xp.cos(math.pi * done / total_updates))
        on_host = xp is math
        update = step // self.accumulation_steps
        total_updates = max(self.total_steps // self.accumulation_steps, 1)
        warmup = self.warmup_iters
        progress = (update - warmup) / max(total_updates - 1 - warmup, 1)
        progress = min(max(progress, 0.0), 1.0) if on_host else jnp.clip(progress, 0.0, 1.0)
        decayed = lr / 10 + 0.5 * (lr - lr / 10) * (1 + xp.cos(math.pi * progress))
        if warmup == 0:
            return decayed
        warming = lr * (update + 1) / warmup
        if on_host:
            return warming if update < warmup else decayed
        return jnp.where(update < warmup, warming, decayed)


class ClipState(NamedTuple):
    """Global gradient norm (before clipping) of the latest update."""

    grad_norm: jax.Array


def clip_by_global_norm_like_torch(max_norm: float) -> optax.GradientTransformation:
    """`torch.nn.utils.clip_grad_norm_`: scale by min(1, max_norm / (norm + 1e-6)).

    Also keeps the pre-clip norm in its state for logging. `max_norm <= 0` disables clipping.
    """

    def init(params):
        del params
        return ClipState(grad_norm=jnp.zeros((), jnp.float32))

    def update(updates, state, params=None):
        del params, state
        norm = optax.tree.norm(updates).astype(jnp.float32)
        if max_norm > 0:
            scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
            updates = jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates)
        return updates, ClipState(grad_norm=norm)

    return optax.GradientTransformation(init, update)


def scale_by_learning_rate_arg() -> optax.GradientTransformationExtraArgs:
    """Multiply updates by -learning_rate, taken from the update's `learning_rate` argument."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, learning_rate, **extra_args):
        del params, extra_args
        return jax.tree.map(lambda u: (-learning_rate * u).astype(u.dtype), updates), state

    return optax.GradientTransformationExtraArgs(init, update)


def make_inner_optimizer(*, grad_clip: float = 1.0, weight_decay: float = 0.01,
                         b1: float = 0.9, b2: float = 0.999,
                         eps: float = 1e-8) -> optax.GradientTransformationExtraArgs:
    """torch.optim.AdamW (decoupled decay on every parameter) after torch-style clipping;
    `update(grads, state, params, learning_rate=lr)`."""
    return optax.chain(
        clip_by_global_norm_like_torch(grad_clip),
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay),
        scale_by_learning_rate_arg(),
    )


def make_optimizer(*, accumulation_steps: int = 1, epoch_batches: int | None = None,
                   **inner_args) -> optax.MultiSteps:
    """`make_inner_optimizer(**inner_args)` inside optax.MultiSteps: gradients of
    `accumulation_steps` micro-batches are averaged before the clip + AdamW step.
    Call `update(grads, state, params, learning_rate=lr)`.

    `epoch_batches` (MiniMind2's loop, when the epoch's batch count is not a multiple of
    `accumulation_steps`): windows are counted within each epoch, `(step + 1) % acc == 0` with
    the epoch's 0-based step, and nothing is flushed or zeroed at an epoch's end, so the
    leftover micro-batches join the next epoch's first window, whose gradient is then their
    sum / accumulation_steps (`minimind2_windows`).
    """
    inner = make_inner_optimizer(**inner_args)
    if epoch_batches is None or epoch_batches % accumulation_steps == 0:
        return optax.MultiSteps(inner, every_k_schedule=accumulation_steps)
    return optax.MultiSteps(optax.chain(optax.scale(1.0 / accumulation_steps), inner),
                            every_k_schedule=minimind2_windows(accumulation_steps,
                                                               epoch_batches),
                            use_grad_mean=False)


def minimind2_windows(accumulation_steps: int, epoch_batches: int):
    """Micro-batches in the window of update u (0-based) under MiniMind2's per-epoch counting:
    `accumulation_steps`, plus the previous epoch's `epoch_batches % accumulation_steps`
    leftovers for the first update of every later epoch. An epoch shorter than the window
    never updates (as the reference)."""
    per_epoch, extra = divmod(epoch_batches, accumulation_steps)
    if per_epoch == 0:
        return lambda u: jnp.asarray(2**30, jnp.int32)

    def window(u):
        later_first = jnp.logical_and(u > 0, u % per_epoch == 0)
        return accumulation_steps + extra * later_first.astype(jnp.int32)

    return window


def flush_partial_window(inner, opt_state: optax.MultiStepsState, params, learning_rate,
                         accumulation_steps: int):
    """minimind-3's end-of-epoch flush: if m > 0 micro-batches are accumulated, one clip +
    AdamW step with their summed gradients / accumulation_steps (minimind-3's `.grad` after m
    backward passes of loss / accumulation_steps; not renormalised to m), then an empty window.
    `inner` is the MultiSteps' inner optimizer (`make_inner_optimizer` with the same args).
    -> (params, opt_state)."""
    m = opt_state.mini_step

    def flush(params, opt_state):
        # MultiSteps keeps the running mean of the window; minimind-3's sum / k is mean * m / k.
        scale = m.astype(jnp.float32) / accumulation_steps
        grads = jax.tree.map(lambda a: (a * scale).astype(a.dtype), opt_state.acc_grads)
        updates, inner_state = inner.update(grads, opt_state.inner_opt_state, params,
                                            learning_rate=learning_rate)
        return optax.apply_updates(params, updates), opt_state._replace(
            mini_step=jnp.zeros_like(m), gradient_step=opt_state.gradient_step + 1,
            inner_opt_state=inner_state, acc_grads=jax.tree.map(jnp.zeros_like, grads))

    return jax.lax.cond(m > 0, flush, lambda p, o: (p, o), params, opt_state)


def last_grad_norm(opt_state: Any) -> jax.Array:
    """Pre-clip global norm of the averaged gradients of the latest applied update."""
    return optax.tree_utils.tree_get(opt_state, "grad_norm")


def updates_applied(opt_state: optax.MultiStepsState) -> jax.Array:
    """Number of optimizer updates applied so far."""
    return opt_state.gradient_step
