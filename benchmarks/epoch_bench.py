"""Whole-run epoch time of `train.py pretrain` on short documents: padded rows, `--pack` with
next fit (`--pack_window 0`, the old packing) and with best fit (the default), and, with
`--reference_dir`, the reference's own `train_pretrain.py` on the same file in the same run.

Writes a corpus of short documents (5..max_chars characters of the fixture poems; at the
default 150, about 110 tokens on average) to a temp folder, prepares the token cache once,
then times one full epoch of the real CLI for each mode (cache + background prefetch in all)
and prints wall time, training-loop time, steady-state epoch time (compilation excluded) and
the rows' fill fraction. The reference runs in a subprocess in its checkout (it opens
./model/minimind_tokenizer) with torch and transformers imported before its clock starts, as
ours runs in this already-started process; its epoch is its DataLoader (on-the-fly
tokenization, one worker, its defaults), float32 on CPU and fp16 autocast on CUDA, with the
same model shape (its LMConfig: 8 heads, 2 KV heads), batch, max_seq_len and accumulation 1.
With `--rerun`, best fit also runs as two whole CLI processes sharing a fresh persistent
compilation cache (a user's first run and rerun), timed like the reference's whole process.

    python benchmarks/epoch_bench.py [--n_docs 1000 --dim 64 --n_layers 2 --batch_size 8]
    python benchmarks/epoch_bench.py --n_docs 480 --dim 512 --n_layers 8 \
        --reference_dir /tmp/minimind_d9453ed --modes next_fit,best_fit
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.loader_bench import TOKENIZER, write_corpora  # noqa: E402
from minimind_jax.cli import main as cli_main  # noqa: E402
from minimind_jax.data.packing import DEFAULT_WINDOW  # noqa: E402

# mode -> extra `pretrain` flags
MODES = {"padded": [], "next_fit": ["--pack", "--pack_window", "0"], "best_fit": ["--pack"]}

# Runs the reference's script as `python train_pretrain.py ARGS` would, in its checkout, and
# prints the seconds from its first line to its last (imports of torch/transformers excluded).
REFERENCE_DRIVER = """
import runpy, sys, time
import torch, transformers, pandas  # noqa: F401  (imported before the clock, as ours are)
sys.argv = ["train_pretrain.py"] + sys.argv[1:]
start = time.perf_counter()
runpy.run_path("train_pretrain.py", run_name="__main__")
print("REFERENCE_EPOCH_S", time.perf_counter() - start)
"""


def run_reference_epoch(data: pathlib.Path, out: pathlib.Path, args) -> dict:
    """One epoch of the reference's own train_pretrain.py on `data`, timed in a subprocess."""
    argv = ["--data_path", str(data), "--out_dir", str(out), "--epochs", "1",
            "--batch_size", str(args.batch_size), "--dim", str(args.dim),
            "--n_layers", str(args.n_layers), "--max_seq_len", str(args.max_seq_len),
            "--accumulation_steps", "1", "--log_interval", "1000000",
            "--save_interval", "1000000000"]
    env = dict(os.environ, PYTHONPATH=str(args.reference_dir))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", REFERENCE_DRIVER, *argv],
                          cwd=args.reference_dir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"reference train_pretrain.py failed (its requirements.txt installed? it "
                 f"imports pandas and scikit-learn):\n{done.stderr[-3000:]}")
    epoch_s = float(done.stdout.rsplit("REFERENCE_EPOCH_S", 1)[1])
    steps = -(-args.n_docs // args.batch_size)
    return {"wall_s": epoch_s, "process_wall_s": wall, "steps": steps}


def pretrain_argv(data: pathlib.Path, out: pathlib.Path, args, mode: str) -> list[str]:
    return ["pretrain", "--data_path", str(data), "--tokenizer", str(TOKENIZER),
            "--out_dir", str(out), "--dim", str(args.dim), "--n_layers", str(args.n_layers),
            "--n_heads", "8", "--n_kv_heads", "2", "--max_seq_len", str(args.max_seq_len),
            "--batch_size", str(args.batch_size), "--accumulation_steps", "1", "--epochs", "1",
            "--log_interval", "1", "--save_interval", "1000000", "--dtype", args.dtype,
            *MODES[mode]]


def run_process(data: pathlib.Path, out: pathlib.Path, args, xdg_cache: pathlib.Path) -> float:
    """Seconds of a whole `minimind-jax pretrain --pack` process (imports included), with the
    CLI's persistent compilation cache in `xdg_cache` (runtime/compile_cache.py)."""
    env = dict(os.environ, XDG_CACHE_HOME=str(xdg_cache))
    for name in ("JAX_COMPILATION_CACHE_DIR", "MINIMIND_JAX_COMPILE_CACHE"):
        env.pop(name, None)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "minimind_jax.cli",
                    *pretrain_argv(data, out, args, "best_fit")], env=env, check=True,
                   stdout=subprocess.DEVNULL, cwd=REPO)
    wall = time.perf_counter() - start
    shutil.rmtree(out)
    return wall


