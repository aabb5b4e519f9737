"""`compare`: put loss curves side by side, aligned by global micro-step.

A run is one of
- our `metrics.jsonl` (one JSON object per logged micro-step with `step` and `loss`),
- a PyTorch-reference stdout log: MiniMind2's `Epoch:[e/E](step/iters) loss:... lr:...` (`e`
  1-based, `step` 0-based within the epoch, so the global micro-step is (e-1)*iters + step) or
  minimind-3's `Epoch:[e/E](step/iters), loss: ..., logits_loss: ..., aux_loss: ..., lr: ...`
  (`step` 1-based: the global micro-step is (e-1)*iters + step - 1),
- a CSV export (wandb, SwanLab, ...) with a step column and a loss column, found by name. minimind-3
  logs without a step, so its exports count log calls; `--csv_log_steps INTERVAL:ITERS` turns
  that count back into micro-steps (logged every INTERVAL micro-steps and at each epoch's end).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import pathlib

import numpy as np

from minimind_jax.errors import UserError
from minimind_jax.model.flags import HelpFormatter
from minimind_jax.train.log_lines import REFERENCE_LINE, logged_steps, parse_reference_log

_STEP_NAMES = ("step", "_step", "global_step", "steps", "iter", "iteration", "train/step")
_LOSS_NAMES = ("loss", "train/loss", "train_loss", "train/train_loss")


@dataclasses.dataclass(frozen=True)
class LossCurve:
    """One run's losses at its logged global micro-steps (steps ascending, unique)."""

    name: str
    steps: np.ndarray  # int64 [N]
    losses: np.ndarray  # float64 [N]
    source: str  # "metrics", "reference log" or "csv"


def _curve(name: str, source: str, pairs: list[tuple[int, float]], path: pathlib.Path) -> LossCurve:
    if not pairs:
        raise UserError(f"{path}: no recognisable loss lines (expected our metrics.jsonl, a "
                        "reference log with 'Epoch:[e/E](step/iters) loss:...' lines, or a CSV "
                        "with a step and a loss column)")
    by_step = dict(pairs)  # a step logged twice (e.g. a resumed run) keeps its last value
    steps = np.array(sorted(by_step), dtype=np.int64)
    losses = np.array([by_step[s] for s in steps], dtype=np.float64)
    return LossCurve(name=name, steps=steps, losses=losses, source=source)


