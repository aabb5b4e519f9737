"""The MiniMind transformer as Flax linen modules (pure init/apply over explicit param pytrees).

Numerics follow the PyTorch references (shared/SPEC.md for MiniMind2, shared/SPEC3.md for
minimind-3): pre-norm blocks, RMSNorm in float32, RoPE (MiniMind2's interleaved pairs or
minimind-3's rotate-half, after minimind-3's per-head q/k RMSNorm), grouped-query causal
attention, SwiGLU or MoE feed-forward, and an output projection tied to the token embedding.
The config's switches select the family; there is one code path. Logits are always float32.

Param layout: Dense kernels are [in, out] (the reference's Linear weights transposed); expert
weights are stacked [E, in, out]; with `scan_layers` the blocks live under "layers" with a leading
[n_layers] axis, otherwise under "layers_0", "layers_1", ....

Shape suffixes (`x_BTD` is [batch, time, model dim]); each letter means one thing:
  B batch            T query positions      S key positions (cache slots)   L layers
  D model dim        V vocab                F feed-forward hidden dim
  N query heads      K key/value heads      G query heads per KV head (N = K*G)
  H head dim         R rotary frequencies (H/2)
  W query rows of one attention chunk       J rows of a chunk's grouped matmul (G*W)
  E routed experts   C experts chosen per token (top-k)
  M tokens of the batch, flattened (B*T)    P routed (token, expert) pairs (M*C)
  A pair rows padded to whole expert blocks O blocks; b rows of one block
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from minimind_jax.model.config import ModelConfig
from minimind_jax.model.recomputing_attention import (
    block_rows,
    block_scores,
    grouped_heads,
    query_blocks,
    recomputing_causal_attention,
)

# keys / values: tuples of L arrays [B, K, H, S] / [B, K, S, H]; segment_ids [B, S];
# index [] or [B]
Cache = dict[str, jax.Array | tuple[jax.Array, ...]]
# the slot axis S of a layer's cached keys and values (see `cached_attention` for why they differ)
CACHE_SLOT_AXIS = {"k": 3, "v": 2}


def cache_slots(name: str, rows, slots) -> tuple:
    """Index of `rows` x `slots` in one layer's cached "k" or "v" (the axes between whole)."""
    return (rows,) + (slice(None),) * (CACHE_SLOT_AXIS[name] - 1) + (slots,)


def to_cache_layout(name: str, x_BKTH):
    """New keys or values [B, K, T, H] in the layout the cache keeps them."""
    return x_BKTH.swapaxes(-1, -2) if name == "k" else x_BKTH


def uniform_fan_in_init(key, shape, dtype=jnp.float32):
    """PyTorch's Linear default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); fan_in = shape[-2]."""
    bound = 1.0 / math.sqrt(shape[-2])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def tied_embedding_init(key, shape, dtype=jnp.float32):
    """The tied [vocab, dim] matrix takes the output Linear's init: U(+-1/sqrt(dim))."""
    bound = 1.0 / math.sqrt(shape[-1])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def kernel_init(config: ModelConfig):
    """N(0, init_std^2) when the config sets `init_std` (minimind-3), else PyTorch's Linear
    default U(+-1/sqrt(fan_in)) (MiniMind2)."""
    if config.init_std > 0:
        return nn.initializers.normal(config.init_std)
    return uniform_fan_in_init


def embedding_init(config: ModelConfig):
    """The tied [vocab, dim] matrix: N(0, init_std^2), or the output Linear's uniform init."""
    if config.init_std > 0:
        return nn.initializers.normal(config.init_std)
    return tied_embedding_init


def rope_cos_sin(positions_BT: jax.Array, head_dim: int, theta: float):
    """cos/sin [B, T, head_dim/2] of angle pos * theta^(-2i/head_dim), in float32."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles_BTR = positions_BT.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    return jnp.cos(angles_BTR), jnp.sin(angles_BTR)


def apply_rope(x_BTNH: jax.Array, cos_BTR: jax.Array, sin_BTR: jax.Array,
               layout: str = "interleaved") -> jax.Array:
    """Rotate every head by its position's angles. `interleaved` pairs features (2i, 2i+1)
    (MiniMind2's complex layout); `rotate_half` pairs (i, i + hd/2) (HF/NeoX, minimind-3)."""
    x = x_BTNH.astype(jnp.float32)
    cos, sin = cos_BTR[:, :, None, :], sin_BTR[:, :, None, :]
    if layout == "rotate_half":
        first, second = jnp.split(x, 2, axis=-1)
        rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], -1)
        return rotated.astype(x_BTNH.dtype)
    x = x.reshape(*x_BTNH.shape[:-1], -1, 2)
    even, odd = x[..., 0], x[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x_BTNH.shape).astype(x_BTNH.dtype)


