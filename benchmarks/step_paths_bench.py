"""The replicated layout's two step implementations side by side (issue 12, item 3).

`shard_map`: `train_step.make_train_step(..., shardings=None)` (per-device loss share, pcast,
pmean). `gspmd`: the same step built with replicated `state_shardings` (plain `jax.jit` on
the global view, as `--fsdp` uses). Both see the same batch and start from the same params;
timed steps alternate (one of each in turn) so a shared machine's load falls on both alike.

    python benchmarks/step_paths_bench.py --devices 1 --model tiny
    python benchmarks/step_paths_bench.py --devices 4 --model minimind2-small --batch_size 8

`--devices N` forces N host devices (XLA_FLAGS, set before jax is imported); one process per
device count. Prints one line per path: median / min step seconds and the first loss.
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
    import jax
    import numpy as np

    from minimind_jax import optim, train_step
    from minimind_jax.config import PRESETS, ModelConfig
    from minimind_jax.model import init_params

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
    abstract = train_step.abstract_train_state(config, optimizer, mesh)
    shardings = train_step.shardings_of(abstract)
    params = init_params(config, 0)
    paths = {"shard_map": train_step.make_train_step(config, optimizer, schedule, mesh),
             "gspmd": train_step.make_train_step(config, optimizer, schedule, mesh,
                                                 shardings=shardings)}
    states = {name: train_step.init_train_state(params, optimizer, 0, shardings)
              for name in paths}
    device_batch = train_step.put_batch(batch, mesh)
    first_loss, compile_s, times = {}, {}, {name: [] for name in paths}
    for name, step_fn in paths.items():  # compile + first step
        start = time.perf_counter()
        states[name], metrics = step_fn(states[name], device_batch)
        first_loss[name] = float(jax.block_until_ready(metrics["loss"]))
        compile_s[name] = time.perf_counter() - start
    for _ in range(args.steps):
        for name, step_fn in paths.items():
            start = time.perf_counter()
            states[name], metrics = step_fn(states[name], device_batch)
            jax.block_until_ready(metrics["loss"])
            times[name].append(time.perf_counter() - start)
    print(f"# {args.model} B={args.batch_size} T={seq_len} devices={jax.device_count()} "
          f"steps={args.steps}")
    for name in paths:
        print(f"{name:9s} median {statistics.median(times[name]):.4f}s  "
              f"min {min(times[name]):.4f}s  first {compile_s[name]:.1f}s  "
              f"loss0 {first_loss[name]:.6f}")


if __name__ == "__main__":
    main()
