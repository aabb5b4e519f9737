"""Throughput and latency of `minimind-jax serve` at several client concurrencies.

    python benchmarks/serve_bench.py --preset minimind2-small --concurrency 1 8 32

A live server (random weights, the reference tokenizer from tests/fixtures) in this process,
driven by the official `openai` client from `--concurrency` threads. Every level sends the
same `--requests` prompts (concurrency 1 = one at a time, the baseline), first in untimed
rounds until one compiles nothing new, then timed. Reports requests/s, generated tokens/s
(from `usage`), p50/p95 request latency, and the machine's load average, since a shared
machine moves the figures.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from minimind_jax.data.tokenizer import load_tokenizer  # noqa: E402
from minimind_jax.infer import generate  # noqa: E402
from minimind_jax.model.config import preset  # noqa: E402
from minimind_jax.model.transformer import count_params, init_params  # noqa: E402
from minimind_jax.serve.app import ServeSettings, build_app  # noqa: E402
from minimind_jax.serve.command import running_server  # noqa: E402
from minimind_jax.serve.engine import BatchEngine, EngineConfig  # noqa: E402

TOPICS = ["春天", "大海", "月亮", "朋友", "学习", "音乐", "城市", "秋天", "时间", "家乡", "书籍",
          "科学", "旅行", "雨天", "星空", "勇气"]


def prompts(n: int) -> list[str]:
    kinds = ["写一句关于{}的话", "介绍一下{}"]
    return [kinds[i % 2].format(TOPICS[i // 2 % len(TOPICS)]) + f"（{i}）" for i in range(n)]


def compilations() -> int:
    """Programs compiled so far by the generation loop (to keep compiling out of timings)."""
    return generate._generate_padded._cache_size()


def run_level(url: str, questions: list[str], concurrency: int, max_tokens: int,
              temperature: float) -> dict:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

    def one(question: str) -> tuple[float, int]:
        start = time.perf_counter()
        reply = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": question}],
            max_tokens=max_tokens, temperature=temperature)
        return time.perf_counter() - start, reply.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        results = list(pool.map(one, questions))
        wall = time.perf_counter() - start
    latencies = np.array([r[0] for r in results])
    tokens = sum(r[1] for r in results)
    return {"requests_s": len(questions) / wall, "tokens_s": tokens / wall, "wall_s": wall,
            "tokens": tokens, "p50": float(np.percentile(latencies, 50)),
            "p95": float(np.percentile(latencies, 95))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minimind2-small", help="model preset")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32],
                        help="client threads per level")
    parser.add_argument("--requests", type=int, default=32, help="requests per level")
    parser.add_argument("--max_tokens", type=int, default=64, help="max_tokens per request")
    parser.add_argument("--temperature", type=float, default=0.85, help="0 = greedy")
    parser.add_argument("--max_batch", type=int, default=32, help="the server's --max_batch")
    parser.add_argument("--dtype", default="float32", help="compute dtype")
    args = parser.parse_args()

    config = preset(args.preset).replace(dtype=args.dtype)
    params = init_params(config, 0)
    tokenizer = load_tokenizer(REPO / "tests" / "fixtures" / "minimind_tokenizer")
    engine = BatchEngine(params, config, tokenizer.eos_id, tokenizer.pad_id,
                         EngineConfig(max_batch=args.max_batch, max_queue=4 * args.max_batch,
                                      max_context=1024))
    app = build_app(engine, tokenizer, ServeSettings(model_name=args.preset))
    questions = prompts(args.requests)
    print(f"{args.preset}: {count_params(params):,} params, {config.dtype}, "
          f"{os.cpu_count()} CPUs, {args.requests} requests per level, max_tokens "
          f"{args.max_tokens}, temperature {args.temperature}, server max_batch {args.max_batch}")
    rows = []
    try:
        with running_server(app) as url:
            for concurrency in args.concurrency:
                for _ in range(3):  # untimed rounds until one compiles nothing new
                    compiled = compilations()
                    run_level(url, questions, concurrency, args.max_tokens, args.temperature)
                    if compilations() == compiled:
                        break
                compiled = compilations()
                load_before = os.getloadavg()[0]
                batches_before = engine.batches_run
                level = run_level(url, questions, concurrency, args.max_tokens,
                                  args.temperature)
                level.update(concurrency=concurrency, load=(load_before, os.getloadavg()[0]),
                             batches=engine.batches_run - batches_before,
                             compiled=compilations() - compiled)
                rows.append(level)
                print(f"  concurrency {concurrency}: {level['requests_s']:.2f} req/s, "
                      f"{level['tokens_s']:.1f} tokens/s, p50 {level['p50']:.2f}s, p95 "
                      f"{level['p95']:.2f}s, {level['batches']} batches, {level['compiled']} "
                      "compilations while timed", flush=True)
    finally:
        engine.stop()
    base = rows[0]["tokens_s"]
    print("\n| concurrency | requests/s | generated tokens/s | vs one at a time | p50 latency "
          "| p95 latency | batches | load avg (1 min) before/after |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests_s']:.2f} | {r['tokens_s']:.1f} | "
              f"{r['tokens_s'] / base:.2f}x | {r['p50']:.2f} s | {r['p95']:.2f} s | "
              f"{r['batches']} | {r['load'][0]:.1f} / {r['load'][1]:.1f} |")


if __name__ == "__main__":
    main()
