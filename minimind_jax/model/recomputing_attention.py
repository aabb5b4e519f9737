"""Causal grouped-query attention whose backward pass recomputes its probabilities.

The chunked kernel (`transformer.chunked_causal_attention`) leaves autodiff to keep, for the
backward pass, the float32 scores' softmax of every query block, and to build the probabilities'
and scores' gradients for all blocks at once: about 1 GB a layer for minimind-3's GRPO rows (12
x 1,070 tokens, 768 wide), alive together even when the block is rematerialised. This one keeps
only the output and each query's log-sum-exp, and its backward pass recomputes one query block's
probabilities at a time (the FlashAttention recurrence, without its key tiling: a block's scores
fit in memory). An optimization barrier makes each block wait for the previous one, so XLA's
scheduler cannot run them side by side.

Same arithmetic as the chunked kernel up to rounding: float32 scores and softmax, the G query
heads of a KV head folded into the rows of one matmul (row j = g * W + w of a W-query block),
block i scoring only the keys before its end: the blocks, the grouping and the masked scores
are the helpers below, which `transformer.chunked_causal_attention` uses too. Shape legend as in
`transformer`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

NEG = jnp.finfo(jnp.float32).min


def query_blocks(T: int, n_chunks: int) -> list[tuple[int, int]]:
    """The non-empty [start, end) of `n_chunks` near-equal query blocks of T positions."""
    bounds = [round(T * i / n_chunks) for i in range(n_chunks + 1)]
    return [(s, e) for s, e in zip(bounds[:-1], bounds[1:], strict=True) if e > s]


def grouped_heads(x_BTNH, K: int):
    """[B, T, N, H] -> [B, K, G, T, H]."""
    B, T, N, H = x_BTNH.shape
    return x_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)


def block_rows(x_BKGTH, start: int, end: int):
    """Query block [start, end) of [B, K, G, T, H] as [B, K, G * W, H]."""
    B, K, G, _, H = x_BKGTH.shape
    return x_BKGTH[:, :, :, start:end].reshape(B, K, G * (end - start), H)


def block_scores(q_BKJH, k_BKTH, mask_B1TS, start: int, end: int):
    """Float32 scores of one query block over keys [0, end), masked (causal, and `mask_B1TS`);
    the chunked kernel's too."""
    G = q_BKJH.shape[2] // (end - start)
    scores_BKJS = jnp.einsum("bkjh,bksh->bkjs", q_BKJH, k_BKTH[:, :, :end],
                             preferred_element_type=jnp.float32)
    allowed = jnp.tile(jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None], (G, 1))[
        None, None]
    if mask_B1TS is not None:
        allowed = allowed & jnp.tile(mask_B1TS[:, :, start:end, :end], (1, 1, G, 1))
    return jnp.where(allowed, scores_BKJS, NEG)


def _after(previous, *inputs):
    """`inputs`, available only once `previous` is computed (orders the blocks)."""
    return jax.lax.optimization_barrier((previous, inputs))[1]


def _forward(q_BTNH, k_BTKH, v_BTKH, mask_B1TS, n_chunks: int):
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    q_BKGTH = grouped_heads(q_BTNH * (1.0 / math.sqrt(H)), K)
    k_BKTH, v_BKTH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
    outs, lses, previous = [], [], None
    for start, end in query_blocks(T, n_chunks):
        q_BKJH = block_rows(q_BKGTH, start, end)
        if previous is not None:
            q_BKJH, = _after(previous, q_BKJH)
        scores_BKJS = block_scores(q_BKJH, k_BKTH, mask_B1TS, start, end)
        max_BKJ = jnp.max(scores_BKJS, axis=-1)
        p_BKJS = jnp.exp(scores_BKJS - max_BKJ[..., None])
        sum_BKJ = jnp.sum(p_BKJS, axis=-1)
        out_BKJH = jnp.einsum("bkjs,bksh->bkjh", p_BKJS.astype(v_BKTH.dtype),
                              v_BKTH[:, :, :end], preferred_element_type=jnp.float32)
        out_BKJH = (out_BKJH / sum_BKJ[..., None]).astype(v_BKTH.dtype)
        outs.append(out_BKJH.reshape(B, K, -1, end - start, H))
        lses.append((max_BKJ + jnp.log(sum_BKJ)).reshape(B, K, -1, end - start))
        previous = out_BKJH
    out_BKGTH = jnp.concatenate(outs, axis=3)
    out_BTNH = out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
    return out_BTNH, jnp.concatenate(lses, axis=3)


