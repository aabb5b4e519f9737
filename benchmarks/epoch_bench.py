"""Whole-run epoch time of `train.py pretrain`, padded rows vs `--pack`, on short documents.

Writes a corpus of short documents (5..max_chars characters of the fixture poems; at the
default 150, about 110 tokens on average) to a temp folder, prepares the token cache once,
then times one full epoch of the real CLI for each mode (cache + background prefetch in both)
and prints wall time, training-loop time and steady-state epoch time (compilation excluded).

    python benchmarks/epoch_bench.py [--n_docs 1000 --dim 64 --n_layers 2 --batch_size 8]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.loader_bench import TOKENIZER, write_corpora  # noqa: E402
from minimind_jax.cli import main as cli_main  # noqa: E402


def run_epoch(data: pathlib.Path, out: pathlib.Path, args, pack: bool) -> dict:
    argv = ["pretrain", "--data_path", str(data), "--tokenizer", str(TOKENIZER),
            "--out_dir", str(out), "--dim", str(args.dim), "--n_layers", str(args.n_layers),
            "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", str(args.max_seq_len),
            "--batch_size", str(args.batch_size), "--accumulation_steps", "1", "--epochs", "1",
            "--log_interval", "1", "--save_interval", "1000000", "--dtype", "float32"]
    if pack:
        argv.append("--pack")
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
    from minimind_jax.host_memory import reexec_with_hugepages
    from minimind_jax.xla_flags import apply_cpu_defaults

    reexec_with_hugepages()  # as the CLI entry point does (host_memory.py)
    apply_cpu_defaults()  # likewise (xla_flags.py)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_docs", type=int, default=1000)
    parser.add_argument("--max_chars", type=int, default=150,
                        help="documents are 5..max_chars characters (150: ~110 tokens average)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--n_layers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_seq_len", type=int, default=512)
    args = parser.parse_args()
    from minimind_jax.loader import open_source
    from minimind_jax.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        data, _ = write_corpora(tmp, args.n_docs, max_chars=args.max_chars)
        tokenizer = load_tokenizer(TOKENIZER)
        lengths = [len(tokenizer.encode(json.loads(line)["text"])) + 2 for line in data.open()]
        print(f"{args.n_docs} documents, {sum(lengths) / len(lengths):.1f} tokens on average "
              f"(with <s> </s>), max_seq_len {args.max_seq_len}, batch {args.batch_size}, "
              f"model dim {args.dim} x {args.n_layers} layers")
        results = {}
        for pack in (False, True):
            open_source(data, TOKENIZER, "pretrain", args.max_seq_len, pack=pack)  # warm cache
            out = tmp / ("packed" if pack else "padded")
            results[pack] = r = run_epoch(data, out, args, pack)
            shutil.rmtree(out)
            print(f"  {'--pack' if pack else 'padded':7s}: {r['steps']:5d} steps, "
                  f"epoch wall {r['wall_s']:7.1f} s, training loop {r['loop_s']:7.1f} s, "
                  f"steady-state epoch {r['steady_s']:7.1f} s")
        padded, packed = results[False], results[True]
        print(f"  epoch speed-up with --pack: {padded['wall_s'] / packed['wall_s']:.2f}x wall, "
              f"{padded['loop_s'] / packed['loop_s']:.2f}x training loop, "
              f"{padded['steady_s'] / packed['steady_s']:.2f}x steady state")


if __name__ == "__main__":
    main()
