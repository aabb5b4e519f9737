"""Token-cache preparation at scale: peak memory and throughput against the tokenizer alone.

Writes a synthetic pretrain JSONL of --size_mb (texts cut from the fixture corpora, 20..1500
characters, CJK and Latin), runs `minimind-jax prepare` on it in a child process (its peak RSS
and CPU time come from wait4), then times the tokenizers library's own `encode_batch` on the
same texts in the same 1 MiB batches, and finally times a second `prepare` (cache reuse).
The data file and the cache are deleted afterwards unless --keep.

    python benchmarks/prepare_bench.py --size_mb 1024
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"


def corpus_text() -> str:
    texts = [json.loads(line)["text"] for line in (FIXTURES / "pretrain.jsonl").open()]
    for line in (FIXTURES / "sft.jsonl").open():
        texts += [turn["content"] for turn in json.loads(line)["conversations"]]
    return "\n".join(texts)


def write_synthetic(path: pathlib.Path, size_mb: float, seed: int = 0) -> int:
    """Stream random excerpts of the fixture corpus into `path`; returns the line count."""
    rng = random.Random(seed)
    source = corpus_text()
    target = int(size_mb * 2**20)
    written = lines = 0
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            n = rng.randint(20, 1500)
            start = rng.randrange(len(source) - n)
            line = json.dumps({"text": source[start:start + n]}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode())
            lines += 1
    return lines


def run_child(argv: list[str]) -> tuple[float, float, float, str]:
    """(wall s, cpu s, peak RSS MiB, stdout) of a child process."""
    started = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                 filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"child failed:\n{out}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, out


def baseline(path: pathlib.Path, tokenizer_dir: str, limit_mb: float | None) -> dict:
    """{method: (MiB, wall s, cpu s)} of the tokenizers library's `encode_batch` and
    `encode_batch_fast` alone over the file's texts, in the same ~1 MiB batches prepare uses,
    interleaved batch by batch so that load from other processes hits both alike (reading and
    JSON parsing not timed)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(pathlib.Path(tokenizer_dir) / "tokenizer.json"))
    methods = ("encode_batch", "encode_batch_fast")
    wall = dict.fromkeys(methods, 0.0)
    cpu = dict.fromkeys(methods, 0.0)
    n_bytes = 0
    with path.open("rb") as f:
        while lines := f.readlines(1 << 20):
            texts = [json.loads(line)["text"] for line in lines]
            for method in methods:
                w0, c0 = time.perf_counter(), time.process_time()
                getattr(tok, method)(texts, add_special_tokens=False)
                wall[method] += time.perf_counter() - w0
                cpu[method] += time.process_time() - c0
            n_bytes += sum(map(len, lines))
            if limit_mb and n_bytes >= limit_mb * 2**20:
                break
    return {m: (n_bytes / 2**20, wall[m], cpu[m]) for m in methods}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size_mb", type=float, default=1024, help="synthetic file size")
    parser.add_argument("--tokenizer", default=str(FIXTURES / "minimind_tokenizer"))
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--baseline_mb", type=float, default=None,
                        help="time encode_batch on only the first MiB of the file")
    parser.add_argument("--workdir", default=None, help="where to write (default: a /tmp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the data file and cache")
    args = parser.parse_args()

    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="prepare_bench_", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "synthetic_pretrain.jsonl"
    try:
        t0 = time.perf_counter()
        lines = write_synthetic(data, args.size_mb)
        size_mb = data.stat().st_size / 2**20
        print(f"synthetic file: {size_mb:.1f} MiB, {lines:,} texts "
              f"(written in {time.perf_counter() - t0:.0f} s) at {data}")
        prepare = [sys.executable, "-m", "minimind_jax.cli", "prepare", "--data_path", str(data),
                   "--tokenizer", args.tokenizer, "--stage", "pretrain",
                   "--max_seq_len", str(args.max_seq_len), "--cache_dir", str(work / "cache")]
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        wall, cpu, rss, out = run_child(prepare)
        print(out.strip())
        print(f"prepare: {wall:.1f} s wall, {cpu:.1f} s CPU, {size_mb / wall:.2f} MiB/s, "
              f"peak RSS {rss:.0f} MiB (target < 1536 MiB)")
        for method, (b_mb, b_wall, b_cpu) in baseline(data, args.tokenizer,
                                                      args.baseline_mb).items():
            print(f"tokenizers {method} alone on {b_mb:.1f} MiB: {b_wall:.1f} s wall, "
                  f"{b_cpu:.1f} s CPU, {b_mb / b_wall:.2f} MiB/s; prepare / {method}: wall "
                  f"{size_mb / wall / (b_mb / b_wall):.1%}, CPU "
                  f"{(size_mb / cpu) / (b_mb / b_cpu):.1%} (target >= 80%)")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        wall2, _, rss2, out2 = run_child(prepare)
        print(f"second prepare (cache reuse, incl. interpreter start): {wall2:.2f} s, "
              f"peak RSS {rss2:.0f} MiB; {out2.splitlines()[0]}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            print(f"removed {work}")


if __name__ == "__main__":
    main()