class RMSNorm(nn.Module):
    """Normalised in float32; MiniMind2 casts back to x's dtype before the weight multiply,
    minimind-3 (`weight_fp32`) multiplies in float32 and casts after."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    weight_fp32: bool = False

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        weight = weight.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + weight.shape)
        if self.weight_fp32:
            return (weight * normed).astype(x.dtype).astype(self.dtype)
        return (weight * normed.astype(x.dtype)).astype(self.dtype)


def _norm(config: ModelConfig, name: str) -> RMSNorm:
    return RMSNorm(config.norm_eps, config.dtype, config.param_dtype, config.norm_weight_fp32,
                   name=name)


def _dense(config: ModelConfig, features: int, name: str) -> nn.Module:
    if config.lora_rank:
        return LoRADense(features, config, name=name)
    return nn.Dense(features, use_bias=False, dtype=config.dtype, param_dtype=config.param_dtype,
                    kernel_init=kernel_init(config), name=name)


def lora_a_init(key, shape, dtype=jnp.float32):
    """The references' LoRA A: N(0, 0.02^2) (stored [in, rank], their weight transposed)."""
    return 0.02 * jax.random.normal(key, shape, dtype)


class LoRADense(nn.Module):
    """nn.Dense without bias (same `kernel`, same product) plus, when square (in == out, as
    the references' `apply_lora` picks its Linears), a LoRA adapter `lora_A` [in, rank] ~
    N(0, 0.02^2), `lora_B` [rank, out] = 0: y = x K + (x A) B, no alpha scaling."""

    features: int
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kernel = self.param("kernel", kernel_init(cfg), (x.shape[-1], self.features),
                            cfg.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=cfg.dtype)
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        if x.shape[-1] != self.features:
            return y
        a = self.param("lora_A", lora_a_init, (x.shape[-1], cfg.lora_rank), cfg.param_dtype)
        b = self.param("lora_B", nn.initializers.zeros, (cfg.lora_rank, self.features),
                       cfg.param_dtype)
        a, b = nn.dtypes.promote_dtype(a, b, dtype=cfg.dtype)
        return y + jnp.dot(jnp.dot(x, a), b)


def _attention_impl(config: ModelConfig, has_cache: bool) -> str:
    """The kernel for this call: `config.attention_impl`, with auto resolved per platform."""
    if has_cache or config.attention_impl == "xla":
        return "xla"  # decoding: one query row against the cache slots
    if config.attention_impl != "auto":
        return config.attention_impl
    if jax.default_backend() == "cpu":
        return "chunked"
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and config.dtype in ("bfloat16", "float16") else "xla"


def cudnn_causal_attention(q_BTNH, k_BTKH, v_BTKH, mask_B1TS, scale: float,
                           implementation: str = "cudnn"):
    """cuDNN's fused causal attention, packed rows included (their segment mask goes in as a
    bias). Its training kernels reject odd lengths ("Unsupported sequence length Q 511"), and
    MiniMind2 trains on max_seq_len - 1 = 511 tokens: an odd T gets one trailing position,
    which causality hides from every real query, and its output row is cut off again.
    (`implementation` lets the padding be checked where there is no cuDNN.)"""
    T = q_BTNH.shape[1]
    pad = T % 2
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q_BTNH, k_BTKH, v_BTKH = (jnp.pad(x, widths) for x in (q_BTNH, k_BTKH, v_BTKH))
        if mask_B1TS is not None:
            mask_B1TS = jnp.pad(mask_B1TS, ((0, 0), (0, 0), (0, pad), (0, pad)))
    out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask=mask_B1TS,
                                            is_causal=True, scale=scale,
                                            implementation=implementation)
    return out_BTNH[:, :T]


