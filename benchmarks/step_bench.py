"""Tokens/s of the replicated train step (`train.train_step.make_train_step`) on one batch.

It imports `minimind_jax` from PYTHONPATH, so it times whichever checkout that names: run it
alternately against two commits to compare their step implementations.

    python benchmarks/step_bench.py --devices 1 --model minimind2-small --batch_size 8
    PYTHONPATH=/path/to/other/checkout python benchmarks/step_bench.py --devices 4 --model tiny

`--devices N` forces N host devices (XLA_FLAGS, set before jax is imported), with the CLI's
XLA:CPU defaults. Prints one line: median / min step seconds, median tokens/s, the compile +
first step seconds and the first loss (the same in both checkouts).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--model", choices=("tiny", "minimind2-small"), default="tiny")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    from minimind_jax.runtime import xla_flags

    xla_flags.apply_cpu_defaults()
    import jax
    import numpy as np

    from minimind_jax.model.config import PRESETS, ModelConfig
    from minimind_jax.model.transformer import init_params
    from minimind_jax.train import optim, train_step

    if args.model == "tiny":  # the tests' tiny model
        config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=6400,
                             max_seq_len=64, dtype="float32")
    else:
        config = PRESETS["minimind2-small"].replace(dtype="float32")
    seq_len = args.seq_len or config.max_seq_len
    rng = np.random.default_rng(0)
    ids = rng.integers(1, config.vocab_size, (args.batch_size, seq_len + 1), dtype=np.int32)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:],
             "loss_mask": np.ones((args.batch_size, seq_len), np.int32)}
    mesh = train_step.data_mesh()
    optimizer = optim.make_optimizer(accumulation_steps=1)
    schedule = optim.Schedule("cosine", 5e-4, total_steps=10_000)
    state = train_step.put_replicated(
        train_step.create_train_state(init_params(config, 0), optimizer), mesh)
    step_fn = train_step.make_train_step(config, optimizer, schedule, mesh)
    device_batch = train_step.put_batch(batch, mesh)
    start = time.perf_counter()
    state, metrics = step_fn(state, device_batch)
    first_loss = float(jax.block_until_ready(metrics["loss"]))
    first_s = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = step_fn(state, device_batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(f"{args.model} B={args.batch_size} T={seq_len} devices={jax.device_count()} "
          f"steps={args.steps}: median {median:.4f}s min {min(times):.4f}s "
          f"{args.batch_size * seq_len / median:,.0f} tokens/s first {first_s:.1f}s "
          f"loss0 {first_loss:.6f}")


if __name__ == "__main__":
    main()
