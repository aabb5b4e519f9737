"""Experiment trackers: where a run's scalars go besides metrics.jsonl.

`--tracker tensorboard` (the default) writes TensorBoard events into the run folder's `tb/`;
`wandb` and `swanlab` add Weights & Biases or SwanLab (their packages are optional extras,
imported only when asked); `none` writes metrics.jsonl alone. `--use_wandb` is the reference's
flag: the same as `--tracker wandb`. Only the main process opens a tracker.

A tracker is `log(scalars, step)` + `close()`. The run id of an external tracker is stored in
the run folder (`tracker.json`), so a `--resume`d run continues the same tracker run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import shutil

from minimind_jax.errors import UserError

TRACKERS = ("tensorboard", "wandb", "swanlab", "none")
EXTERNAL = ("wandb", "swanlab")
STATE_FILE = "tracker.json"


def add_tracker_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("experiment tracking")
    g.add_argument("--tracker", choices=TRACKERS, default=None,
                   help="where the scalars go besides metrics.jsonl: tensorboard (tb/ in the "
                        "run folder; the default), wandb or swanlab (each also writes "
                        "tb/; pip install 'minimind_jax[wandb]' / '[swanlab]'), none. "
                        "Offline: WANDB_MODE=offline; SwanLab: SWANLAB_MODE=offline")
    g.add_argument("--use_wandb", action="store_true",
                   help="the reference's flag: --tracker wandb (minimind-3 sends it to "
                        "SwanLab: add --tracker swanlab)")
    g.add_argument("--wandb_project", default=None,
                   help="project of the wandb/SwanLab run (default: the reference script's, "
                        "e.g. MiniMind-Pretrain)")


def tracker_kind(tracker: str | None, use_wandb: bool) -> str:
    """--tracker, else wandb with --use_wandb, else tensorboard."""
    if tracker:
        if use_wandb and tracker not in EXTERNAL:
            raise UserError(f"--use_wandb asks for a tracker but --tracker is {tracker}")
        return tracker
    return "wandb" if use_wandb else "tensorboard"


def run_name(prefix: str, epochs: int, batch_size: int, learning_rate: float) -> str:
    """The reference's run name, e.g. MiniMind-Pretrain-Epoch-1-BatchSize-32-LearningRate-0.0005
    (`prefix` MiniMind-Pretrain)."""
    return (f"{prefix}-Epoch-{epochs}-BatchSize-{batch_size}-"
            f"LearningRate-{learning_rate}")


class MultiTracker:
    """Sends each `log` to several trackers."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(scalars, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


class TensorBoardTracker:
    """tb/ in the run folder; a resumed run drops the events at and after its first step."""

    def __init__(self, run_dir: pathlib.Path, start_step: int):
        from minimind_jax.train.tb_events import EventWriter

        if start_step == 0:  # a fresh run: no curves of an earlier run under the same name
            shutil.rmtree(run_dir / "tb", ignore_errors=True)
        self.writer = EventWriter(run_dir / "tb", purge_step=start_step or None)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.writer.add_scalars(scalars, step)

    def close(self) -> None:
        self.writer.close()


def _import_package(kind: str):
    try:
        return importlib.import_module(kind)
    except ImportError:
        raise UserError(f"--tracker {kind} needs the {kind} package: "
                        f"pip install 'minimind_jax[{kind}]' (or pip install {kind})") from None


class _ExternalRun:
    """A wandb or SwanLab run object (`self.run`): both log and finish alike."""

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class WandbTracker(_ExternalRun):
    """A Weights & Biases run (files in RUN/wandb/; WANDB_MODE=offline works without login)."""

    def __init__(self, run_dir: pathlib.Path, project: str, name: str, config: dict,
                 run_id: str | None):
        wandb = _import_package("wandb")
        try:
            self.run = wandb.init(project=project, name=name, config=config, dir=str(run_dir),
                                  id=run_id, resume="allow" if run_id else None)
        except Exception as err:  # no login, no network, bad project name, ...
            raise UserError(f"wandb could not start a run: {err} (log in with `wandb login`, "
                            "or set WANDB_MODE=offline and sync later)") from None
        self.id = self.run.id


class SwanLabTracker(_ExternalRun):
    """A SwanLab run (files in RUN/swanlog/; SWANLAB_MODE=offline needs no login)."""

    def __init__(self, run_dir: pathlib.Path, project: str, name: str, config: dict,
                 run_id: str | None):
        swanlab = _import_package("swanlab")
        try:
            self.run = swanlab.init(project=project, name=name, config=config,
                                    log_dir=str(run_dir / "swanlog"), id=run_id,
                                    resume="allow" if run_id else None, reinit=True)
        except Exception as err:
            raise UserError(f"swanlab could not start a run: {err} (log in with `swanlab "
                            "login`, or set SWANLAB_MODE=offline and sync later)") from None
        self.id = self.run.id


def _saved_run_id(run_dir: pathlib.Path, kind: str) -> str | None:
    path = run_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return saved.get("id") if saved.get("kind") == kind else None


def open_tracker(kind: str, project: str, name: str, flags: dict, run_dir: pathlib.Path,
                 start_step: int) -> MultiTracker:
    """The trackers this run logs to (call on the main process only): `kind` (tracker_kind),
    an external one named `name` in `project` with the scalar `flags` as its config. A run
    resumed past step 0 continues the external tracker's run stored in RUN/tracker.json."""
    trackers = [] if kind == "none" else [TensorBoardTracker(run_dir, start_step)]
    if kind in EXTERNAL:
        run_id = _saved_run_id(run_dir, kind) if start_step > 0 else None
        config = {k: v for k, v in flags.items()
                  if k != "func" and isinstance(v, (str, int, float, bool, type(None)))}
        cls = WandbTracker if kind == "wandb" else SwanLabTracker
        tracker = cls(run_dir, project, name, config, run_id)
        (run_dir / STATE_FILE).write_text(json.dumps({"kind": kind, "id": tracker.id}) + "\n",
                                          encoding="utf-8")
        trackers.append(tracker)
    return MultiTracker(trackers)
