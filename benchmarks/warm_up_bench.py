"""What the server's warm-up buys: how long running requests freeze while the engine compiles
a bucket it meets for the first time, with and without `BatchEngine.warm_up` (random weights;
timing does not depend on them).

    python benchmarks/warm_up_bench.py --preset minimind2-small

Each mode runs in a fresh process (compiled programs live per process): `cold` serves at once
(`serve --no_warm_up`); `warm` warms up first with an empty compilation cache folder (filling
it); `warm_again` warms up from that folder (a later start); `background` starts the warm-up
behind the serving with an empty cache folder and sends the requests at once (a first `serve`
start: its warm-up figure is when the warm-up ended). The same ramp of requests
follows: one request, then 1, 2 and 4 more, each wave once the first has `--every` more tokens,
so the decode batch grows through 1, 2, 4 and 8 rows and the cache through its length buckets.
Figures: the warm-up's time and programs, the first request's longest gap between two tokens,
its time lost in gaps over 3x its median gap (stalls), and each wave's time to first token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np


def one_mode(args) -> dict:
    from minimind_jax.infer.sampling import SamplingConfig
    from minimind_jax.model.config import preset
    from minimind_jax.model.transformer import init_params
    from minimind_jax.runtime.xla_flags import apply_cpu_defaults
    from minimind_jax.serve.engine import BatchEngine, Completion, EngineConfig

    apply_cpu_defaults()
    config = preset(args.preset)
    params = init_params(config, 0)
    engine = BatchEngine(params, config, eos_id=-1, pad_id=0,
                         config=EngineConfig(max_batch=8, max_context=args.max_context))
    result = {"mode": args.mode}
    started, warmed = time.perf_counter(), threading.Event()

    def warm_done(count: int) -> None:
        result.update(programs=count, warm_up_s=time.perf_counter() - started)
        warmed.set()
    if args.mode == "background":
        engine.start_warm_up(threads=args.warm_up_threads, then=warm_done)
    elif args.mode != "cold":
        warm_done(engine.warm_up(threads=args.warm_up_threads))
    times: dict[str, list[float]] = {}
    done = threading.Event()

    def sink(name):
        times[name] = []

        def on_event(event):
            if event[0] == "token":
                times[name].append(time.perf_counter())
            elif name == "w0_0":
                done.set()
        return on_event

    rng = np.random.default_rng(0)
    limit = args.every * 5
    sent = {}
    for wave, size in enumerate((1, 1, 2, 4)):
        if wave:
            while len(times["w0_0"]) < wave * args.every:
                time.sleep(0.002)
        sent[wave] = time.perf_counter()
        engine.submit_all([
            Completion(rng.integers(3, 6000, int(rng.integers(8, 40))).tolist(),
                       SamplingConfig(temperature=0.0,  # all end with the first request
                                      max_new_tokens=limit - wave * args.every),
                       sink(f"w{wave}_{i}"))
            for i in range(size)])
    done.wait(600)
    if args.mode == "background":
        warmed.wait(1200)
    engine.stop()
    gaps = np.diff(times["w0_0"])
    median = float(np.median(gaps))
    result.update(
        longest_gap_ms=1e3 * float(gaps.max()), median_gap_ms=1e3 * median,
        stalled_ms=1e3 * float(np.sum(gaps[gaps > 3 * median] - median)),
        ttft_ms=[1e3 * (min(times[name][0] for name in times if name.startswith(f"w{w}_"))
                        - sent[w]) for w in sent],
        compilations=engine.compilations)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minimind2-small")
    parser.add_argument("--max_context", type=int, default=1024)
    parser.add_argument("--every", type=int, default=40, help="tokens between two waves")
    parser.add_argument("--warm_up_threads", type=int, default=1,
                        help="threads compiling the warm-up's programs")
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # a child's
    args = parser.parse_args()
    if args.mode:
        print("RESULT " + json.dumps(one_mode(args)), flush=True)
        return
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as empty:
        env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")  # this checkout
        rows = []
        for mode in ("cold", "warm", "warm_again", "background"):
            folder = {"cold": None, "background": empty}.get(mode, cache)
            child_env = env | ({"JAX_COMPILATION_CACHE_DIR": folder} if folder else {})
            done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode],
                                  env=child_env, capture_output=True, text=True, check=False)
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode or not line:
                sys.exit(f"error: mode {mode} failed: {done.stderr[-2000:]}")
            rows.append(json.loads(line[0][7:]))
            print(rows[-1], flush=True)
    print(f"\n{args.preset}, 8 slots, context {args.max_context}; waves of 1, 1, 2, 4 requests "
          f"{args.every} tokens apart\n")
    print("| mode | warm-up | longest gap | stalled | median gap | TTFT of waves 1-4 (ms) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        warm = (f"{r['warm_up_s']:.1f} s ({r['programs']} programs)" if "warm_up_s" in r
                else "none")
        print(f"| {r['mode']} | {warm} | {r['longest_gap_ms']:.0f} ms | "
              f"{r['stalled_ms']:.0f} ms | {r['median_gap_ms']:.1f} ms | "
              + " / ".join(f"{t:.0f}" for t in r["ttft_ms"]) + " |")


if __name__ == "__main__":
    main()
