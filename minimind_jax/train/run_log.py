"""What a run reports: metrics.jsonl, the tracker, the reference-style console line and the
progress bar (process 0 only), with the clocks they report."""

from __future__ import annotations

import json
import pathlib
import sys
import time

from minimind_jax.runtime import distributed
from minimind_jax.train import tracking
from minimind_jax.train.log_lines import LineStyle


def say(message: str, file=None) -> None:
    """Print a line on process 0 (above the progress bar)."""
    if distributed.is_main_process():
        from tqdm import tqdm

        tqdm.write(message, file=file or sys.stdout)


def warn(message: str) -> None:
    """`say` on stderr."""
    say(message, file=sys.stderr)


class RunLog:
    """metrics.jsonl + the tracker (TensorBoard, wandb, ...) + the reference-style line + the
    tqdm bar (main process), and the clocks they report: run time, throughput since the last
    logged step, time into the epoch."""

    def __init__(self, run_dir: pathlib.Path, start_step: int, total_steps: int,
                 enabled: bool, tracker=None, *, lines: LineStyle | None = None,
                 elapsed_before: float = 0.0):
        self.enabled = enabled
        self.lines = lines
        self.parts: tuple[str, ...] = ()  # an objective's own metrics (train_step `parts`)
        self.elapsed_before = elapsed_before  # run time of the attempts before a resume
        self.metrics_path = run_dir / "metrics.jsonl"
        self.file = self.tracker = self.bar = None
        self.start_clocks()
        if not enabled:
            return
        from tqdm import tqdm

        self._keep_records_before(start_step)
        self.file = self.metrics_path.open("a", encoding="utf-8")
        self.tracker = tracker or tracking.MultiTracker([])
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not sys.stderr.isatty(), file=sys.stderr)

    def start_clocks(self) -> None:
        """Run time, the throughput window and the epoch clock start now."""
        self.run_start = self.window_since = self.epoch_start = time.time()
        self.window_tokens = 0
        self.epoch_first = 0

    def start_epoch(self, first_batch: int) -> None:
        self.epoch_start, self.epoch_first = time.time(), first_batch

    def elapsed(self) -> float:
        """Seconds of training so far, over all attempts of the run."""
        return self.elapsed_before + time.time() - self.run_start

    def step(self, metrics: dict, info: dict, lr_at) -> None:
        """One micro-step's fetched metrics (a record and a line if it is a logged step);
        `lr_at(step)` is the schedule's learning rate."""
        # Rows of the global batch (other processes load the other rows).
        self.window_tokens += int(metrics["n_rows"]) * info["seq_len"]
        style = self.lines
        if not style.is_logged(info["batch"]):
            return
        now = time.time()
        record = {"step": info["step"], "epoch": info["epoch"], "batch": info["batch"],
                  "update": int(metrics["update"]), "loss": float(metrics["loss"]),
                  "aux": float(metrics["aux"]),
                  # a step that keeps its own schedules (PPO) reports its learning rate
                  "lr": float(metrics["lr_now"]) if "lr_now" in metrics else lr_at(info["step"])}
        parts = metrics.get("parts", {})
        record.update({k: float(v) for k, v in parts.items()})
        self.parts = tuple(parts)
        if bool(metrics["updated"]):
            record["grad_norm"] = float(metrics["grad_norm"])
        if int(metrics["skipped"]):
            record["skipped"] = int(metrics["skipped"])
        record["tokens_per_sec"] = self.window_tokens / max(now - self.window_since, 1e-9)
        record["elapsed_s"] = self.elapsed_before + now - self.run_start
        self.window_tokens, self.window_since = 0, now
        line = style.line(info["epoch"], info["batch"], record, now - self.epoch_start,
                          max(info["batch"] - self.epoch_first + 1, 1))
        if int(metrics["consecutive_skips"]):
            from minimind_jax.train.train_step import NONFINITE_REASONS

            what = NONFINITE_REASONS.get(int(metrics["nonfinite"]), "value")
            line += (f" (non-finite {what}: skipped, {record['skipped']} so far, "
                     f"{int(metrics['consecutive_skips'])} in a row)")
        self.record(record, line)

    def _keep_records_before(self, step: int) -> None:
        """Drop records from a previous attempt at steps >= `step` (a resumed run redoes them)."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                # An evaluation after `step` micro-steps came before the checkpoint resumed.
                if record["step"] < step or (record["step"] == step and "eval_loss" in record):
                    kept.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # e.g. a half-written last line of a killed run
        self.metrics_path.write_text("".join(kept), encoding="utf-8")

    def record(self, record: dict, line: str | None) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.tracker.log({f"train/{key}": record[key] for key in
                          ("loss", "aux", "lr", "grad_norm", "tokens_per_sec", *self.parts)
                          if key in record}, record["step"])
        if line:
            self.bar.write(line, file=sys.stdout)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                             tok_s=f"{record['tokens_per_sec']:.0f}", refresh=False)

    def record_eval(self, result: dict, step: int, line: str) -> None:
        """A validation result (`evaluate.EvalResult.record()`) after `step` micro-steps."""
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **result}) + "\n")
        self.file.flush()
        self.tracker.log({"eval/loss": result["eval_loss"], "eval/ppl": result["eval_ppl"]},
                         step)
        self.bar.write(line, file=sys.stdout)

    def advance(self) -> None:
        if self.enabled:
            self.bar.update(1)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.tracker.close()
            self.file.close()

