"""max |loss - golden| of the golden pretrain/SFT runs (the golden tests' cases) for a checkout of
this project: `python benchmarks/golden_figures.py [CHECKOUT]` (default: this one).

It drives only the command line (`python -m minimind_jax.cli` with PYTHONPATH=CHECKOUT), so the
package layout of any commit works, and two commits' figures can be put side by side.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = HERE / "tests" / "fixtures"
TINY = "--max_seq_len 64 --dim 64 --n_layers 2 --dtype float32 --batch_size 4 --log_interval 1"
MINIMIND2 = (f"--tokenizer {FIXTURES / 'minimind_tokenizer'} --n_heads 4 --n_kv_heads 2 "
             f"--no_shuffle --lr_schedule minimind2 {TINY}")
MINIMIND3 = (f"--tokenizer {FIXTURES / 'minimind3_tokenizer'} --arch minimind3 --recipe "
             f"minimind3 {TINY}")
PRETRAIN = "--accumulation_steps 2 --learning_rate 5e-4"
# (name, golden file, command, data, initial weights in the golden, flags, golden losses)
CASES = [
    ("minimind2 dense pretrain", "minimind2", "pretrain", "dense/init/",
     f"{MINIMIND2} {PRETRAIN} --epochs 3", "dense/pretrain_loss"),
    ("minimind2 dense sft", "minimind2", "sft", "dense/after_pretrain/",
     f"{MINIMIND2} --accumulation_steps 1 --learning_rate 5e-5 --epochs 2", "dense/sft_loss"),
    ("minimind2 moe pretrain", "minimind2", "pretrain", "moe/init/",
     f"{MINIMIND2} {PRETRAIN} --epochs 3 --use_moe", "moe/pretrain_loss"),
    ("minimind3 dense pretrain", "minimind3", "pretrain", "dense/init/",
     f"{MINIMIND3} {PRETRAIN} --epochs 2", "dense/pretrain_loss"),
    ("minimind3 moe pretrain", "minimind3", "pretrain", "moe/init/",
     f"{MINIMIND3} {PRETRAIN} --epochs 2 --use_moe", "moe/pretrain_loss"),
]


def state_dict(golden, prefix: str) -> dict:
    """The golden's weights under `prefix`, the tied output key restored."""
    sd = {k[len(prefix):]: golden[k] for k in golden.files if k.startswith(prefix)}
    tied = ("model.embed_tokens.weight", "lm_head.weight")
    if tied[0] not in sd:
        tied = ("tok_embeddings.weight", "output.weight")
    sd[tied[1]] = sd[tied[0]]
    return sd


def main() -> None:
    tree = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    env = dict(os.environ, PYTHONPATH=str(tree), JAX_DEFAULT_MATMUL_PRECISION="highest",
               MINIMIND_JAX_COMPILE_CACHE="0")
    goldens = {name: np.load(FIXTURES / f"{name}_golden.npz") for name in ("minimind2",
                                                                          "minimind3")}
    for name, golden_name, command, prefix, flags, key in CASES:
        golden = goldens[golden_name]
        data = FIXTURES / ("pretrain.jsonl" if command == "pretrain" else "sft.jsonl")
        with tempfile.TemporaryDirectory() as tmp:
            init = pathlib.Path(tmp) / "init.npz"
            np.savez(init, **state_dict(golden, prefix))
            argv = [sys.executable, "-m", "minimind_jax.cli", command, "--data_path", str(data),
                    "--out_dir", f"{tmp}/out", "--cache_dir", f"{tmp}/cache", "--init_from",
                    str(init), *flags.split()]
            done = subprocess.run(argv, env=env, cwd=tree, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{name}: exit {done.returncode}\n{done.stderr[-2000:]}")
            run_dir = next(pathlib.Path(tmp, "out").iterdir())
            records = [json.loads(line) for line in
                       (run_dir / "metrics.jsonl").read_text().splitlines()]
            losses = np.array([r["loss"] for r in records if "loss" in r])
            print(f"{name}: {len(losses)} steps, max |loss - golden| = "
                  f"{np.abs(losses - golden[key]).max():.3g}", flush=True)


if __name__ == "__main__":
    main()
