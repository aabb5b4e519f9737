"""MoE forward+backward time: sorted-token paths (blocked scan, lax.ragged_dot) vs all experts.

    python benchmarks/moe_bench.py [--dim 640 --n_layers 2 --batch 4 --seq 256 --experts 4]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from minimind_jax.model.config import ModelConfig
from minimind_jax.model.transformer import MiniMind, init_params


def time_fwd_bwd(config, params, ids, repeats):
    def loss(p):
        logits, aux = MiniMind(config).apply({"params": p}, ids)
        return jnp.mean(jax.nn.logsumexp(logits, -1)) + aux

    step = jax.jit(jax.value_and_grad(loss))
    start = time.perf_counter()
    jax.block_until_ready(step(params))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(params))
        times.append(time.perf_counter() - start)
    return compile_s, float(np.median(times))


def main():
    from minimind_jax.runtime.host_memory import reexec_with_hugepages
    from minimind_jax.runtime.xla_flags import apply_cpu_defaults

    reexec_with_hugepages()  # as the CLI entry point does (runtime/host_memory.py)
    apply_cpu_defaults()  # likewise (runtime/xla_flags.py)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dim", type=int, default=640)
    parser.add_argument("--n_layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    base = ModelConfig(dim=args.dim, n_layers=args.n_layers, use_moe=True,
                       n_routed_experts=args.experts, num_experts_per_tok=args.top_k)
    params = init_params(base, 0)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 6400, (args.batch, args.seq)))
    print(f"backend={jax.default_backend()} dim={args.dim} layers={args.n_layers} "
          f"experts={args.experts} top_k={args.top_k} tokens/step={args.batch * args.seq}")
    results = {}
    for impl in ("blocked", "ragged", "dense"):
        compile_s, step_s = time_fwd_bwd(base.replace(moe_impl=impl), params, ids, args.repeats)
        results[impl] = step_s
        print(f"  {impl:6s}: fwd+bwd {step_s * 1e3:8.1f} ms/step (median of {args.repeats}), "
              f"compile {compile_s:.1f} s")
    for impl in ("blocked", "ragged"):
        print(f"  all-experts / {impl} time ratio: {results['dense'] / results[impl]:.2f}x")


if __name__ == "__main__":
    main()
