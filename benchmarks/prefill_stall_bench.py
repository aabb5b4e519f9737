"""How long the server's running rows stall when a long prompt arrives, with and without
chunked prefill (random weights; timing does not depend on them).

    python benchmarks/prefill_stall_bench.py --preset minimind2-small --prompt_len 900

For each `--chunks` value C (the engine's prefill_chunk; one at least as long as the prompt
prefills it in one call, as the engine did before chunking), a fresh BatchEngine: `--running`
completions decode (short prompts, a limit they do not reach), then `--long_prompts` prompts of
`--prompt_len` tokens arrive together (each as `--choices` completions of it: a request's `n`).
Every token's arrival time is recorded; the figures are the running rows' longest gap between
two tokens from the arrival until the last long prompt's first token (what a streaming client
sees as a freeze), their median gap before the arrival, and the long prompts' times to first
token (the first's and the last's). A warm-up round per C compiles every program first.
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from minimind_jax.infer.sampling import SamplingConfig
from minimind_jax.model.config import preset
from minimind_jax.model.transformer import init_params
from minimind_jax.runtime.xla_flags import apply_cpu_defaults
from minimind_jax.serve.engine import BatchEngine, Completion, EngineConfig


class Clock:
    """Arrival times of each completion's tokens; `waiting_long` counts the long prompts still
    without a first token."""

    def __init__(self, n_long: int):
        self.times: dict[str, list[float]] = {}
        self.all_long = threading.Event()
        self.waiting_long = n_long

    def sink(self, name: str):
        self.times[name] = []

        def on_event(event):
            if event[0] == "token":
                self.times[name].append(time.perf_counter())
                if name.startswith("long") and len(self.times[name]) == 1:
                    self.waiting_long -= 1  # events come from the one worker thread
                    if not self.waiting_long:
                        self.all_long.set()
        return on_event


def one_round(engine: BatchEngine, args, rng) -> dict:
    n_long = args.long_prompts * args.choices
    clock = Clock(n_long)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=args.max_context - 32)
    running = [Completion(rng.integers(3, 6000, 16).tolist(), sampling, clock.sink(f"r{i}"))
               for i in range(args.running)]
    engine.submit_all(running)
    while min(len(clock.times[f"r{i}"]) for i in range(args.running)) < 20:
        time.sleep(0.005)
    arrival = time.perf_counter()
    prompts = [rng.integers(3, 6000, args.prompt_len).tolist() for _ in range(args.long_prompts)]
    engine.submit_all([Completion(prompts[i // args.choices],
                                  SamplingConfig(temperature=0.0, max_new_tokens=2),
                                  clock.sink(f"long{i}"), seed=i) for i in range(n_long)])
    clock.all_long.wait(600)
    firsts = sorted(clock.times[f"long{i}"][0] for i in range(n_long))
    first = firsts[-1]
    time.sleep(0.2)  # a few more steps after it
    for completion in running:
        completion.cancel()
    gaps_before, gaps_during = [], []
    for i in range(args.running):
        t = np.asarray(clock.times[f"r{i}"])
        gaps = np.diff(t)
        gaps_before += gaps[t[1:] < arrival].tolist()
        # gaps that overlap [arrival, first token of the last long prompt]
        gaps_during += gaps[(t[1:] > arrival) & (t[:-1] < first)].tolist()
    return {"ttft": firsts[0] - arrival, "ttft_last": first - arrival,
            "gap_before": float(np.median(gaps_before)),
            "gap_max": max(gaps_during), "gaps_during": len(gaps_during) / args.running}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="minimind2-small")
    parser.add_argument("--prompt_len", type=int, default=900)
    parser.add_argument("--running", type=int, default=7, help="completions decoding already")
    parser.add_argument("--long_prompts", type=int, default=1,
                        help="long prompts arriving together")
    parser.add_argument("--choices", type=int, default=1,
                        help="completions of each long prompt (a request's n)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 256, 128])
    parser.add_argument("--max_context", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per chunk size")
    args = parser.parse_args()
    if not 0 < args.prompt_len < args.max_context - 2:
        parser.error("--prompt_len must be in [1, max_context - 2)")
    apply_cpu_defaults()
    config = preset(args.preset)
    params = init_params(config, 0)
    print(f"{args.preset}, {args.running} rows decoding, then {args.long_prompts} prompt(s) of "
          f"{args.prompt_len} tokens x {args.choices} choice(s); medians of {args.rounds} rounds")
    print("| prefill_chunk | long prompts' TTFT, first / last | running rows' longest gap "
          "| their usual gap | their tokens meanwhile |")
    print("|---|---|---|---|---|")
    for chunk in args.chunks:
        engine = BatchEngine(params, config, eos_id=-1, pad_id=0,
                             config=EngineConfig(max_batch=args.running
                                                 + args.long_prompts * args.choices,
                                                 batch_wait_s=0,
                                                 max_context=args.max_context,
                                                 prefill_chunk=chunk))
        rng = np.random.default_rng(0)
        try:
            one_round(engine, args, rng)  # compiles
            rounds = [one_round(engine, args, rng) for _ in range(args.rounds)]
        finally:
            engine.stop()
        med = {key: float(np.median([r[key] for r in rounds])) for key in rounds[0]}
        label = f"{chunk}" + (" (whole prompt)" if chunk >= args.prompt_len else "")
        print(f"| {label} | {med['ttft'] * 1e3:,.0f} / {med['ttft_last'] * 1e3:,.0f} ms "
              f"| {med['gap_max'] * 1e3:,.0f} ms "
              f"| {med['gap_before'] * 1e3:.0f} ms | {med['gaps_during']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
