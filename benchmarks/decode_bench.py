"""Decode throughput of the KV-cached generator (random weights; speed does not depend on them).

    python benchmarks/decode_bench.py --preset minimind2-small --batch 1 8 --new_tokens 128

For each batch size: one warm-up call per program (compilation), then `--repeats` timed calls of
a prefill-only program (max_new_tokens=1) and of the full one. Decode tokens/s is
batch * (new_tokens - 1) / (t_full - t_prefill), i.e. prefill excluded.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from minimind_jax.infer.generate import SamplingConfig, generate_tokens
from minimind_jax.model.config import preset
from minimind_jax.model.transformer import count_params, init_params


def best_time(fn, repeats: int) -> float:
    fn()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minimind2-small", help="model preset")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--prompt_len", type=int, default=32, help="prompt tokens per row")
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens generated per row")
    parser.add_argument("--temperature", type=float, default=0.85, help="0 = greedy")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls (best is kept)")
    parser.add_argument("--dtype", default="float32", help="compute dtype")
    args = parser.parse_args()

    config = preset(args.preset).replace(dtype=args.dtype)
    params = init_params(config, 0)
    print(f"{args.preset}: {count_params(params):,} params, dtype {config.dtype}, "
          f"device {jax.devices()[0].device_kind}, temperature {args.temperature}")
    rng = np.random.RandomState(0)
    for batch in args.batch:
        prompts = [rng.randint(3, config.vocab_size, args.prompt_len).tolist()
                   for _ in range(batch)]

        def run(n, prompts=prompts):
            sampling = SamplingConfig(temperature=args.temperature, max_new_tokens=n)
            return generate_tokens(params, config, prompts, sampling, eos_id=None)

        t_prefill = best_time(lambda: run(1), args.repeats)
        t_full = best_time(lambda: run(args.new_tokens), args.repeats)
        decode = batch * (args.new_tokens - 1) / (t_full - t_prefill)
        print(f"batch {batch:>3}: prefill {args.prompt_len} tokens {t_prefill * 1e3:8.1f} ms, "
              f"{args.new_tokens} new tokens {t_full:6.2f} s -> decode {decode:8.1f} tokens/s "
              f"({(t_full - t_prefill) / (args.new_tokens - 1) * 1e3:.2f} ms/step)")


if __name__ == "__main__":
    main()