def chunked_causal_attention(q_BTNH, k_BTKH, v_BTKH, n_chunks: int, mask_B1TS=None):
    """Exact causal grouped-query attention computed in `n_chunks` query blocks.

    Block i only scores the keys before its end, so about (n+1)/(2n) of the T x T scores are
    computed. The G query heads sharing a KV head are folded into the rows of one matmul,
    which XLA:CPU runs much faster than G small batched ones. Softmax is float32.
    """
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    G = N // K
    q_BKGTH = grouped_heads(q_BTNH * (1.0 / math.sqrt(H)), K)
    k_BKTH = k_BTKH.transpose(0, 2, 1, 3)
    v_BKTH = v_BTKH.transpose(0, 2, 1, 3)
    outs = []
    for start, end in query_blocks(T, n_chunks):
        W = end - start
        q_BKJH = block_rows(q_BKGTH, start, end)
        scores_BKJS = block_scores(q_BKJH, k_BKTH, mask_B1TS, start, end)
        probs_BKJS = jax.nn.softmax(scores_BKJS, axis=-1).astype(v_BKTH.dtype)
        out_BKJH = jnp.einsum("bkjs,bksh->bkjh", probs_BKJS, v_BKTH[:, :, :end])
        outs.append(out_BKJH.reshape(B, K, G, W, H))
    out_BKGTH = jnp.concatenate(outs, axis=3)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def cached_attention(q_BTNH, k_BTKH, v_BTKH, cache_k_BKHS, cache_v_BKSH, masks):
    """Attention of T new queries over the cache's written slots and the T new keys.
    `masks` = ([B, 1, T, S] cached slots each query sees, [B, 1, T, T] new keys it sees).

    Both matmuls batch over (B, K) with the G query heads of a KV head as rows, and nothing of
    the cache is transposed, repeated or copied per step. The keys are kept transposed,
    [B, K, H, S], so that q @ k is a plain matmul: over [B, K, S, H] (contracting the last
    axis of both) XLA:CPU's kernel read the keys at a third of the speed of the values. The new
    keys are written by the caller afterwards, once for all layers."""
    B, T, N, H = q_BTNH.shape
    K, S = cache_k_BKHS.shape[1], cache_k_BKHS.shape[3]
    G = N // K
    dtype = q_BTNH.dtype
    q_BKJH = (q_BTNH * (1.0 / math.sqrt(H))).reshape(B, T, K, G, H).transpose(
        0, 2, 1, 3, 4).reshape(B, K, T * G, H)
    # the new keys and values as the cache will hold them (its dtype)
    k_BKTH = k_BTKH.transpose(0, 2, 1, 3).astype(cache_k_BKHS.dtype).astype(dtype)
    v_BKTH = v_BTKH.transpose(0, 2, 1, 3).astype(cache_v_BKSH.dtype).astype(dtype)
    scores_BKJS = jnp.concatenate([
        jnp.einsum("bkjh,bkhs->bkjs", q_BKJH, cache_k_BKHS.astype(dtype),
                   preferred_element_type=jnp.float32),
        jnp.einsum("bkjh,bkth->bkjt", q_BKJH, k_BKTH, preferred_element_type=jnp.float32)],
        axis=-1)
    allowed_B1JS = jnp.repeat(jnp.concatenate(masks, axis=-1), G, axis=2)  # row j = t * G + g
    scores_BKJS = jnp.where(allowed_B1JS, scores_BKJS, jnp.finfo(jnp.float32).min)
    probs_BKJS = jax.nn.softmax(scores_BKJS, axis=-1).astype(dtype)
    out_BKJH = (jnp.einsum("bkjs,bksh->bkjh", probs_BKJS[..., :S], cache_v_BKSH.astype(dtype))
                + jnp.einsum("bkjt,bkth->bkjh", probs_BKJS[..., S:], v_BKTH))
    return out_BKJH.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)


