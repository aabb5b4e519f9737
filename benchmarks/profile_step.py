"""Where a train step's device time goes: a `jax.profiler` trace of a few steps of our jitted
step, summarised per kernel and per kind of kernel (matmul, attention, fusion, reduce, copy,
collective, other) from the trace's device events.

    python benchmarks/profile_step.py --preset minimind2 --batch_size 64 --seq_len 512 \\
        --dtype bfloat16 --out DIR [--doc_len 110]

Writes DIR/profile_<name>.txt (the summary) and the raw trace under DIR/trace_<name>/.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys
import time

import jax

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from minimind_jax.model.flags import add_model_args, model_config_from_args  # noqa: E402
from minimind_jax.tools.bench import jax_stepper, synthetic_batch  # noqa: E402

KINDS = [  # first match wins, on the lower-cased kernel name
    ("attention", r"flash|fmha|cudnn|attention|sdpa"),
    ("matmul", r"gemm|matmul|cutlass|xmma|sm\d+_|dot|nvjet|wgmma"),
    ("collective", r"nccl|all-?reduce|all-?gather|reduce-?scatter"),
    ("copy", r"memcpy|memset|copy|transpose"),
    ("reduce", r"reduce|reduction"),
    ("fusion", r"fusion|loop_|input_|triton"),
]


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, low)), "other")


def device_lines(trace: dict) -> dict[str, list[dict]]:
    """Complete events of the device (GPU/TPU) processes, per timeline: the streams' kernels
    ("kernels") and, where the profiler adds it, the HLO-op line ("XLA Ops"); the two overlap,
    so each is summed on its own."""
    events = trace.get("traceEvents", [])
    device_pids, thread_names = set(), {}
    for event in events:
        if event.get("ph") != "M":
            continue
        label = str(event.get("args", {}).get("name", ""))
        if event.get("name") == "process_name" and re.search(r"/device:(GPU|TPU)", label):
            device_pids.add(event["pid"])
        if event.get("name") == "thread_name":
            thread_names[(event["pid"], event.get("tid"))] = label
    lines = collections.defaultdict(list)
    for event in events:
        if event.get("ph") != "X" or event.get("pid") not in device_pids or "dur" not in event:
            continue
        thread = thread_names.get((event["pid"], event.get("tid")), "")
        if thread.startswith("Stream"):
            lines["kernels"].append(event)
        elif thread == "XLA Ops":
            lines["XLA Ops"].append(event)
    return dict(lines)


def summarise(events: list[dict], steps: int, top: int = 30) -> str:
    per_name = collections.defaultdict(lambda: [0, 0.0])
    for event in events:
        per_name[event["name"]][0] += 1
        per_name[event["name"]][1] += event["dur"]
    total = sum(us for _, us in per_name.values()) or 1.0
    per_kind = collections.Counter()
    for name, (_, us) in per_name.items():
        per_kind[kind_of(name)] += us
    lines = [f"device time per step: {total / steps / 1e3:.2f} ms over {len(events)} events "
             f"({len(events) / steps:.0f} kernels per step)", "", "by kind:"]
    lines += [f"  {kind:10s} {us / steps / 1e3:8.2f} ms/step {us / total:6.1%}"
              for kind, us in per_kind.most_common()]
    lines += ["", f"top {top} kernels (ms/step, calls/step, share, kind):"]
    for name, (count, us) in sorted(per_name.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"  {us / steps / 1e3:8.3f} {count / steps:6.1f} {us / total:6.1%} "
                     f"{kind_of(name):10s} {name[:110]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--doc_len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--name", default="step")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    config = model_config_from_args(args)
    batch = synthetic_batch(args.batch_size, args.seq_len, config.vocab_size,
                            doc_len=args.doc_len)
    one_step, _ = jax_stepper(config, batch)
    one_step()
    one_step()  # compiled and warm
    out = pathlib.Path(args.out)
    trace_dir = out / f"trace_{args.name}"
    start = time.perf_counter()
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        for _ in range(args.steps):
            one_step()
    wall_ms = (time.perf_counter() - start) / args.steps * 1e3
    traces = sorted(trace_dir.rglob("*.trace.json.gz")) or sorted(trace_dir.rglob("*.json.gz"))
    if not traces:
        sys.exit(f"no trace file under {trace_dir}")
    with gzip.open(traces[-1], "rt") as f:
        trace = json.load(f)
    lines = device_lines(trace)
    text = (f"{args.name}: config {config.to_dict()}\nbatch {args.batch_size} x {args.seq_len}"
            f" doc_len {args.doc_len}; wall {wall_ms:.2f} ms/step while tracing\n")
    for line, events in lines.items():
        text += f"\n== {line}\n" + summarise(events, args.steps) + "\n"
    if not lines:
        names = {str(e.get("args", {}).get("name")) for e in trace.get("traceEvents", [])
                 if e.get("name") in ("process_name", "thread_name")}
        text += "\nno device events in the trace; its processes/threads: " + ", ".join(
            sorted(names))
    print(text)
    (out / f"profile_{args.name}.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