def parse_log_steps(text: str) -> tuple[int, int]:
    """`INTERVAL:ITERS` of --csv_log_steps."""
    try:
        interval, iters = (int(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"--csv_log_steps must be INTERVAL:ITERS (two integers), got "
                        f"{text!r}") from None
    if interval < 1 or iters < 1:
        raise UserError(f"--csv_log_steps values must be >= 1, got {text!r}")
    return interval, iters


def parse_metrics_jsonl(lines, path: pathlib.Path, key: str = "loss") -> list[tuple[int, float]]:
    """(step, loss) of each record of our metrics.jsonl; records without `key` (e.g.
    "eval_loss" for the validation curve) are skipped."""
    pairs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or key not in record:
            continue
        try:
            pairs.append((int(record["step"]), float(record[key])))
        except KeyError:
            raise UserError(f"{path}:{number}: record has a 'loss' but no 'step' field") from None
        except (TypeError, ValueError):
            raise UserError(f"{path}:{number}: 'step' must be an integer and 'loss' a number, "
                            f"got step={record.get('step')!r}, "
                            f"loss={record.get('loss')!r}") from None
    return pairs


def _pick_column(header: list[str], wanted: str | None, names: tuple[str, ...], kind: str,
                 path: pathlib.Path) -> int:
    lowered = [h.strip().lower() for h in header]
    if wanted is not None:
        if wanted.strip().lower() not in lowered:
            raise UserError(f"{path}: no column {wanted!r} (columns: {header})")
        return lowered.index(wanted.strip().lower())
    for name in names:
        if name in lowered:
            return lowered.index(name)
    if kind == "loss":
        # wandb exports name columns "<run> - loss" next to "<run> - loss__MIN"/"__MAX".
        for i, h in enumerate(lowered):
            if (h.endswith(" - loss") or h.endswith("/loss")) and "aux" not in h:
                return i
        candidates = [i for i, h in enumerate(lowered)
                      if "loss" in h and not any(x in h for x in ("__min", "__max", "aux", "step"))]
        if len(candidates) == 1:
            return candidates[0]
        if candidates:
            raise UserError(f"{path}: several loss columns {[header[i] for i in candidates]}; "
                            "choose one with --loss_column")
    raise UserError(f"{path}: no {kind} column (columns: {header}); name it with --{kind}_column")


def parse_csv(lines, path: pathlib.Path, step_column: str | None = None,
              loss_column: str | None = None) -> list[tuple[int, float]]:
    """(step, loss) of each CSV row with both cells filled; columns are found by name."""
    rows = csv.reader(lines)
    header = next(rows, None)
    if not header:
        return []
    step_i = _pick_column(header, step_column, _STEP_NAMES, "step", path)
    loss_i = _pick_column(header, loss_column, _LOSS_NAMES, "loss", path)
    pairs = []
    for number, row in enumerate(rows, start=2):
        if len(row) <= max(step_i, loss_i) or not row[step_i].strip() or not row[loss_i].strip():
            continue  # wandb leaves cells empty where a metric was not logged
        try:
            pairs.append((int(float(row[step_i])), float(row[loss_i])))
        except ValueError:
            raise UserError(f"{path}:{number}: step {row[step_i]!r} or loss {row[loss_i]!r} "
                            "is not a number") from None
    return pairs


def load_curve(path: str | pathlib.Path, name: str | None = None, step_column: str | None = None,
               loss_column: str | None = None,
               csv_log_steps: tuple[int, int] | None = None) -> LossCurve:
    """Read a metrics.jsonl, a reference stdout log or a CSV export, detected by content.
    `csv_log_steps` (interval, iters): a CSV's steps count minimind-3's log calls."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    lines = text.splitlines()
    first = next((line.strip() for line in lines if line.strip()), "")
    name = name or path.stem
    if REFERENCE_LINE.search(text):
        return _curve(name, "reference log", parse_reference_log(lines), path)
    if first.startswith("{"):
        return _curve(name, "metrics", parse_metrics_jsonl(lines, path, loss_column or "loss"),
                      path)
    if path.suffix.lower() == ".csv" or (first.count(",") and "loss" in first.lower()):
        pairs = parse_csv(lines, path, step_column, loss_column)
        if csv_log_steps:
            logged = logged_steps(*csv_log_steps)
            steps = [next(logged) for _ in range(max((s for s, _ in pairs), default=-1) + 1)]
            pairs = [(steps[s], loss) for s, loss in pairs if s >= 0]
        return _curve(name, "csv", pairs, path)
    return _curve(name, "unknown", [], path)


def unique_names(paths: list[str]) -> list[str]:
    """Short labels for the runs: file stems, or parent/stem where stems collide."""
    stems = [pathlib.Path(p).stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    labels = [f"{pathlib.Path(p).parent.name}/{pathlib.Path(p).stem}" for p in paths]
    return labels if len(set(labels)) == len(labels) else [f"{i}:{s}" for i, s in enumerate(stems)]


def align(curves: list[LossCurve]) -> tuple[np.ndarray, np.ndarray]:
    """Steps logged by every run and the losses there: (steps [S], losses [R, S])."""
    common = curves[0].steps
    for curve in curves[1:]:
        common = np.intersect1d(common, curve.steps)
    losses = np.stack([c.losses[np.searchsorted(c.steps, common)] for c in curves])
    return common, losses


def auto_window(steps: np.ndarray, rows: int = 10) -> int:
    """A window (in micro-steps) that gives about `rows` table rows."""
    if len(steps) == 0:
        return 1
    span = int(steps[-1]) + 1
    raw = max(1, math.ceil(span / rows))
    magnitude = 10 ** (len(str(raw)) - 1)
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)


@dataclasses.dataclass(frozen=True)
class WindowRow:
    start: int  # first micro-step of the window (inclusive)
    stop: int  # end of the window (exclusive)
    count: int  # aligned steps inside
    means: np.ndarray  # [R] mean loss of each run


def window_rows(steps: np.ndarray, losses_RS: np.ndarray, window: int) -> list[WindowRow]:
    """Mean loss of each run over consecutive `window`-micro-step windows (empty ones skipped)."""
    rows = []
    index = steps // window
    for w in np.unique(index):
        inside = index == w
        rows.append(WindowRow(start=int(w * window), stop=int((w + 1) * window),
                              count=int(inside.sum()), means=losses_RS[:, inside].mean(axis=1)))
    return rows


@dataclasses.dataclass(frozen=True)
class Summary:
    """Differences of each run against the first one over the aligned steps."""

    steps: np.ndarray  # [S] aligned steps
    losses: np.ndarray  # [R, S]
    mean_diff: np.ndarray  # [R] mean of (run - first)
    mean_abs_diff: np.ndarray  # [R]
    max_abs_diff: np.ndarray  # [R]
    max_abs_diff_step: np.ndarray  # [R] step where it happens


def summarize(curves: list[LossCurve]) -> Summary:
    steps, losses = align(curves)
    if len(steps) == 0:
        raise UserError("the runs share no logged micro-step: "
                        + "; ".join(f"{c.name}: steps {c.steps[0]}..{c.steps[-1]}" for c in curves))
    diff = losses - losses[:1]
    worst = np.argmax(np.abs(diff), axis=1)
    return Summary(steps=steps, losses=losses, mean_diff=diff.mean(axis=1),
                   mean_abs_diff=np.abs(diff).mean(axis=1), max_abs_diff=np.abs(diff).max(axis=1),
                   max_abs_diff_step=steps[worst])


def format_report(curves: list[LossCurve], summary: Summary, window: int) -> str:
    """The printed comparison: runs, per-window table, overall differences, final losses."""
    names = [c.name for c in curves]
    width = max(10, *(len(n) for n in names))
    out = ["runs:"]
    for c in curves:
        out.append(f"  {c.name:<{width}}  {c.source:<13}  {len(c.steps):>7} points, "
                   f"steps {c.steps[0]}..{c.steps[-1]}")
    out.append(f"aligned: {len(summary.steps)} common micro-steps "
               f"({summary.steps[0]}..{summary.steps[-1]}), window {window}")
    head = f"{'steps':>17} {'n':>5} " + " ".join(f"{n:>{width}}" for n in names)
    head += "".join(f" {'Δ ' + n:>{width + 2}}" for n in names[1:])
    out += ["", head]
    for row in window_rows(summary.steps, summary.losses, window):
        line = f"{f'[{row.start}, {row.stop})':>17} {row.count:>5} "
        line += " ".join(f"{m:>{width}.4f}" for m in row.means)
        line += "".join(f" {m - row.means[0]:>+{width + 2}.4f}" for m in row.means[1:])
        out.append(line)
    out.append("")
    for i, name in enumerate(names[1:], start=1):
        out.append(f"{name} - {names[0]}: mean {summary.mean_diff[i]:+.6f}, "
                   f"mean |diff| {summary.mean_abs_diff[i]:.6f}, max |diff| "
                   f"{summary.max_abs_diff[i]:.6f} at step {summary.max_abs_diff_step[i]}")
    finals = zip(names, summary.losses[:, -1], strict=True)
    out.append(f"final losses at common step {summary.steps[-1]}: "
               + ", ".join(f"{n} {v:.4f}" for n, v in finals))
    if any(c.steps[-1] != summary.steps[-1] for c in curves):
        out.append("last logged losses: " + ", ".join(
            f"{c.name} {c.losses[-1]:.4f} (step {c.steps[-1]})" for c in curves))
    return "\n".join(out)


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard-style exponential moving average, debiased so it starts at the data."""
    out = np.empty_like(values)
    acc, norm = 0.0, 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out[i] = acc / norm
    return out


def plot_curves(curves: list[LossCurve], path: str | pathlib.Path, smooth: float = 0.0,
                summary: Summary | None = None, title: str | None = None) -> pathlib.Path:
    """Write a PNG: the loss curves (raw faint + smoothed when `smooth` > 0) and, given a
    summary of two or more runs, their difference to the first run on the aligned steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    show_diff = summary is not None and len(curves) > 1
    fig, axes = plt.subplots(2 if show_diff else 1, 1, figsize=(9, 7 if show_diff else 4.5),
                             sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1.3] if show_diff else [1]})
    ax = axes[0, 0]
    for i, c in enumerate(curves):
        color = f"C{i}"
        if smooth > 0:
            ax.plot(c.steps, c.losses, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(c.steps, ema(c.losses, smooth), color=color, linewidth=1.4, label=c.name)
        else:
            ax.plot(c.steps, c.losses, color=color, linewidth=1.2, label=c.name)
    ax.set_ylabel("loss")
    ax.set_title(title or ("loss" + (f" (EMA smoothing {smooth})" if smooth > 0 else "")))
    ax.grid(alpha=0.3)
    ax.legend()
    if show_diff:
        dx = axes[1, 0]
        for i, c in enumerate(curves[1:], start=1):
            diff = summary.losses[i] - summary.losses[0]
            dx.plot(summary.steps, diff, color=f"C{i}", linewidth=1.0,
                    label=f"{c.name} - {curves[0].name}")
        dx.axhline(0.0, color="black", linewidth=0.6)
        dx.set_ylabel("difference")
        dx.grid(alpha=0.3)
        dx.legend()
    axes[-1, 0].set_xlabel("global micro-step")
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare_files(paths: list[str], names: list[str] | None = None, window: int | None = None,
                  plot: str | None = None, smooth: float = 0.0, difference: bool = True,
                  step_column: str | None = None, loss_column: str | None = None,
                  title: str | None = None,
                  csv_log_steps: tuple[int, int] | None = None) -> str:
    """Load, align and report on the runs; optionally write the plot. Returns the report."""
    names = names or unique_names(paths)
    if len(names) != len(paths):
        raise UserError(f"--names gives {len(names)} names for {len(paths)} runs")
    curves = [load_curve(p, n, step_column, loss_column, csv_log_steps)
              for p, n in zip(paths, names, strict=True)]
    if difference or len(curves) == 1:
        summary = summarize(curves)
        report = format_report(curves, summary, window or auto_window(summary.steps))
    else:
        summary = None
        report = "\n".join(f"{c.name}: {len(c.steps)} points, steps {c.steps[0]}..{c.steps[-1]}, "
                           f"first loss {c.losses[0]:.4f}, final loss {c.losses[-1]:.4f}"
                           for c in curves)
    if plot:
        written = plot_curves(curves, plot, smooth=smooth, summary=summary, title=title)
        report += f"\nplot written to {written}"
    return report


def run_compare(args: argparse.Namespace) -> int:
    if not 0.0 <= args.smooth < 1.0:
        raise UserError(f"--smooth must be in [0, 1), got {args.smooth}")
    if args.window is not None and args.window < 1:
        raise UserError(f"--window must be >= 1, got {args.window}")
    names = args.names.split(",") if args.names else None
    print(compare_files(args.runs, names=names, window=args.window, plot=args.plot,
                        smooth=args.smooth, difference=not args.no_diff,
                        step_column=args.step_column, loss_column=args.loss_column,
                        csv_log_steps=(parse_log_steps(args.csv_log_steps)
                                       if args.csv_log_steps else None)))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", formatter_class=HelpFormatter,
        help="compare loss curves (ours, the PyTorch reference's log, CSV exports)",
        description=__doc__ + "\nThe first run is the baseline the differences are taken against."
                              "\n\nexample:\n  minimind-jax compare out/pretrain/metrics.jsonl "
                              "torch_pretrain.log --plot loss.png --smooth 0.6",
    )
    parser.add_argument("runs", nargs="+", help="metrics.jsonl, reference log or CSV files")
    parser.add_argument("--names", default=None,
                        help="comma-separated labels for the runs (default: file names)")
    parser.add_argument("--window", type=int, default=None,
                        help="micro-steps per table row (default: about 10 rows)")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="write the curves and their difference to this PNG")
    parser.add_argument("--smooth", type=float, default=0.0,
                        help="EMA smoothing weight in [0, 1) for the plotted curves (0 = raw)")
    parser.add_argument("--no_diff", action="store_true",
                        help="only plot/list the curves (runs of different stages, no alignment)")
    parser.add_argument("--step_column", default=None, help="CSV step column (default: by name)")
    parser.add_argument("--loss_column", default=None,
                        help="CSV loss column (default: by name); for metrics.jsonl the record "
                             "key, e.g. eval_loss for the validation curve (default loss)")
    parser.add_argument("--csv_log_steps", default=None, metavar="INTERVAL:ITERS",
                        help="the CSV's step column counts log calls of a minimind-3 run "
                             "logging every INTERVAL micro-steps with ITERS per epoch (wandb/"
                             "SwanLab step without step=); map them to micro-steps")
    parser.set_defaults(func=run_compare)