def run_epoch(data: pathlib.Path, out: pathlib.Path, args, mode: str) -> dict:
    argv = pretrain_argv(data, out, args, mode)
    start = time.perf_counter()
    assert cli_main(argv) == 0
    wall = time.perf_counter() - start
    run_dir = next(out.glob("pretrain_*"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    steps = records[-1]["step"] + 1
    # Steady state: from the end of step 0 (which includes compilation) to the end of the run.
    steady = (records[-1]["elapsed_s"] - records[0]["elapsed_s"]) * steps / max(steps - 1, 1)
    return {"wall_s": wall, "loop_s": records[-1]["elapsed_s"], "steady_s": steady,
            "steps": steps}


def main() -> None:
    from minimind_jax.runtime.host_memory import reexec_with_hugepages
    from minimind_jax.runtime.xla_flags import apply_cpu_defaults

    reexec_with_hugepages()  # as the CLI entry point does (runtime/host_memory.py)
    apply_cpu_defaults()  # likewise (runtime/xla_flags.py)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_docs", type=int, default=1000)
    parser.add_argument("--max_chars", type=int, default=150,
                        help="documents are 5..max_chars characters (150: ~110 tokens average)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--n_layers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--dtype", default="float32",
                        help="our compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)")
    parser.add_argument("--modes", default=",".join(reversed(MODES)),
                        help=f"which of ours to run, comma-separated: {', '.join(MODES)}")
    parser.add_argument("--reference_dir", type=pathlib.Path, default=None,
                        help="a jingyaogong/minimind checkout (d9453ed): also time its "
                             "train_pretrain.py on the same documents")
    parser.add_argument("--rerun", action="store_true",
                        help="also time best fit as two whole `minimind-jax pretrain` processes "
                             "(imports included, as the reference's process time is) sharing a "
                             "fresh compilation cache: the first fills it, the rerun loads the "
                             "compiled programs from it")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown --modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    from minimind_jax.data.rows import open_source

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        data, _ = write_corpora(tmp, args.n_docs, max_chars=args.max_chars)
        start = time.perf_counter()
        cached = open_source(data, TOKENIZER, "pretrain", args.max_seq_len, progress=False,
                             log=lambda message: None)  # the token cache, reused by every run
        prepare_s = time.perf_counter() - start
        lengths = cached.cache.lengths
        print(f"{args.n_docs} documents, {lengths.mean():.1f} tokens on average "
              f"(with <s> </s>), max_seq_len {args.max_seq_len}, batch {args.batch_size}, "
              f"model dim {args.dim} x {args.n_layers} layers (8/2 heads), dtype {args.dtype}; "
              f"token cache built in {prepare_s:.1f} s (not in the epochs below); "
              f"load average {os.getloadavg()[0]:.2f}")
        results = {"n_docs": args.n_docs, "mean_tokens": float(lengths.mean()),
                   "prepare_s": prepare_s, "args": {k: str(v) for k, v in vars(args).items()}}
        def save():  # after every run: a time limit that cuts the bench keeps what it measured
            if args.json:
                pathlib.Path(args.json).write_text(json.dumps(results, indent=2))

        if args.reference_dir is not None:  # first: the figure the others are compared with
            r = results["reference"] = run_reference_epoch(data, tmp / "reference", args)
            print(f"  reference: train_pretrain.py, {r['steps']:4d} steps of padded rows, epoch "
                  f"{r['wall_s']:7.1f} s ({r['process_wall_s']:.1f} s with its imports)",
                  flush=True)
            save()
        for mode in modes:
            source = open_source(data, TOKENIZER, "pretrain", args.max_seq_len,
                                 pack=mode != "padded", pack_window=0 if mode == "next_fit"
                                 else DEFAULT_WINDOW, progress=False, log=lambda message: None)
            out = tmp / mode
            r = run_epoch(data, out, args, mode)
            shutil.rmtree(out)
            r["rows"], r["fill"] = len(source), 1.0 - source.padding_fraction
            results[mode] = r
            print(f"  {mode:9s}: {r['rows']:5d} rows filled {r['fill']:6.1%}, {r['steps']:4d} "
                  f"steps, epoch wall {r['wall_s']:7.1f} s, training loop {r['loop_s']:7.1f} s, "
                  f"steady-state epoch {r['steady_s']:7.1f} s", flush=True)
            save()
        if args.rerun:
            runs = [run_process(data, tmp / "process", args, tmp / "xdg") for _ in range(2)]
            results["process_first"], results["process_rerun"] = runs
            print(f"  best_fit as whole processes (imports included): first {runs[0]:.1f} s, "
                  f"rerun with the compilation cache {runs[1]:.1f} s", flush=True)
            if "reference" in results:
                for name, wall in zip(("first", "rerun"), runs, strict=True):
                    ratio = results["reference"]["process_wall_s"] / wall
                    results[f"reference_process/{name}"] = ratio
                    print(f"  process speed-up {name} vs the reference's process: {ratio:.2f}x")
            save()
        for base in ("padded", "reference"):
            for mode in ("next_fit", "best_fit"):
                if base in results and mode in results:
                    ratio = results[base]["wall_s"] / results[mode]["wall_s"]
                    results[f"{base}/{mode}"] = ratio
                    print(f"  epoch speed-up {mode} vs {base}: {ratio:.2f}x wall", end="")
                    if base == "padded":
                        steady = results[base]["steady_s"] / results[mode]["steady_s"]
                        print(f", {steady:.2f}x steady state", end="")
                    print()
        print(f"  load average now {os.getloadavg()[0]:.2f}")
        save()


if __name__ == "__main__":
    main()