def write_at(cache, new, index, axis: int, batch_axis: int = 0):
    """Write `new` into the slots index..index+T-1 along `axis` of `cache` (shapes alike but
    for that axis): one index for every row (a scalar), or one per row ([B] along
    `batch_axis`: rows decoding at different positions)."""
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache, new, index, axis=axis)
    row_axis = axis - 1 if axis > batch_axis else axis
    return jax.vmap(lambda row, new_row, i: jax.lax.dynamic_update_slice_in_dim(
        row, new_row, i, axis=row_axis), in_axes=(batch_axis, batch_axis, 0),
        out_axes=batch_axis)(cache, new, index)


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, cos_BTR, sin_BTR, mask_B1TS, layer_cache):
        cfg = self.config
        B, T, _ = x_BTD.shape
        hd = cfg.head_dim
        q_BTNH = _dense(cfg, cfg.n_heads * hd, "wq")(x_BTD).reshape(B, T, cfg.n_heads, hd)
        k_BTKH = _dense(cfg, cfg.n_kv_heads * hd, "wk")(x_BTD).reshape(B, T, cfg.n_kv_heads, hd)
        v_BTKH = _dense(cfg, cfg.n_kv_heads * hd, "wv")(x_BTD).reshape(B, T, cfg.n_kv_heads, hd)
        if cfg.qk_norm:  # minimind-3: one [hd] RMSNorm shared by all heads, before RoPE
            q_BTNH = _norm(cfg, "q_norm")(q_BTNH)
            k_BTKH = _norm(cfg, "k_norm")(k_BTKH)
        q_BTNH = apply_rope(q_BTNH, cos_BTR, sin_BTR, cfg.rope_layout)
        k_BTKH = apply_rope(k_BTKH, cos_BTR, sin_BTR, cfg.rope_layout)

        if layer_cache is not None:
            out_BTNH = cached_attention(q_BTNH, k_BTKH, v_BTKH, layer_cache["k"],
                                        layer_cache["v"], mask_B1TS)
            out_BTD = _dense(cfg, cfg.dim, "wo")(out_BTNH.reshape(B, T, cfg.n_heads * hd))
            dtype = layer_cache["k"].dtype
            return out_BTD, {"k": k_BTKH.transpose(0, 2, 1, 3).astype(dtype),
                             "v": v_BTKH.transpose(0, 2, 1, 3).astype(dtype)}

        impl = _attention_impl(cfg, False)
        if impl == "chunked":
            # Four query blocks: 62.5% of the score matrix, still few enough ops to fuse well.
            n_chunks = max(1, min(4, T // 64))
            if cfg.remat:  # memory first: the backward recomputes one block's probs at a time
                out_BTNH = recomputing_causal_attention(q_BTNH, k_BTKH, v_BTKH, n_chunks,
                                                        mask_B1TS)
            else:
                out_BTNH = chunked_causal_attention(q_BTNH, k_BTKH, v_BTKH, n_chunks,
                                                    mask_B1TS)
        elif impl == "cudnn":
            out_BTNH = cudnn_causal_attention(q_BTNH, k_BTKH, v_BTKH, mask_B1TS,
                                              1.0 / math.sqrt(hd))
        else:
            out_BTNH = jax.nn.dot_product_attention(
                q_BTNH, k_BTKH, v_BTKH, mask=mask_B1TS, is_causal=mask_B1TS is None,
                scale=1.0 / math.sqrt(hd), implementation=impl)
        out_BTD = _dense(cfg, cfg.dim, "wo")(out_BTNH.reshape(B, T, cfg.n_heads * hd))
        return out_BTD, None


class FeedForward(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.config
        gate = nn.silu(_dense(cfg, cfg.hidden_dim, "w1")(x_BTD))
        return _dense(cfg, cfg.dim, "w2")(gate * _dense(cfg, cfg.hidden_dim, "w3")(x_BTD))


def moe_aux_loss(scores_BTE, topk_idx_BTC, alpha: float) -> jax.Array:
    """Per-sequence balance loss: alpha * mean_b sum_e f[b,e] * mean_t scores[b,t,e]."""
    _, T, E = scores_BTE.shape
    C = topk_idx_BTC.shape[-1]
    picks_BE = jax.nn.one_hot(topk_idx_BTC, E, dtype=jnp.float32).sum(axis=(1, 2))
    load_BE = picks_BE / (T * C / E)
    return alpha * jnp.mean(jnp.sum(load_BE * scores_BTE.mean(axis=1), axis=-1))


def moe_batch_aux_loss(scores_ME, topk_idx_MC, alpha: float) -> jax.Array:
    """minimind-3's balance loss over all M tokens of the micro-batch (padding included):
    alpha * E * sum_e (picks of e / M) * mean_t scores[t, e]; no division by C."""
    M, E = scores_ME.shape
    picks_E = jax.nn.one_hot(topk_idx_MC, E, dtype=jnp.float32).sum(axis=(0, 1))
    return alpha * E * jnp.sum(picks_E / M * scores_ME.mean(axis=0))


def _swiglu_experts_ragged(x_PD, w1_EDF, w3_EDF, w2_EFD, group_sizes_E):
    """SwiGLU over rows already sorted by expert; group_sizes_E rows per expert."""
    gate = nn.silu(jax.lax.ragged_dot(x_PD, w1_EDF, group_sizes_E))
    up = jax.lax.ragged_dot(x_PD, w3_EDF, group_sizes_E)
    return jax.lax.ragged_dot(gate * up, w2_EFD, group_sizes_E)


def _swiglu_experts_blocked(x_PD, w1_EDF, w3_EDF, w2_EFD, group_sizes_E):
    """Same contract as `_swiglu_experts_ragged`, as a scan over fixed-size row blocks.

    Each expert's rows are padded to a multiple of the block size, so every block belongs to
    one expert and costs one [block, D] x [D, F] matmul with that expert's weights. Work is the
    routed rows plus at most E blocks of padding. XLA:CPU lowers `ragged_dot` by masking every
    group over every row (E times the work), which this avoids.
    """
    P, D = x_PD.shape
    E = group_sizes_E.shape[0]
    block = int(min(128, max(8, -(-P // E))))
    n_blocks = -(-(P + E * (block - 1)) // block)
    starts_E = jnp.cumsum(group_sizes_E) - group_sizes_E
    padded_E = -(-group_sizes_E // block) * block
    padded_ends_E = jnp.cumsum(padded_E)
    expert_P = jnp.searchsorted(jnp.cumsum(group_sizes_E), jnp.arange(P), side="right")
    dest_P = (padded_ends_E - padded_E)[expert_P] + jnp.arange(P) - starts_E[expert_P]
    x_AD = jnp.zeros((n_blocks * block, D), x_PD.dtype).at[dest_P].set(x_PD)
    block_expert = jnp.minimum(
        jnp.searchsorted(padded_ends_E, jnp.arange(n_blocks) * block, side="right"), E - 1)

    def expert_block(_, inputs):
        x_bD, e = inputs
        hidden = nn.silu(x_bD @ w1_EDF[e]) * (x_bD @ w3_EDF[e])
        return None, hidden @ w2_EFD[e]

    _, y_ObD = jax.lax.scan(expert_block, None, (x_AD.reshape(n_blocks, block, D), block_expert))
    return y_ObD.reshape(n_blocks * block, D)[dest_P]


class MoEFeedForward(nn.Module):
    """Softmax gate, top-k routed SwiGLU experts (weights renormalised) plus a shared expert.

    Exact: no capacity factor, no token dropping. The sorted paths order the M*C (token, expert)
    pairs by expert and run each expert only on its own tokens: "ragged" with `lax.ragged_dot`
    (a grouped GEMM on GPU/TPU), "blocked" with a scan over per-expert row blocks (CPU);
    "auto" picks by backend. "dense" runs every expert on every token (for checks/benchmarks).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.config
        B, T, D = x_BTD.shape
        E, C, F = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_dim
        pdt = cfg.param_dtype
        init = kernel_init(cfg)
        gate_DE = self.param("gate", init, (D, E), pdt)
        w1_EDF = self.param("w1", init, (E, D, F), pdt).astype(cfg.dtype)
        w3_EDF = self.param("w3", init, (E, D, F), pdt).astype(cfg.dtype)
        w2_EFD = self.param("w2", init, (E, F, D), pdt).astype(cfg.dtype)

        scores_BTE = jax.nn.softmax(
            jnp.dot(x_BTD.astype(jnp.float32), gate_DE.astype(jnp.float32)), axis=-1)
        weights_BTC, idx_BTC = jax.lax.top_k(scores_BTE, C)
        if cfg.norm_topk_prob and (C > 1 or cfg.renorm_top1):
            weights_BTC = weights_BTC / (weights_BTC.sum(axis=-1, keepdims=True) + 1e-20)
        if cfg.seq_aux:
            aux = moe_aux_loss(scores_BTE, idx_BTC, cfg.aux_loss_alpha)
        else:
            aux = moe_batch_aux_loss(scores_BTE.reshape(B * T, E), idx_BTC.reshape(B * T, C),
                                     cfg.aux_loss_alpha)

        x_MD = x_BTD.reshape(B * T, D)
        weights_MC = weights_BTC.reshape(B * T, C)
        idx_MC = idx_BTC.reshape(B * T, C)
        impl = cfg.moe_impl
        if impl == "auto":
            impl = "blocked" if jax.default_backend() == "cpu" else "ragged"
        if impl in ("ragged", "blocked"):
            expert_P = idx_MC.reshape(-1)
            order_P = jnp.argsort(expert_P, stable=True)
            group_sizes_E = jnp.bincount(expert_P, length=E).astype(jnp.int32)
            experts_fn = _swiglu_experts_ragged if impl == "ragged" else _swiglu_experts_blocked
            y_sorted_PD = experts_fn(x_MD[order_P // C], w1_EDF, w3_EDF, w2_EFD, group_sizes_E)
            y_MCD = jnp.zeros_like(y_sorted_PD).at[order_P].set(y_sorted_PD).reshape(B * T, C, D)
            routed_MD = jnp.einsum("mcd,mc->md", y_MCD.astype(jnp.float32), weights_MC)
        else:
            gate_MEF = nn.silu(jnp.einsum("md,edf->mef", x_MD, w1_EDF))
            up_MEF = jnp.einsum("md,edf->mef", x_MD, w3_EDF)
            y_MED = jnp.einsum("mef,efd->med", gate_MEF * up_MEF, w2_EFD)
            combine_ME = jnp.einsum("mc,mce->me", weights_MC, jax.nn.one_hot(idx_MC, E))
            routed_MD = jnp.einsum("med,me->md", y_MED.astype(jnp.float32), combine_ME)

        out_BTD = routed_MD.reshape(B, T, D).astype(x_BTD.dtype)
        if cfg.n_shared_experts:
            out_BTD = out_BTD + FeedForward(cfg, name="shared_experts")(x_BTD)
        return out_BTD, aux


class Block(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, cos_BTR, sin_BTR, mask_B1TS, layer_cache):
        cfg = self.config
        attn_out, new_cache = Attention(cfg, name="attention")(
            _norm(cfg, "attention_norm")(x_BTD), cos_BTR, sin_BTR, mask_B1TS, layer_cache)
        h_BTD = x_BTD + attn_out
        ffn_in = _norm(cfg, "ffn_norm")(h_BTD)
        if cfg.use_moe:
            ffn_out, aux = MoEFeedForward(cfg, name="feed_forward")(ffn_in)
        else:
            ffn_out, aux = FeedForward(cfg, name="feed_forward")(ffn_in), jnp.zeros((), jnp.float32)
        return h_BTD + ffn_out, aux, new_cache


class ScannedBlock(nn.Module):
    """Block with the (carry, xs) -> (carry, ys) signature nn.scan needs."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, layer_cache, cos_BTR, sin_BTR, mask_B1TS):
        block_cls = nn.remat(Block, prevent_cse=False) if self.config.remat else Block
        x_BTD, aux, new_cache = block_cls(self.config, name="block")(
            x_BTD, cos_BTR, sin_BTR, mask_B1TS, layer_cache)
        return x_BTD, (aux, new_cache)


def _segment_mask(segment_ids_BT):
    """Boolean [B, 1, T, T] causal mask within equal segment ids, or None for plain causal."""
    if segment_ids_BT is None:
        return None
    T = segment_ids_BT.shape[1]
    causal_TT = jnp.tril(jnp.ones((T, T), dtype=bool))
    same_BTT = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return (same_BTT & causal_TT[None])[:, None]


def _cache_masks(segment_ids_BT, cache):
    """([B, 1, T, S] the cached slots each new query sees: written ones (below the index) of
    its segment; [B, 1, T, T] the new keys it sees: causal, its segment). Segment 0 is
    padding, seen by no other query; every query sees itself, so none has an all-masked
    (NaN) row. The cache's index is one for all rows (a scalar) or one per row ([B])."""
    T = segment_ids_BT.shape[1]
    seg_k_BS = cache["segment_ids"]
    written_BS = jnp.arange(seg_k_BS.shape[1])[None, :] < jnp.reshape(cache["index"], (-1, 1))
    old_BTS = (written_BS[:, None, :] & (seg_k_BS[:, None, :] != 0)
               & (segment_ids_BT[:, :, None] == seg_k_BS[:, None, :]))
    causal_TT = jnp.tril(jnp.ones((T, T), dtype=bool))
    new_BTT = ((segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
               & (segment_ids_BT[:, None, :] != 0) & causal_TT[None]) | jnp.eye(T, dtype=bool)[None]
    return old_BTS[:, None], new_BTT[:, None]


def _rope_and_masks(cfg: ModelConfig, B: int, T: int, positions, segment_ids, cache):
    """(cos, sin, the attention mask(s), segment ids) of a call: positions 0..T-1 (or on from
    the cache's index) unless given; with a cache, a pair of masks (cached slots, new keys)."""
    if positions is None:
        start = 0 if cache is None else jnp.reshape(cache["index"], (-1, 1))
        positions = jnp.broadcast_to(start + jnp.arange(T)[None, :], (B, T))
    cos_BTR, sin_BTR = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    if cache is None:
        return cos_BTR, sin_BTR, _segment_mask(segment_ids), segment_ids
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    return cos_BTR, sin_BTR, _cache_masks(segment_ids, cache), segment_ids


def _written_cache(cache, new_layer_caches, segment_ids_BT):
    """`cache` with every layer's new keys and values (and their segment ids) written at its
    index, in one write each, and the index moved past them."""
    index = cache["index"]
    new_cache = {name: tuple(
        write_at(layer, to_cache_layout(name, new_layer_caches[name][i]), index,
                 axis=CACHE_SLOT_AXIS[name])
        for i, layer in enumerate(cache[name])) for name in CACHE_SLOT_AXIS}
    return new_cache | {"segment_ids": write_at(cache["segment_ids"], segment_ids_BT, index,
                                                axis=1),
                        "index": index + segment_ids_BT.shape[1]}


def _rematerialised_layers(cfg: ModelConfig, params: dict, x_BTD, cos_BTR, sin_BTR,
                           mask_B1TS):
    """The blocks of the `layers_{i}` layout as one scan of rematerialised blocks over their
    stacked params: (x_BTD after the last block, summed MoE aux).

    Rematerialising unrolled blocks (`nn.remat` per block) saves little on XLA:CPU: the
    scheduler is free to run every block's recomputation early, so all of them are alive at
    once (minimind-3 768 x 8, 12 rows of 1,088 tokens, GRPO's gradient: 15.8 GB of XLA temp
    buffers unrolled, 15.0 GB with per-block remat). Inside a scan the backward pass recomputes
    one block per iteration (3.1 GB). Stacking the layer params is one copy of them in the
    step; the param tree keeps its layout.
    """
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                           *[params[f"layers_{i}"] for i in range(cfg.n_layers)])
    block = Block(cfg, parent=None)  # a pure function here, not a child of the caller

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def layer(x_BTD, layer_params):
        x_BTD, aux, _ = block.apply({"params": layer_params}, x_BTD, cos_BTR, sin_BTR,
                                    mask_B1TS, None)
        return x_BTD, aux

    x_BTD, aux_L = jax.lax.scan(layer, x_BTD, stacked)
    return x_BTD, aux_L.sum()


class MiniMind(nn.Module):
    """MiniMind causal LM (MiniMind2 or minimind-3, by config):
    `apply({"params": p}, input_ids_BT) -> (logits_BTV, aux_loss)`.

    Optional `positions` [B, T] (default 0..T-1, or continuing from the cache) and
    `segment_ids` [B, T] (attention stays within equal ids; 0 marks padding). With `cache`
    (from `init_cache`) the call returns `(logits, aux_loss, new_cache)`; the cache's `index`
    (the first free slot) is a scalar, or [B] when rows sit at different positions. With
    `write_cache=False` the third value is instead what would have been written: the new keys
    and values `{"k", "v"}` [L, B, K, T, H] (for a caller that stores them itself: XLA cannot
    see that reading them back from the written cache needs no copy of it). With
    `hidden=True` (no cache) it returns `(h_BTD, aux_loss)`: the final-normed hidden states
    instead of the logits (PPO's critic puts its value head there).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, input_ids_BT, positions=None, segment_ids=None, cache: Cache | None = None,
                 write_cache: bool = True, hidden: bool = False):
        cfg = self.config
        B, T = input_ids_BT.shape
        embedding_VD = self.param("tok_embeddings", embedding_init(cfg),
                                  (cfg.vocab_size, cfg.dim), cfg.param_dtype)
        x_BTD = jnp.take(embedding_VD, input_ids_BT, axis=0).astype(cfg.dtype)

        cos_BTR, sin_BTR, mask_B1TS, segment_ids = _rope_and_masks(cfg, B, T, positions,
                                                                   segment_ids, cache)
        layer_caches = None if cache is None else {"k": cache["k"], "v": cache["v"]}

        if cfg.scan_layers:
            stack = nn.scan(ScannedBlock, variable_axes={"params": 0},
                            split_rngs={"params": True}, in_axes=(0, nn.broadcast, nn.broadcast,
                                                                  nn.broadcast),
                            length=cfg.n_layers)(cfg, name="layers")
            # the scan slices its layer from one stacked array (a copy of the cache per call)
            stacked = None if layer_caches is None else {
                name: jnp.stack(layers) for name, layers in layer_caches.items()}
            x_BTD, (aux_L, new_layer_caches) = stack(x_BTD, stacked, cos_BTR, sin_BTR,
                                                     mask_B1TS)
            aux = aux_L.sum()
        elif cfg.remat and cache is None and not self.is_initializing():
            x_BTD, aux = _rematerialised_layers(cfg, self.variables["params"], x_BTD, cos_BTR,
                                                sin_BTR, mask_B1TS)
            new_layer_caches = None
        else:
            aux = jnp.zeros((), jnp.float32)
            ks, vs = [], []
            for i in range(cfg.n_layers):
                layer_cache = None if layer_caches is None else {
                    "k": layer_caches["k"][i], "v": layer_caches["v"][i]}
                x_BTD, layer_aux, new_layer_cache = Block(cfg, name=f"layers_{i}")(
                    x_BTD, cos_BTR, sin_BTR, mask_B1TS, layer_cache)
                aux = aux + layer_aux
                if new_layer_cache is not None:
                    ks.append(new_layer_cache["k"])
                    vs.append(new_layer_cache["v"])
            new_layer_caches = {"k": jnp.stack(ks), "v": jnp.stack(vs)} if ks else None

        h_BTD = _norm(cfg, "norm")(x_BTD)
        if hidden:
            return h_BTD, aux
        logits_BTV = jnp.dot(h_BTD, embedding_VD.astype(cfg.dtype).T,
                             preferred_element_type=jnp.float32)
        if cache is None:
            return logits_BTV, aux
        if not write_cache:
            return logits_BTV, aux, new_layer_caches
        # the writes wait for the logits, so for every read of the old cache: else XLA cannot
        # order a layer's write after that layer's attention read and copies each layer's
        # cache twice per call (in a decode loop, ~1.3 GB of traffic a step at h768 L8)
        logits_BTV, new_layer_caches = jax.lax.optimization_barrier(
            (logits_BTV, new_layer_caches))
        return logits_BTV, aux, _written_cache(cache, new_layer_caches, segment_ids)


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None,
               per_row_index: bool = False) -> Cache:
    """An empty KV cache for `max_len` slots: keys and values as tuples of L arrays, keys
    [B, K, H, S] and values [B, K, S, H] (see `cached_attention`), in the compute dtype by
    default; segment ids [B, S]; with `per_row_index` each row keeps its own next slot. One
    buffer per layer: XLA:CPU copies a slice of a stacked [L, ...] array before a matmul reads
    it, which doubled a decode step's memory traffic."""
    dtype = dtype or config.dtype
    B, K, S, H = batch_size, config.n_kv_heads, max_len, config.head_dim
    return {"k": tuple(jnp.zeros((B, K, H, S), dtype) for _ in range(config.n_layers)),
            "v": tuple(jnp.zeros((B, K, S, H), dtype) for _ in range(config.n_layers)),
            "segment_ids": jnp.zeros((batch_size, max_len), jnp.int32),
            "index": jnp.zeros((batch_size,) if per_row_index else (), jnp.int32)}


def init_params(config: ModelConfig, rng: jax.Array | int = 1337) -> dict:
    """Fresh params with the reference's init distributions (seeded)."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    dummy_ids = jnp.zeros((1, 8), jnp.int32)
    init = jax.jit(lambda key: MiniMind(config).init(key, dummy_ids)["params"])
    return init(rng)


def count_params(params) -> int:
    """Number of scalars in a param pytree (the tied matrix counted once)."""
    return int(sum(x.size for x in jax.tree.leaves(params)))


def count_active_params(params, config: ModelConfig) -> int:
    """Parameters one token goes through: all of them, less the routed experts it is not sent
    to ((E - top-k) / E of the stacked expert weights w1/w2/w3)."""
    total = count_params(params)
    if not config.use_moe:
        return total
    routed = sum(leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                 if getattr(path[-1], "key", None) in ("w1", "w2", "w3"))
    unused = config.n_routed_experts - config.num_experts_per_tok
    return total - routed * unused // config.n_routed_experts
