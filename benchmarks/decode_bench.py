"""Decode throughput of the KV-cached generator beside transformers' `generate`, and how far it is
from the memory-bandwidth limit (random weights; speed does not depend on them).

    python benchmarks/decode_bench.py --preset minimind2-small --batch 1 8 --new_tokens 128

For each batch size: one warm-up call per program (compilation), then `--repeats` timed calls of
a prefill-only program (max_new_tokens=1) and of the full one. Decode tokens/s is
batch * (new_tokens - 1) / (t_full - t_prefill), i.e. prefill excluded. The same is measured for
`transformers`' `LlamaForCausalLM.generate` on the model exported by `convert --hf_llama` (dense
MiniMind2 presets; skipped without torch/transformers), with the same sampling settings.

The limit: one decode step reads every weight once (the tied embedding as the output
projection) plus the KV cache, so at batch 1 it cannot beat bandwidth / bytes per step; the
bandwidth is measured here (a jitted sum over a 1 GiB array and numpy's, the faster kept).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from minimind_jax.infer.generate import SamplingConfig, generate_tokens
from minimind_jax.model.config import ModelConfig, preset
from minimind_jax.model.transformer import count_params, init_params
from minimind_jax.runtime.xla_flags import apply_cpu_defaults


def best_time(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def read_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of reading memory: the faster of a jitted sum (all of XLA's threads) and
    numpy's (one thread) over an `n_bytes` float32 array."""
    host = np.ones(n_bytes // 4, np.float32)
    device = jnp.asarray(host)
    jitted = jax.jit(jnp.sum)
    t_jax = best_time(lambda: jitted(device).block_until_ready(), repeats)
    t_numpy = best_time(lambda: host.sum(), repeats)
    return n_bytes / min(t_jax, t_numpy)


def step_bytes(params, config: ModelConfig, batch: int, context: int) -> int:
    """Bytes one decode step reads: every weight once, at the compute dtype, and the KV cache
    of `context` positions for `batch` rows."""
    itemsize = jnp.dtype(config.dtype).itemsize
    weights = count_params(params) * itemsize
    kv = 2 * config.n_layers * batch * context * config.n_kv_heads * config.head_dim * itemsize
    return weights + kv


def decode_rate(run, batch: int, new_tokens: int, repeats: int) -> tuple[float, float, float]:
    """(prefill s, full s, decode tokens/s) of `run(n)`, which generates n tokens per row."""
    t_prefill = best_time(lambda: run(1), repeats)
    t_full = best_time(lambda: run(new_tokens), repeats)
    return t_prefill, t_full, batch * (new_tokens - 1) / (t_full - t_prefill)


def transformers_runner(params, config: ModelConfig, prompts: list[list[int]],
                        sampling: SamplingConfig):
    """`run(n)` for transformers' generate on our exported HF Llama, or None (no torch,
    transformers, or a model the export does not cover)."""
    try:
        import torch
        from transformers import LlamaForCausalLM
    except ImportError:
        return None
    if config.use_moe or config.qk_norm:
        return None
    from minimind_jax.model.convert import export_hf_llama

    folder = tempfile.mkdtemp(prefix="decode_bench_hf_")
    export_hf_llama(params, config, folder)
    model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=getattr(torch, config.dtype))
    model.eval()
    ids = torch.tensor(prompts)
    greedy = sampling.greedy
    extra = {} if greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p,
                               "top_k": 0}

    def run(n):
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=not greedy, pad_token_id=0,
                                  **extra)

    return run


def main() -> None:
    apply_cpu_defaults()  # as the CLI entry point does (before JAX's backend exists)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minimind2-small", help="model preset")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--prompt_len", type=int, default=32, help="prompt tokens per row")
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens generated per row")
    parser.add_argument("--temperature", type=float, default=0.85, help="0 = greedy")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls (best is kept)")
    parser.add_argument("--dtype", default="float32", help="compute dtype")
    parser.add_argument("--no_transformers", action="store_true",
                        help="skip transformers' generate")
    args = parser.parse_args()

    config = preset(args.preset).replace(dtype=args.dtype)
    params = init_params(config, 0)
    bandwidth = read_bandwidth()
    print(f"{args.preset}: {count_params(params):,} params, dtype {config.dtype}, "
          f"device {jax.devices()[0].device_kind}, temperature {args.temperature}; "
          f"measured read bandwidth {bandwidth / 1e9:.1f} GB/s")
    rng = np.random.RandomState(0)
    for batch in args.batch:
        prompts = [rng.randint(3, config.vocab_size, args.prompt_len).tolist()
                   for _ in range(batch)]
        sampling = SamplingConfig(temperature=args.temperature)

        def ours(n, prompts=prompts, sampling=sampling):
            return generate_tokens(params, config, prompts,
                                   SamplingConfig(temperature=sampling.temperature,
                                                  max_new_tokens=n), eos_id=None)

        context = args.prompt_len + args.new_tokens // 2  # the mean over the decode steps
        limit_step_s = step_bytes(params, config, batch, context) / bandwidth
        t_prefill, t_full, rate = decode_rate(ours, batch, args.new_tokens, args.repeats)
        step_s = (t_full - t_prefill) / (args.new_tokens - 1)
        print(f"batch {batch:>3}: jax          prefill {args.prompt_len} tokens "
              f"{t_prefill * 1e3:8.1f} ms, decode {rate:8.1f} tokens/s ({step_s * 1e3:.2f} "
              f"ms/step); bandwidth limit {limit_step_s * 1e3:.2f} ms/step "
              f"({batch / limit_step_s:,.0f} tokens/s): {step_s / limit_step_s:.2f}x the limit")
        hf = None if args.no_transformers else transformers_runner(params, config, prompts,
                                                                   sampling)
        if hf is None:
            continue
        t_prefill, t_full, hf_rate = decode_rate(hf, batch, args.new_tokens, args.repeats)
        hf_step = (t_full - t_prefill) / (args.new_tokens - 1)
        print(f"batch {batch:>3}: transformers prefill {args.prompt_len} tokens "
              f"{t_prefill * 1e3:8.1f} ms, decode {hf_rate:8.1f} tokens/s ({hf_step * 1e3:.2f} "
              f"ms/step): jax / transformers {rate / hf_rate:.2f}x")


if __name__ == "__main__":
    main()