def recomputing_causal_attention(q_BTNH, k_BTKH, v_BTKH, n_chunks: int, mask_B1TS=None):
    """Exact causal GQA in `n_chunks` query blocks, `mask_B1TS` (or None) further restricting
    which keys each query sees; the backward pass recomputes the probabilities block by block."""
    masks = () if mask_B1TS is None else (mask_B1TS,)
    return _kernel(n_chunks, bool(masks))(q_BTNH, k_BTKH, v_BTKH, *masks)


@functools.cache
def _kernel(n_chunks: int, masked: bool):
    """The custom-VJP function of (q, k, v[, mask]) for these static settings."""

    def mask_of(masks):
        return masks[0] if masked else None

    @jax.custom_vjp
    def attend(q_BTNH, k_BTKH, v_BTKH, *masks):
        return _forward(q_BTNH, k_BTKH, v_BTKH, mask_of(masks), n_chunks)[0]

    def fwd(q_BTNH, k_BTKH, v_BTKH, *masks):
        out_BTNH, lse_BKGT = _forward(q_BTNH, k_BTKH, v_BTKH, mask_of(masks), n_chunks)
        return out_BTNH, (q_BTNH, k_BTKH, v_BTKH, masks, out_BTNH, lse_BKGT)

    def bwd(residuals, dout_BTNH):
        q_BTNH, k_BTKH, v_BTKH, masks, out_BTNH, lse_BKGT = residuals
        grads = _backward(q_BTNH, k_BTKH, v_BTKH, mask_of(masks), out_BTNH, lse_BKGT,
                          dout_BTNH, n_chunks)
        return (*grads, *(None for _ in masks))

    attend.defvjp(fwd, bwd)
    return attend


def _backward(q_BTNH, k_BTKH, v_BTKH, mask_B1TS, out_BTNH, lse_BKGT, dout_BTNH,
              n_chunks: int):
    """(dq, dk, dv), recomputing one query block's probabilities at a time."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    scale = 1.0 / math.sqrt(H)
    q_BKGTH = grouped_heads(q_BTNH * scale, K)
    do_BKGTH = grouped_heads(dout_BTNH, K)
    # D = rowsum(dO * O): the softmax's backward term, one per query
    out_BKGTH = grouped_heads(out_BTNH, K)
    d_BKGT = jnp.sum(do_BKGTH.astype(jnp.float32) * out_BKGTH.astype(jnp.float32), axis=-1)
    k_BKTH, v_BKTH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
    dk_BKTH = jnp.zeros(k_BKTH.shape, jnp.float32)
    dv_BKTH = jnp.zeros(v_BKTH.shape, jnp.float32)
    dqs = []
    for start, end in query_blocks(T, n_chunks):
        q_BKJH, do_BKJH = block_rows(q_BKGTH, start, end), block_rows(do_BKGTH, start, end)
        if dqs:
            q_BKJH, do_BKJH = _after((dk_BKTH, dv_BKTH), q_BKJH, do_BKJH)
        lse_BKJ = lse_BKGT[..., start:end].reshape(B, K, -1)
        d_BKJ = d_BKGT[..., start:end].reshape(B, K, -1)
        scores_BKJS = block_scores(q_BKJH, k_BKTH, mask_B1TS, start, end)
        p_BKJS = jnp.exp(scores_BKJS - lse_BKJ[..., None])  # masked keys: exp(-huge) = 0
        dv_BKTH = dv_BKTH.at[:, :, :end].add(jnp.einsum(
            "bkjs,bkjh->bksh", p_BKJS, do_BKJH, preferred_element_type=jnp.float32))
        dp_BKJS = jnp.einsum("bkjh,bksh->bkjs", do_BKJH, v_BKTH[:, :, :end],
                             preferred_element_type=jnp.float32)
        ds_BKJS = p_BKJS * (dp_BKJS - d_BKJ[..., None])
        dqs.append(jnp.einsum("bkjs,bksh->bkjh", ds_BKJS, k_BKTH[:, :, :end],
                              preferred_element_type=jnp.float32
                              ).reshape(B, K, -1, end - start, H))
        dk_BKTH = dk_BKTH.at[:, :, :end].add(jnp.einsum(
            "bkjs,bkjh->bksh", ds_BKJS, q_BKJH, preferred_element_type=jnp.float32))
    dq_BTNH = (jnp.concatenate(dqs, axis=3) * scale).transpose(0, 3, 1, 2, 4).reshape(
        B, T, N, H)
    dk_BTKH, dv_BTKH = dk_BKTH.transpose(0, 2, 1, 3), dv_BKTH.transpose(0, 2, 1, 3)
    return (dq_BTNH.astype(q_BTNH.dtype), dk_BTKH.astype(k_BTKH.dtype),
            dv_BTKH.astype(v_BTKH.dtype))
