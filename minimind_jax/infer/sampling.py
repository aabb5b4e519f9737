"""Picking the next token: Hugging Face's order of repetition penalty, temperature, top-k,
top-p (the filters by minimind-3's `generate` rule, ties and the top-p boundary included), then a
categorical draw (or argmax when temperature is 0).

`next_token` samples a whole batch one way (the settings of one `generate` call);
`next_token_per_row` lets every row sample its own way with its own random stream, as the
server's rows, which belong to different requests, do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from minimind_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is picked. temperature 0 = greedy; top_k 0 and top_p 1 disable them."""

    temperature: float = 0.85
    top_p: float = 0.85
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256

    def __post_init__(self):
        problems = []
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if problems:
            raise UserError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits_BV: jax.Array, seen_BV: jax.Array,
                             penalty: jax.Array | float) -> jax.Array:
    """Hugging Face's rule for tokens already present: positive logits / penalty, negative ones
    * penalty (so the token always becomes less likely). One penalty, or one per row ([B])."""
    penalty = jnp.reshape(penalty, (-1, 1))
    penalised = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return jnp.where(seen_BV, penalised, logits_BV)


def _order_key(x_BV: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (negative floats' bits flipped)."""
    bits = jax.lax.bitcast_convert_type(x_BV.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _least_key_where(holds: Callable, batch: int) -> jax.Array:
    """[B, 1] the smallest uint32 x where holds(x) ([B, 1] keys -> [B, 1] bool, False below some
    x and True from it on) is True, by bisection (32 halvings: exact)."""

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        below = holds(mid)
        return jnp.where(below, lo, mid + 1), jnp.where(below, mid, hi)

    start = (jnp.zeros((batch, 1), jnp.uint32), jnp.full((batch, 1), 0xFFFFFFFF, jnp.uint32))
    return jax.lax.fori_loop(0, 32, halve, start)[0]


def filter_top_k_top_p(logits_BV: jax.Array, top_k: jax.Array | int,
                       top_p: jax.Array | float) -> jax.Array:
    """Set to -inf every logit outside the top-k (k 0 = all; ties with the k-th logit stay) and
    outside the top-p nucleus (p 1 = all). k and p may be traced, scalars or one per row ([B]).

    minimind-3's `generate` rule (model/model_minimind.py L271-277), which its chat, eval and RL
    scripts sample with: top-k drops the logits below the k-th largest; top-p, on the softmax of
    what top-k kept, goes through the tokens from the likeliest down (equal logits by index,
    as a stable sort orders them) and keeps each one whose predecessors hold at most top_p of
    the mass, so the likeliest always stays and a token exactly at the boundary stays too.

    Found without a sort (a sort of the vocabulary costs more than the decode step of a small
    model on a CPU): bisecting, in an order-preserving integer view of the floats, for the
    least logit of the top-k and for the least logit whose likelier tokens hold at most top_p;
    the tokens tied at that last logit stay while the mass before them (likelier tokens plus
    the tied ones of lower index) is at most top_p."""
    B, V = logits_BV.shape
    top_k_B1 = jnp.broadcast_to(jnp.reshape(top_k, (-1, 1)), (B, 1))
    top_p_B1 = jnp.broadcast_to(jnp.reshape(top_p, (-1, 1)), (B, 1))
    key_BV = _order_key(logits_BV)
    k_B1 = jnp.where(top_k_B1 > 0, jnp.minimum(top_k_B1, V), V)
    least_k_B1 = _least_key_where(
        lambda x_B1: (key_BV > x_B1).sum(-1, keepdims=True) < k_B1, B)
    logits_BV = jnp.where(key_BV >= least_k_B1, logits_BV, -jnp.inf)
    probs_BV = jax.nn.softmax(logits_BV, axis=-1)

    def mass_above(x_B1):
        return jnp.where(key_BV > x_B1, probs_BV, 0.0).sum(-1, keepdims=True)

    least_p_B1 = _least_key_where(lambda x_B1: mass_above(x_B1) <= top_p_B1, B)
    tied_BV = key_BV == least_p_B1
    before_BV = (mass_above(least_p_B1)
                 + (jnp.cumsum(tied_BV, axis=-1) - tied_BV) * probs_BV)  # tied: equal probs
    kept_BV = (key_BV > least_p_B1) | (tied_BV & (before_BV <= top_p_B1)) | (top_p_B1 >= 1)
    return jnp.where(kept_BV, logits_BV, -jnp.inf)


def next_token(logits_BV, seen_BV, rng, params: dict, greedy: bool) -> jax.Array:
    """Pick one token per row from float32 logits; `params` holds traced sampling scalars."""
    logits_BV = apply_repetition_penalty(logits_BV, seen_BV, params["repetition_penalty"])
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / params["temperature"]
    logits_BV = filter_top_k_top_p(logits_BV, params["top_k"], params["top_p"])
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def next_token_per_row(logits_BV, seen_BV, seeds_B, counts_B, rows: dict) -> jax.Array:
    """One token per row, each row with its own settings: `rows` holds [B] arrays temperature
    (0 = greedy), top_p, top_k and repetition_penalty. Row b draws with the key
    fold_in(PRNGKey(seeds_B[b]), counts_B[b]), so what a request samples depends on its seed and
    how many tokens it has made, not on which other requests share the batch."""
    logits_BV = apply_repetition_penalty(logits_BV, seen_BV, rows["repetition_penalty"])
    greedy_B = rows["temperature"] == 0
    argmax_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

    def draw(_):
        temperature_B1 = jnp.maximum(rows["temperature"], 1e-6)[:, None]
        filtered_BV = filter_top_k_top_p(logits_BV / temperature_B1, rows["top_k"],
                                         rows["top_p"])
        keys_B = jax.vmap(lambda seed, count: jax.random.fold_in(jax.random.PRNGKey(seed),
                                                                  count))(seeds_B, counts_B)
        drawn_B = jax.vmap(jax.random.categorical)(keys_B, filtered_BV).astype(jnp.int32)
        return jnp.where(greedy_B, argmax_B, drawn_B)

    # an all-greedy batch skips the vocabulary sort of top-p
    return jax.lax.cond(jnp.all(greedy_B), lambda _: argmax_B, draw, None)
