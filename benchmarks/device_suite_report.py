"""suite.md and suite.json from the pieces benchmarks/device_suite.sh wrote under OUT.

    python benchmarks/device_suite_report.py OUT [--total_s S]

Only measured figures are shown; a step that failed, timed out or was skipped says so.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import xml.etree.ElementTree as ET


def _read_json(path: pathlib.Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _gib(n) -> str:
    return "" if n is None else f"{n / 2**30:.2f}"


def golden_summary(out: pathlib.Path) -> dict | None:
    """Counts from the golden tests' JUnit XML."""
    path = out / "golden.xml"
    if not path.is_file():
        return None
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["time_s"] = float(suite.get("time", 0.0))
    return counts


def bench_rows(out: pathlib.Path, steps: dict) -> list[dict]:
    """One row per bench step, in the order the suite ran them."""
    rows = []
    for name, record in steps.items():
        if not name.startswith("bench_"):
            continue
        data = _read_json(out / f"{name}.json") if record["status"] == "ok" else None
        row = {"name": name.removeprefix("bench_"), "status": record["status"]}
        if data:
            ours, cfg = data["jax"], data["config"]
            row |= {"attention": cfg["attention_impl"], "moe": cfg["moe_impl"] if cfg["use_moe"]
                    else "", "tokens_per_s": ours["tokens_per_s"],
                    "step_ms": ours["step_s"] * 1e3, "mfu": ours["mfu"],
                    "compile_s": ours["compile_s"], "peak_bytes": ours["peak_bytes"],
                    "peak_tflops": data["peak_flops"] / 1e12,
                    "batch": f"{data['batch_size']} x {data['seq_len']}"}
            for other in ("torch-eager", "reference"):
                if other in data:
                    row[f"{other}_tokens_per_s"] = data[other]["tokens_per_s"]
                    row[f"{other}_mfu"] = data[other]["mfu"]
                    row[f"{other}_peak_bytes"] = data[other]["peak_bytes"]
            if "speedup_vs_reference" in data:
                row["speedup_vs_reference"] = data["speedup_vs_reference"]
        rows.append(row)
    return rows


def _cell(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def markdown(env, golden, rows, epoch, steps, total_s) -> str:
    lines = ["# Device suite", ""]
    if env:
        lines.append(f"Device: {env['device']} x{env['count']} ({env['platform']}), "
                     f"jax {env['jax']}, host {env['host']}; suite {total_s:.0f} s.")
    if golden:
        lines.append(f"Golden tests: {golden['tests']} run, {golden['failures']} failed, "
                     f"{golden['errors']} errors, {golden['skipped']} skipped "
                     f"({golden['time_s']:.0f} s).")
    else:
        lines.append(f"Golden tests: {steps.get('golden', {}).get('status', 'not run')}.")
    lines += ["", "| model | attention | moe | batch | ours tokens/s | step ms | MFU | compile s "
              "| peak GiB | eager PyTorch tokens/s (MFU) | reference tokens/s (MFU) "
              "| ours / reference |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['name']} | | | | {r['status']} | | | | | | | |")
            continue
        torch_cell = (f"{r['torch-eager_tokens_per_s']:,.0f} ({r['torch-eager_mfu']:.1%})"
                      if "torch-eager_tokens_per_s" in r else "")
        ref_cell = (f"{r['reference_tokens_per_s']:,.0f} ({r['reference_mfu']:.1%})"
                    if "reference_tokens_per_s" in r else "")
        lines.append(
            f"| {r['name']} | {r['attention']} | {r['moe']} | {r['batch']} "
            f"| {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {r['mfu']:.1%} "
            f"| {r['compile_s']:.1f} | {_gib(r['peak_bytes'])} | {torch_cell} | {ref_cell} "
            f"| {_cell(r.get('speedup_vs_reference'), '.2f')} |")
    peaks = sorted({float(f"{r['peak_tflops']:.3g}") for r in rows if "peak_tflops" in r})
    if peaks:
        lines += ["", f"MFU: PaLM's 6N + 12·L·d·T FLOPs per token over the matmul peak measured "
                      f"in each bench process (before and after its steps, the higher): "
                      f"{', '.join(map(str, peaks))} TFLOP/s."]
    lines += ["", "## Whole epoch"]
    if epoch:
        lines += ["", f"{epoch['n_docs']:,} documents, {epoch['mean_tokens']:.1f} tokens on "
                      f"average; token cache built in {epoch['prepare_s']:.1f} s.", "",
                  "| run | rows | filled | steps | epoch s | steady-state s |",
                  "|---|---|---|---|---|---|"]
        for mode in ("padded", "next_fit", "best_fit", "reference"):
            if mode in epoch:
                e = epoch[mode]
                lines.append(f"| {mode} | {e.get('rows', '')} | "
                             f"{_cell(e.get('fill'), '.1%')} | {e['steps']} | "
                             f"{e['wall_s']:.1f} | {_cell(e.get('steady_s'), '.1f')} |")
        ratios = [f"{k.split('/')[1]} over {k.split('/')[0]} {v:.2f}x"
                  for k, v in epoch.items() if "/" in k]
        if ratios:
            lines += ["", "Epoch speed-ups (wall time): " + "; ".join(ratios) + "."]
    else:
        lines += ["", f"not measured ({steps.get('epoch', {}).get('status', 'not run')})."]
    lines += ["", "## Steps", "", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {k} | {v['status']} | {v['seconds']} |" for k, v in steps.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--total_s", type=float, default=0.0)
    args = parser.parse_args()
    steps = {}
    steps_file = args.out / "steps.jsonl"
    if steps_file.is_file():
        for line in steps_file.read_text().splitlines():
            record = json.loads(line)
            steps[record["step"]] = record
    env, golden = _read_json(args.out / "env.json"), golden_summary(args.out)
    rows = bench_rows(args.out, steps)
    epoch = _read_json(args.out / "epoch.json") if steps.get("epoch", {}).get("status") == "ok" \
        else None
    text = markdown(env, golden, rows, epoch, steps, args.total_s)
    (args.out / "suite.md").write_text(text)
    (args.out / "suite.json").write_text(json.dumps(
        {"env": env, "golden": golden, "bench": rows, "epoch": epoch, "steps": steps,
         "total_s": args.total_s}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
