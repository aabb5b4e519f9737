"""The one training loss: masked mean cross-entropy over next-token targets (and the per-token
cross-entropy that DPO and distillation build on)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits_BTV: jax.Array, labels_BT: jax.Array) -> jax.Array:
    """Per position, -log softmax(logits)[label] in float32 (its negative is the target's
    log-probability, as DPO sums it)."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    target_BT = jnp.take_along_axis(logits_BTV, labels_BT[..., None].astype(jnp.int32),
                                    axis=-1)[..., 0]
    return jax.nn.logsumexp(logits_BTV, axis=-1) - target_BT


def masked_cross_entropy_sum(logits_BTV: jax.Array, labels_BT: jax.Array,
                             mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of CE * mask, sum of mask) in float32: the parts of the masked mean, for sums over
    several batches (validation)."""
    mask_BT = mask_BT.astype(jnp.float32)
    ce_BT = token_cross_entropy(logits_BTV, labels_BT)
    # where() rather than a product: a non-finite CE on a masked-out token must not leak in.
    return jnp.sum(jnp.where(mask_BT > 0, ce_BT * mask_BT, 0.0)), mask_BT.sum()


def masked_cross_entropy(logits_BTV: jax.Array, labels_BT: jax.Array,
                         mask_BT: jax.Array) -> jax.Array:
    """sum(CE * mask) / sum(mask) in float32, the reference's per-micro-batch loss.

    A batch without any supervised token gives 0 (not NaN), and so does its gradient.
    """
    total, count = masked_cross_entropy_sum(logits_BTV, labels_BT, mask_BT)
    return total / jnp.where(count > 0, count, 1.0)
