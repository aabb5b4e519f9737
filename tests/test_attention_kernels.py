"""The attention kernels agree: cuDNN's fused kernel (GPU only) and the padding that lets it take
odd lengths and packed rows, against XLA's dot_product_attention; the recomputing kernel (under
--remat) against the chunked one, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimind_jax.model.config import ModelConfig
from minimind_jax.model.recomputing_attention import recomputing_causal_attention
from minimind_jax.model.transformer import (
    MiniMind,
    _segment_mask,
    chunked_causal_attention,
    cudnn_causal_attention,
    init_params,
)
from minimind_jax.tools.bench import synthetic_batch
from tests.helpers import assert_within, max_abs_diff

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")


def _qkv(T, dtype, seed=0, B=2, N=8, K=2, H=64):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return [jax.random.normal(k, (B, T, n, H), dtype) for k, n in zip(keys, (N, K, K), strict=True)]


def _segments(B, T, doc_len=40, seed=0):
    return jnp.asarray(synthetic_batch(B, T, 100, seed, doc_len=doc_len)["segment_ids"])


def _xla(q, k, v, mask):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=mask is None,
                                        scale=1 / 8, implementation="xla")


@pytest.mark.parametrize("packed", [False, True])
def test_odd_length_padding_is_exact(packed):
    """The trailing pad position changes no real output (checked with XLA as the kernel)."""
    q, k, v = _qkv(61, jnp.float32)
    mask = _segment_mask(_segments(2, 61)) if packed else None
    padded = cudnn_causal_attention(q, k, v, mask, 1 / 8, implementation="xla")
    assert padded.shape == q.shape
    np.testing.assert_allclose(padded, _xla(q, k, v, mask), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n_chunks", [1, 3])
@pytest.mark.parametrize("mask", ["causal", "packed", "left padded"])
def test_recomputing_kernel_matches_the_chunked_one(n_chunks, mask):
    """Same outputs and (q, k, v) gradients as autodiff through the chunked kernel, plain
    causal, with packed rows' segments, and with left padding (RL rows: padding keys seen by no
    query but itself)."""
    q, k, v = _qkv(97, jnp.float32, H=16)
    segments = {"causal": None, "packed": _segments(2, 97, doc_len=30),
                "left padded": jnp.ones((2, 97), jnp.int32).at[0, :23].set(0)}[mask]
    mask_B1TS = None if segments is None else _segment_mask(segments)
    if mask == "left padded":
        mask_B1TS = mask_B1TS | jnp.eye(97, dtype=bool)[None, None]
    weights = jax.random.normal(jax.random.PRNGKey(9), q.shape, jnp.float32)

    def value_and_grads(kernel):
        return jax.jit(jax.value_and_grad(
            lambda q, k, v: jnp.sum(kernel(q, k, v, n_chunks, mask_B1TS) * weights),
            argnums=(0, 1, 2)))(q, k, v)

    out = recomputing_causal_attention(q, k, v, n_chunks, mask_B1TS)
    expected = chunked_causal_attention(q, k, v, n_chunks, mask_B1TS)
    assert_within("out", max_abs_diff(out, expected), 2e-6)  # measured 2.4e-7 to 6.0e-7
    (_, grads), (_, grads_expected) = (value_and_grads(recomputing_causal_attention),
                                       value_and_grads(chunked_causal_attention))
    for name, got, want in zip("qkv", grads, grads_expected, strict=True):
        assert_within(f"d{name}", max_abs_diff(got, want), 4e-6)  # measured 7e-7 to 1.4e-6


@on_gpu
@pytest.mark.parametrize("T", [512, 511])
@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_matches_xla_forward_and_gradients(T, packed):
    q, k, v = _qkv(T, jnp.bfloat16)
    mask = _segment_mask(_segments(2, T)) if packed else None
    weights = jax.random.normal(jax.random.PRNGKey(9), q.shape, jnp.float32)

    def loss(kernel, q, k, v):
        return jnp.sum(kernel(q, k, v).astype(jnp.float32) * weights)

    cudnn = lambda q, k, v: cudnn_causal_attention(q, k, v, mask, 1 / 8)
    xla = lambda q, k, v: _xla(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(cudnn(q, k, v), np.float32),
                               np.asarray(xla(q, k, v), np.float32), atol=2e-2, rtol=2e-2)
    grads_cudnn = jax.grad(lambda *a: loss(cudnn, *a), argnums=(0, 1, 2))(q, k, v)
    grads_xla = jax.grad(lambda *a: loss(xla, *a), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads_cudnn, grads_xla, strict=True):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


@on_gpu
def test_packed_model_loss_same_with_cudnn_and_xla():
    """A whole bf16 model on packed rows of 511 tokens: the loss agrees across kernels."""
    base = ModelConfig(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512,
                       dtype="bfloat16")
    batch = synthetic_batch(4, 511, 512, doc_len=100)
    params = init_params(base, 0)

    def loss(impl):
        model = MiniMind(base.replace(attention_impl=impl))
        logits, _ = model.apply({"params": params}, jnp.asarray(batch["input_ids"]),
                                positions=jnp.asarray(batch["positions"]),
                                segment_ids=jnp.asarray(batch["segment_ids"]))
        return float(jnp.mean(jax.nn.logsumexp(logits, -1)))

    assert abs(loss("cudnn") - loss("xla")) < 1e-2
