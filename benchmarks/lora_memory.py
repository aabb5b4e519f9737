"""Memory of LoRA against full SFT: the train state per device (params + optimizer state, from
the shapes the train step is built with), and the peak RSS of real `sft` and `lora` runs.

    python benchmarks/lora_memory.py --preset minimind2-small --steps 3

Both runs start from the same random weights (saved as a reference-keyed .npz), train `--steps`
micro-steps of batch `--batch_size` on tests/fixtures/sft.jsonl at `--max_seq_len`, float32 on
this machine's default device, each in its own process (the RSS is that process's peak).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import jax

from minimind_jax.model import lora, weights
from minimind_jax.model.config import preset
from minimind_jax.train import optim, train_step
from minimind_jax.train.stages.lora import DEFAULT_RANK

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def state_bytes(config, partition) -> tuple[int, int]:
    """(params bytes, optimizer-state bytes) per device of the replicated train state."""
    abstract = train_step.abstract_train_state(config, optim.make_optimizer(),
                                               train_step.data_mesh(), partition=partition)
    size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa
    return size(abstract.params), size(abstract.opt_state)


def peak_rss_of_run(argv: list[str]) -> float:
    """Peak RSS (GiB) of `minimind-jax ARGV` run in a child process."""
    code = ("import resource, sys; from minimind_jax import cli; code = cli.main(sys.argv[1:]); "
            "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); "
            "sys.exit(code)")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"run failed: {' '.join(argv)}\n{out.stderr[-2000:]}")
    kib = next(int(line.split()[1]) for line in out.stdout.splitlines()
               if line.startswith("PEAK_KIB"))
    return kib / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minimind2-small")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_seq_len", type=int, default=512)
    args = parser.parse_args()

    base = preset(args.preset).replace(dtype="float32", max_seq_len=args.max_seq_len)
    rows = {"full sft": state_bytes(base, None),
            f"lora r{DEFAULT_RANK}": state_bytes(base.replace(lora_rank=DEFAULT_RANK),
                                                 lora.Partition())}
    with tempfile.TemporaryDirectory() as tmp:
        init = pathlib.Path(tmp) / "base.npz"
        from minimind_jax.model.transformer import init_params

        weights.save_state_dict(weights.state_dict_from_params(
            init_params(base, jax.random.PRNGKey(0)), base), init)
        common = ["--data_path", str(FIXTURES / "sft.jsonl"), "--tokenizer",
                  str(FIXTURES / "minimind_tokenizer"), "--out_dir", f"{tmp}/out",
                  "--cache_dir", f"{tmp}/cache", "--preset", args.preset, "--dtype", "float32",
                  "--max_seq_len", str(args.max_seq_len), "--batch_size", str(args.batch_size),
                  "--max_steps", str(args.steps), "--init_from", str(init),
                  "--tracker", "none", "--log_interval", "1000"]
        rss = {"full sft": peak_rss_of_run(["sft", *common]),
               f"lora r{DEFAULT_RANK}": peak_rss_of_run(["lora", *common])}
    print(f"{args.preset}, float32 master weights, one device "
          f"({jax.devices()[0].device_kind}); runs: {args.steps} micro-steps of "
          f"{args.batch_size} x {args.max_seq_len}")
    print(f"{'':10s} {'params MiB':>11s} {'optimizer MiB':>14s} {'state MiB':>10s} "
          f"{'peak RSS GiB':>13s}")
    for name, (params, opt_state) in rows.items():
        print(f"{name:10s} {params / 2**20:11.1f} {opt_state / 2**20:14.1f} "
              f"{(params + opt_state) / 2**20:10.1f} {rss[name]:13.2f}")
    print(json.dumps({name: {"params_bytes": p, "opt_state_bytes": o, "peak_rss_gib": rss[name]}
                      for name, (p, o) in rows.items()}))


if __name__ == "__main__":
    main()
