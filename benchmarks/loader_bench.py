"""Loader cost, train-step time with and without loading, and what packing buys.

On a synthetic corpus of short pretrain documents (and short SFT conversations) in a /tmp
folder it prints:
  1. ms per batch to build batches from the token cache (unpacked, packed, SFT);
  2. padding fraction and rows per epoch, unpacked vs packed;
  3. train-step time: the same batch fed again and again (no loading) vs batches from the
     Loader with background prefetch vs without prefetch (interleaved blocks, median over
     rounds), and the effective (supervised) tokens/s, unpacked vs packed.

    python benchmarks/loader_bench.py                 # CPU: a tiny model
    python benchmarks/loader_bench.py --preset ...    # accelerator: a real one
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import random
import shutil
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TOKENIZER = REPO / "tests" / "fixtures" / "minimind_tokenizer"


def write_corpora(folder: pathlib.Path, n_docs: int, seed: int = 0, max_chars: int = 200):
    """Short pretrain documents (5..max_chars characters) and 1..2-turn conversations."""
    texts = [json.loads(line)["text"] for line in (REPO / "tests/fixtures/pretrain.jsonl").open()]
    source = "\n".join(texts)
    rng = random.Random(seed)

    def excerpt(lo, hi):
        n = rng.randint(lo, hi)
        start = rng.randrange(len(source) - n)
        return source[start:start + n]

    pretrain, sft = folder / "short_docs.jsonl", folder / "short_sft.jsonl"
    with pretrain.open("w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": excerpt(5, max_chars)}, ensure_ascii=False) + "\n")
    with sft.open("w") as f:
        for _ in range(n_docs):
            turns = [{"role": r, "content": excerpt(5, 150)}
                     for r in ("user", "assistant") * rng.randint(1, 2)]
            f.write(json.dumps({"conversations": turns}, ensure_ascii=False) + "\n")
    return pretrain, sft


def ms_per_batch(loader, n_batches: int) -> float:
    iterator = loader.epoch(0)
    next(iterator)
    t0 = time.perf_counter()
    count = sum(1 for _ in itertools.islice(iterator, n_batches))
    return (time.perf_counter() - t0) / max(count, 1) * 1e3


def time_steps(step_fn, state, batches, mesh, put_batch) -> tuple[float, float, object]:
    """(seconds per step, supervised tokens per second, state) over `batches`."""
    import jax

    t0 = time.perf_counter()
    n_steps = n_tokens = 0
    for host_batch in batches:
        state, metrics = step_fn(state, put_batch(host_batch, mesh))
        n_tokens += float(host_batch["loss_mask"].sum())
        n_steps += 1
    jax.block_until_ready(metrics["loss"])
    seconds = time.perf_counter() - t0
    return seconds / n_steps, n_tokens / seconds, state


def main() -> None:
    from minimind_jax.runtime.host_memory import reexec_with_hugepages
    from minimind_jax.runtime.xla_flags import apply_cpu_defaults

    reexec_with_hugepages()  # as the CLI entry point does (runtime/host_memory.py)
    apply_cpu_defaults()  # likewise (runtime/xla_flags.py)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=20000, help="documents per corpus")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of timed blocks")
    parser.add_argument("--block", type=int, default=8, help="train steps per case per round")
    parser.add_argument("--preset", default=None, help="model preset (default: tiny dim 64)")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    import jax

    from minimind_jax.data.batches import Loader
    from minimind_jax.data.rows import open_source
    from minimind_jax.model.config import ModelConfig, preset, resolve_dtype
    from minimind_jax.model.transformer import init_params
    from minimind_jax.train import optim, train_step

    work = pathlib.Path(tempfile.mkdtemp(prefix="loader_bench_", dir="/tmp"))
    try:
        pretrain, sft = write_corpora(work, args.docs)
        quiet = {"log": lambda m: None, "cache_dir": work / "cache", "progress": False}
        sources = {
            "unpacked": open_source(pretrain, TOKENIZER, "pretrain", args.max_seq_len, **quiet),
            "packed": open_source(pretrain, TOKENIZER, "pretrain", args.max_seq_len, pack=True,
                                  **quiet),
            "sft": open_source(sft, TOKENIZER, "sft", args.max_seq_len, **quiet),
        }
        print(f"devices: {jax.devices()}")
        print(f"corpus: {args.docs:,} short documents, "
              f"{sources['unpacked'].cache.meta['num_tokens']:,} tokens; "
              f"batch {args.batch_size} x max_seq_len {args.max_seq_len}")
        for name, source in sources.items():
            loader = Loader(source, args.batch_size, seed=0, prefetch=0)
            print(f"  {name:8s}: {len(source):6,} rows, padding fraction "
                  f"{source.padding_fraction:.4f}, building a batch takes "
                  f"{ms_per_batch(loader, 50):.2f} ms (no prefetch)")

        base = preset(args.preset) if args.preset else ModelConfig(
            dim=64, n_layers=2, n_heads=4, n_kv_heads=2)
        config = base.replace(max_seq_len=args.max_seq_len, dtype=resolve_dtype(args.dtype))
        mesh = train_step.data_mesh()
        schedule = optim.Schedule("minimind2", 5e-4, 10_000)
        optimizer = optim.make_optimizer()
        state = train_step.put_replicated(
            train_step.create_train_state(init_params(config, 0), optimizer), mesh)
        step_fn = train_step.make_train_step(config, optimizer, schedule, mesh)
        print(f"model: dim {config.dim}, {config.n_layers} layers, dtype {config.dtype}")
        for name in ("unpacked", "packed"):
            source = sources[name]
            batch = next(Loader(source, args.batch_size, prefetch=0).epoch(0))
            # Compile and warm up on this batch shape.
            _, _, state = time_steps(step_fn, state, [batch] * 3, mesh, train_step.put_batch)
            # Rounds of blocks, one block per case in turn, so that drift of a shared machine
            # hits every case alike; the median over rounds of each case's ms per step counts.
            feeds = {"fixed batch": itertools.repeat(batch)}
            for prefetch in (2, 0):
                loader = Loader(source, args.batch_size, seed=1, prefetch=prefetch)
                feeds[f"loader, prefetch {prefetch}"] = itertools.chain.from_iterable(
                    loader.epoch(epoch) for epoch in itertools.count())
            per_step = {case: [] for case in feeds}
            tokens_per_s = []
            for _ in range(args.rounds):
                for case, feed in feeds.items():
                    seconds, tokens, state = time_steps(
                        step_fn, state, itertools.islice(feed, args.block), mesh,
                        train_step.put_batch)
                    per_step[case].append(seconds)
                    if case == "loader, prefetch 2":
                        tokens_per_s.append(tokens)
            median = {case: statistics.median(times) for case, times in per_step.items()}
            fixed = median["fixed batch"]
            print(f"  {name:8s}: ms per step, median of {args.rounds} rounds of {args.block} "
                  f"steps: " + ", ".join(f"{case} {ms * 1e3:.1f} ({ms / fixed - 1:+.1%})"
                                         for case, ms in median.items())
                  + f"; effective {statistics.median(tokens_per_s):,.0f} supervised tokens/s "
                  f"({loader.batches_per_epoch:,} steps per epoch)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
