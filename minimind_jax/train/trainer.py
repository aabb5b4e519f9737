"""`pretrain` and `sft` commands: the reference's training scripts, data-parallel and resumable.

A run writes `{out_dir}/{pretrain|full_sft}_{dim}{_moe}/`: `config.json` (the model),
`train_args.json` (the flags), `metrics.jsonl` (one record per logged micro-step), `tb/`
(TensorBoard), `tokenizer/` (a copy, so generation finds it) and `checkpoints/<step>/` (orbax).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import pathlib
import shutil
import sys
import time
from typing import Any

import jax

from minimind_jax.cli import compat_flags, model_args
from minimind_jax.data import prepare
from minimind_jax.data.batches import Loader
from minimind_jax.data.packing import DEFAULT_WINDOW as DEFAULT_PACK_WINDOW
from minimind_jax.data.rows import open_source
from minimind_jax.data.samples import STAGES, Stage, stage_named
from minimind_jax.errors import ENVIRONMENT_ERRNOS, RunFailure, UserError, os_error_line
from minimind_jax.model import convert
from minimind_jax.model.config import SHAPE_FIELDS, ModelConfig, arch_of
from minimind_jax.runtime import distributed, host_memory
from minimind_jax.train import (
    checkpoint,
    evaluate,
    optim,
    recipes,
    run_lock,
    tracking,
    train_config,
)
from minimind_jax.train.train_config import DataConfig, RunConfig, TrainConfig

REFERENCE_TOKENIZER_DIR = "model/minimind_tokenizer"  # where the reference keeps its tokenizer
HEAD_TOKENIZER_DIR = "model"  # where minimind-3 (HEAD) keeps its tokenizer.json


# ------------------------------------------------------------------------------------- setup


def run_dir_for(out_dir: str, stage: Stage, config: ModelConfig) -> pathlib.Path:
    return pathlib.Path(out_dir) / f"{stage.run_prefix}_{config.tag}"


def resolve_tokenizer(config: TrainConfig, stage: Stage) -> pathlib.Path:
    """--tokenizer; else the run's own copy (--resume) or, for sft, the pretrain run's copy;
    else the reference's ./model/minimind_tokenizer."""
    if config.data.tokenizer:
        return pathlib.Path(config.data.tokenizer)
    tag, run = config.model.tag, config.run
    candidates = []
    if run.resume:
        candidates.append(pathlib.Path(run.out_dir) / f"{stage.run_prefix}_{tag}" / "tokenizer")
    if stage.command == "sft" and not run.init_from:
        candidates.append(pathlib.Path(run.out_dir) / f"pretrain_{tag}" / "tokenizer")
    elif run.init_from and pathlib.Path(run.init_from).is_dir():  # one of our run folders
        candidates.append(pathlib.Path(run.init_from) / "tokenizer")
    if arch_of(config.model) == "minimind3":  # HEAD's scripts run from trainer/ and read ../model
        candidates += [pathlib.Path(HEAD_TOKENIZER_DIR), pathlib.Path("..") / HEAD_TOKENIZER_DIR]
    else:
        candidates.append(pathlib.Path(REFERENCE_TOKENIZER_DIR))
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise UserError("no tokenizer: pass --tokenizer DIR (a folder with tokenizer.json, e.g. the "
                    "reference's model/minimind_tokenizer); looked in "
                    + ", ".join(str(c) for c in candidates))


def check_same_shape(saved: ModelConfig, config: ModelConfig, where: str) -> None:
    diffs = [f"{f}: checkpoint {getattr(saved, f)!r}, flags {getattr(config, f)!r}"
             for f in SHAPE_FIELDS if getattr(saved, f) != getattr(config, f)]
    if diffs:
        raise UserError(f"{where} was trained with another model shape; pass matching flags:\n  "
                        + "\n  ".join(diffs))


def init_source(config: TrainConfig, stage: Stage) -> pathlib.Path | None:
    """Where the initial weights come from: --init_from; else sft: the pretrain run folder;
    else None (a seeded random init). Checked to exist, so a missing one fails early."""
    init_from = config.run.init_from
    if init_from == "none":  # minimind-3's --from_weight none
        return None
    if init_from:
        source = pathlib.Path(init_from)
        if not source.exists():
            raise UserError(f"--init_from: {source} does not exist")
        return source
    if stage.command != "sft":
        return None
    pretrain_dir = run_dir_for(config.run.out_dir, STAGES["pretrain"], config.model)
    if checkpoint.latest_checkpoint(pretrain_dir) is None:
        raise UserError(f"sft starts from the pretrain weights, but there is no checkpoint "
                        f"in {pretrain_dir}: run `pretrain` first with the same --out_dir "
                        "and model flags, or pass --init_from (checkpoint folder, .pth, "
                        ".safetensors or .npz)")
    return pretrain_dir


def initial_params(config: TrainConfig, stage: Stage, source: pathlib.Path | None,
                   model: ModelConfig):
    """(params, where they came from): `init_source`'s weights, or a seeded random init."""
    from minimind_jax.model.transformer import init_params

    if source is None:
        return init_params(model, jax.random.PRNGKey(config.seed)), "random init"
    params, _, origin = convert.load_weights(source, model, exact=True, warn=_warn)
    if stage.command == "sft" and recipes.recipe_named(config.recipe).fp16_sft_init:
        return recipes.round_to_float16(params), f"{origin} (rounded to float16, as HEAD)"
    return params, origin


def _is_main_process() -> bool:
    return distributed.is_main_process()


def _say(message: str, file=None) -> None:
    if _is_main_process():
        from tqdm import tqdm

        tqdm.write(message, file=file or sys.stdout)


def _warn(message: str) -> None:
    _say(message, file=sys.stderr)


# ------------------------------------------------------------------------------------- logging


class RunLog:
    """metrics.jsonl + the tracker (TensorBoard, wandb, ...) + the reference-style line + the
    tqdm bar (main process), and the clocks they report: run time, throughput since the last
    logged step, time into the epoch."""

    def __init__(self, run_dir: pathlib.Path, start_step: int, total_steps: int,
                 enabled: bool, tracker=None, *, lines: LineStyle | None = None,
                 elapsed_before: float = 0.0):
        self.enabled = enabled
        self.lines = lines
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
        if not is_logged_batch(info["batch"], style.batches, style.interval, style.head):
            return
        now = time.time()
        record = {"step": info["step"], "epoch": info["epoch"], "batch": info["batch"],
                  "update": int(metrics["update"]), "loss": float(metrics["loss"]),
                  "aux": float(metrics["aux"]), "lr": lr_at(info["step"])}
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
                          ("loss", "aux", "lr", "grad_norm", "tokens_per_sec") if key in record},
                         record["step"])
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


def reference_line(epoch: int, epochs: int, batch: int, batches: int, loss: float, lr: float,
                   epoch_seconds: float, batches_done: int) -> str:
    """`Epoch:[e/E](step/iters) loss:.. lr:.. epoch_Time:..min:` as the reference prints it."""
    minutes_left = epoch_seconds / batches_done * batches // 60 - epoch_seconds // 60
    return (f"Epoch:[{epoch + 1}/{epochs}]({batch}/{batches}) loss:{loss:.3f} lr:{lr:.12f} "
            f"epoch_Time:{minutes_left}min:")


def is_logged_batch(batch: int, batches: int, interval: int, head_style: bool) -> bool:
    """MiniMind2 logs 0-based batches b % interval == 0; minimind-3 (HEAD) logs 1-based steps
    s % interval == 0 and each epoch's last one, so the same micro-steps appear in both logs."""
    if head_style:
        return (batch + 1) % interval == 0 or batch + 1 == batches
    return batch % interval == 0


def head_reference_line(epoch: int, epochs: int, batch: int, batches: int, loss: float,
                        aux: float, lr: float, epoch_seconds: float, batches_done: int) -> str:
    """minimind-3's (HEAD's) line: `Epoch:[e/E](s/iters), loss: .., logits_loss: .., aux_loss:
    .., lr: .., epoch_time: ..min` with s 1-based (logits_loss = loss - aux)."""
    eta_min = epoch_seconds / batches_done * (batches - batch - 1) // 60
    return (f"Epoch:[{epoch + 1}/{epochs}]({batch + 1}/{batches}), loss: {loss:.4f}, "
            f"logits_loss: {loss - aux:.4f}, aux_loss: {aux:.4f}, lr: {lr:.8f}, "
            f"epoch_time: {eta_min:.1f}min")


@dataclasses.dataclass(frozen=True)
class LineStyle:
    """Which reference's console line, and at which batches: MiniMind2's or minimind-3's."""

    epochs: int
    batches: int  # per epoch
    interval: int  # --log_interval
    head: bool  # minimind-3 (HEAD)

    def line(self, epoch: int, batch: int, record: dict, epoch_seconds: float,
             batches_done: int) -> str:
        if self.head:
            return head_reference_line(epoch, self.epochs, batch, self.batches, record["loss"],
                                       record["aux"], record["lr"], epoch_seconds, batches_done)
        return reference_line(epoch, self.epochs, batch, self.batches, record["loss"],
                              record["lr"], epoch_seconds, batches_done)


# ------------------------------------------------------------------------------------- the run


def _write_run_files(run_dir: pathlib.Path, model: ModelConfig, config: TrainConfig,
                     tokenizer_dir: pathlib.Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / checkpoint.CONFIG_FILE).write_text(model.to_json() + "\n")
    (run_dir / "train_args.json").write_text(json.dumps(config.record(), indent=2, default=str)
                                             + "\n")
    target = run_dir / "tokenizer"
    if tokenizer_dir.resolve() != target.resolve():
        if tokenizer_dir.is_dir():
            shutil.copytree(tokenizer_dir, target, dirs_exist_ok=True)
        else:
            target.mkdir(exist_ok=True)
            shutil.copy2(tokenizer_dir, target / tokenizer_dir.name)


def run_stage(args: argparse.Namespace, stage: Stage) -> int:
    """The `pretrain`/`sft` command: its flags, once, into a `TrainConfig`; then `run`."""

    notes = compat_flags.apply(args)  # the reference's flags; may pick the CPU
    recipes.apply_defaults(args, stage.command)
    if args.eval_interval is None:
        args.eval_interval = args.save_interval
    tracker = tracking.tracker_kind(args.tracker, args.use_wandb)
    settings = train_config.settings_from_args(args, tracker)  # all but the model
    train_config.check_settings(settings)  # before anything is created or opened
    # Before any other JAX call (the model flags' dtype `auto` asks for the backend).
    distributed.initialize(settings["distributed"])
    for note in notes:
        _say(note)
    return run(TrainConfig(model=model_args.model_config_from_args(args), **settings), stage)


def run(config: TrainConfig, stage: Stage | str) -> int:
    """Train `stage` (`"pretrain"`, `"sft"` or a `Stage`) as `config` says; 0 when done.

    Bad input raises UserError, an environment failure while writing RunFailure."""
    from minimind_jax.train import train_step

    stage = stage_named(stage) if isinstance(stage, str) else stage
    train_config.check_settings(vars(config))
    distributed.initialize(config.distributed)  # a no-op when the command started it
    with contextlib.ExitStack() as stack:  # what is opened below is closed on every path
        trainer = build_run(config, stage, stack)
        with _write_failures(trainer.run_dir):
            state = train_loop(trainer)
            checkpoint.finish(trainer.manager)
            _say(f"done: {int(train_step.to_host(state.step))} micro-steps, "
                 f"{int(train_step.to_host(state.skipped))} skipped; checkpoints in "
                 f"{trainer.run_dir / checkpoint.CHECKPOINT_DIR}")
    return 0


@contextlib.contextmanager
def _write_failures(run_dir: pathlib.Path):
    """An environment error writing a run file (disk full, ...) becomes a RunFailure that says
    so, and which checkpoints are intact."""
    try:
        yield
    except OSError as err:
        if err.errno not in ENVIRONMENT_ERRNOS:
            raise
        raise RunFailure(f"writing {os_error_line(err)}; "
                         + checkpoint.intact_note(run_dir / checkpoint.CHECKPOINT_DIR)
                         ) from None


@contextlib.contextmanager
def _own_run_folder(run_dir: pathlib.Path):
    """Process 0 holds the run folder's lock for the block; every process stops with the
    same error when it is in use."""
    with contextlib.ExitStack() as stack:
        refused = None
        if _is_main_process():
            try:
                stack.enter_context(run_lock.hold(run_dir))
            except UserError as err:
                refused = err
        if not distributed.agree(refused is None):
            raise refused or UserError(f"run folder {run_dir} is in use (see process 0)")
        yield


def _previous_run(run_dir: pathlib.Path) -> str | None:
    """What an earlier run left in `run_dir` that starting afresh would delete, if anything."""
    steps = checkpoint.step_folders(run_dir / checkpoint.CHECKPOINT_DIR)
    if steps:
        return f"checkpoints up to step {steps[0]}"
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        return "metrics.jsonl of a run without checkpoints"
    return None


@dataclasses.dataclass(frozen=True)
class Run:
    """A run ready to train: all that `train_loop` consumes."""

    config: TrainConfig
    stage: Stage
    model: ModelConfig  # config.model, with the tokenizer's vocabulary where it asks so
    run_dir: pathlib.Path
    state: Any  # the train state to start from, fresh or resumed
    start: tuple[int, int, int]  # (global step, epoch, batch) of the next micro-step
    total_steps: int
    loader: Any
    mesh: Any
    schedule: optim.Schedule
    step_fn: Any
    flush_fn: Any  # minimind-3's end-of-epoch flush of a partial accumulation window, or None
    evaluator: Any  # evaluate.Evaluator or None
    manager: Any  # the orbax checkpoint manager
    log: RunLog


def build_run(config: TrainConfig, stage: Stage, stack: contextlib.ExitStack) -> Run:
    """Tokenizer, model, run folder (locked), data, train state (fresh or resumed), step
    functions, checkpoint manager, tracker and log; what is opened is closed by `stack`."""
    from minimind_jax.data.tokenizer import load_tokenizer

    if config.run.run_prefix:  # minimind-3's --save_weight
        stage = dataclasses.replace(stage, run_prefix=config.run.run_prefix)
    tokenizer_dir = resolve_tokenizer(config, stage)
    tokenizer = load_tokenizer(tokenizer_dir)
    model = config.model
    if config.vocab_from_tokenizer:
        model = model.replace(vocab_size=tokenizer.vocab_size)
    if model.vocab_size < tokenizer.vocab_size:
        raise UserError(f"--vocab_size {model.vocab_size} is smaller than the tokenizer's "
                        f"vocabulary ({tokenizer.vocab_size}, {tokenizer_dir})")
    source = None if config.run.resume else init_source(config, stage)
    run_dir = run_dir_for(config.run.out_dir, stage, model)
    stack.enter_context(_own_run_folder(run_dir))
    with _write_failures(run_dir):
        return _build_owned(config, stage, model, tokenizer, tokenizer_dir, source, run_dir,
                            stack)


def _build_owned(config: TrainConfig, stage: Stage, model: ModelConfig, tokenizer,
                 tokenizer_dir: pathlib.Path, source, run_dir: pathlib.Path,
                 stack: contextlib.ExitStack) -> Run:
    """`build_run` once the run folder is ours."""
    from minimind_jax.train import train_step

    previous = _check_start(config.run, run_dir)
    mesh = train_step.data_mesh()
    data, loader, evaluator = _open_data(config, stage, tokenizer, model, mesh)
    batches = loader.batches_per_epoch
    total_steps = _total_steps(config, batches)
    opt = config.optim
    schedule = optim.Schedule(opt.lr_schedule, opt.learning_rate, total_steps,
                              opt.accumulation_steps, opt.warmup_iters)
    optimizer = optim.make_optimizer(accumulation_steps=opt.accumulation_steps,
                                     grad_clip=opt.grad_clip, weight_decay=opt.weight_decay)
    abstract = train_step.abstract_train_state(model, optimizer, mesh,
                                               fsdp=config.distributed.fsdp)
    shardings = train_step.shardings_of(abstract)
    state, (epoch, batch), elapsed_before = _start_state(
        config, stage, model, source, run_dir, previous, abstract, optimizer, shardings)
    manager = checkpoint.open_manager(run_dir)
    stack.callback(checkpoint.close, manager)
    start_step = int(train_step.to_host(state.step))
    if _is_main_process():
        _write_run_files(run_dir, model, config, tokenizer_dir)
    _announce(config, stage, model, state, mesh, data, run_dir, batches, total_steps)

    tracker = (tracking.open_tracker(config.run.tracker, config.run.tracker_project,
                                     tracking.run_name(stage.command, opt.epochs,
                                                       config.data.batch_size,
                                                       opt.learning_rate),
                                     config.record(), stage.command, run_dir, start_step)
               if _is_main_process() else None)
    lines = LineStyle(opt.epochs, batches, config.run.log_interval,
                      head=arch_of(model) == "minimind3")
    log = RunLog(run_dir, start_step, total_steps, _is_main_process(), tracker, lines=lines,
                 elapsed_before=elapsed_before)
    stack.callback(log.close)
    step_fn = train_step.make_train_step(model, optimizer, schedule, mesh, shardings)
    flush_fn = None
    if recipes.recipe_named(config.recipe).flush_epoch_end \
            and batches % opt.accumulation_steps != 0:
        inner = optim.make_inner_optimizer(grad_clip=opt.grad_clip,
                                           weight_decay=opt.weight_decay)
        flush_fn = train_step.make_flush_step(inner, schedule, opt.accumulation_steps, shardings)
    return Run(config=config, stage=stage, model=model, run_dir=run_dir, state=state,
               start=(start_step, epoch, batch), total_steps=total_steps, loader=loader,
               mesh=mesh, schedule=schedule, step_fn=step_fn, flush_fn=flush_fn,
               evaluator=evaluator, manager=manager, log=log)


def _check_start(run: RunConfig, run_dir: pathlib.Path) -> str | None:
    """Refuse --resume without a checkpoint, and a fresh start over an earlier run without
    --overwrite; returns what that earlier run left (`_previous_run`)."""
    previous = _previous_run(run_dir)
    if run.resume and not checkpoint.step_folders(run_dir / checkpoint.CHECKPOINT_DIR):
        raise UserError(f"--resume: no checkpoint in {run_dir / checkpoint.CHECKPOINT_DIR}")
    if not run.resume and previous and not run.overwrite:
        raise UserError(f"{run_dir} already holds a run ({previous}): pass --resume to "
                        "continue it, or --overwrite to delete its checkpoints, metrics and "
                        "TensorBoard events and start over")
    return previous


def _open_data(config: TrainConfig, stage: Stage, tokenizer, model: ModelConfig, mesh):
    """(training rows, their loader, the evaluator or None)."""
    data_config = config.data
    data = _open_source_once(config, stage, tokenizer, model, data_config.data_path,
                             data_config.pack)
    evaluator = None
    if config.eval.data_path:
        eval_source = _open_source_once(config, stage, tokenizer, model, config.eval.data_path,
                                        pack=False)
        evaluator = evaluate.Evaluator(eval_source, model, mesh, data_config.batch_size,
                                       config.eval.batches)
    loader = Loader(data, data_config.batch_size, shuffle=data_config.shuffle, seed=config.seed,
                    num_shards=jax.process_count(), shard_index=jax.process_index(),
                    pad_to_multiple=_rows_multiple(model, data_config.batch_size),
                    permutation=recipes.recipe_named(config.recipe).permutation)
    return data, loader, evaluator


def _total_steps(config: TrainConfig, batches: int) -> int:
    total_steps = config.optim.epochs * batches
    if config.optim.max_steps is not None:
        total_steps = min(total_steps, config.optim.max_steps)
    if total_steps < 1:
        raise UserError(f"nothing to train: {config.data.data_path} gives {batches} batches of "
                        f"--batch_size {config.data.batch_size} per epoch")
    return total_steps


def _start_state(config: TrainConfig, stage: Stage, model: ModelConfig, source, run_dir,
                 previous: str | None, abstract, optimizer, shardings):
    """(train state, (epoch, batch) of the next batch, run seconds so far): resumed from the
    newest intact checkpoint, or fresh from `initial_params` (removing an earlier run's files
    with --overwrite)."""
    from minimind_jax.train import train_step

    if config.run.resume:
        def same_run(meta):
            where = f"{run_dir} (step {meta['step']})"
            check_same_shape(ModelConfig.from_dict(meta["model_config"]), model, where)
            _check_same_rows(meta.get("rows"), rows_layout(config.data), where)

        state, meta, damaged = checkpoint.resume_state(run_dir, abstract, same_run, _warn)
        if damaged:
            distributed.barrier("train:damaged_seen")  # all restored before one moves them
            if _is_main_process():
                moved = checkpoint.set_aside(run_dir, damaged)
                _warn(f"warning: moved the damaged checkpoint(s) to {', '.join(map(str, moved))}")
            distributed.barrier("train:damaged_moved")
        epoch, batch = meta["epoch"], meta["batch"]
        _say(f"resuming {run_dir} at step {meta['step']} (epoch {epoch + 1}, batch {batch})")
        return state, (epoch, batch), float(meta.get("elapsed_s", 0.0))
    params, origin = initial_params(config, stage, source, model)
    if previous:  # --overwrite, checked by _check_start
        _say(f"starting over (--overwrite): removing the {previous} in {run_dir}")
        distributed.barrier("train:previous_seen")  # all decided before one deletes
        if _is_main_process():
            shutil.rmtree(run_dir / checkpoint.CHECKPOINT_DIR, ignore_errors=True)
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        distributed.barrier("train:previous_removed")
    state = train_step.init_train_state(params, optimizer, config.seed, shardings)
    _say(f"initial weights: {origin}")
    return state, (0, 0), 0.0


def _announce(config: TrainConfig, stage: Stage, model: ModelConfig, state, mesh, data,
              run_dir: pathlib.Path, batches: int, total_steps: int) -> None:
    """The run's opening lines: model size, devices, layout, host memory, schedule, rows."""
    from minimind_jax.model.transformer import count_params

    opt = config.optim
    n_params = count_params(state.params)
    _say(f"model parameters: {n_params / 1e6:.3f} M ({n_params:,}); {mesh.devices.size} "
         f"device(s) {jax.devices()[0].platform} in {jax.process_count()} process(es); "
         f"dtype {model.dtype}; run folder {run_dir}")
    _say(_layout_line(state, config.distributed.fsdp, mesh.devices.size))
    _say(host_memory.describe())
    if cache_dir := jax.config.jax_compilation_cache_dir:
        _say(f"compilation cache: {cache_dir} (reruns of these shapes skip most compiling)")
    _say(f"{stage.command}: {opt.epochs} epoch(s) x {batches} batches of "
         f"{config.data.batch_size}, accumulation {opt.accumulation_steps}, {total_steps} "
         f"micro-steps, lr {opt.learning_rate} ({opt.lr_schedule})")
    _say(_rows_line(data, config.data))


def _open_source_once(config: TrainConfig, stage: Stage, tokenizer, model: ModelConfig,
                      data_path: str, pack: bool):
    """The rows of `data_path`; with several processes, process 0 builds a missing token cache
    first, so the others find it (shared storage) instead of racing on it."""
    data_config = config.data

    def open_it(quiet: bool):
        return open_source(data_path, tokenizer, stage.command, model.max_seq_len,
                           pack=pack, pack_window=data_config.pack_window,
                           cache_dir=data_config.cache_dir,
                           skip_bad_lines=data_config.skip_bad_lines,
                           progress=False if quiet else None,
                           log=(lambda message: None) if quiet else None,
                           rules=arch_of(model), sft_seed=config.seed,
                           sft_random=data_config.sft_random)

    if not _is_main_process():
        distributed.barrier("train:token_cache")
        return open_it(quiet=True)  # bad data fails here too, with the same UserError
    try:
        return open_it(quiet=False)
    finally:
        distributed.barrier("train:token_cache")  # reached on failure too: nobody hangs


def _rows_multiple(config: ModelConfig, batch_size: int) -> int:
    """What this process's rows of a batch are padded to a multiple of (zero-mask rows).

    Dense models: the whole per-process batch, so the last partial batch of an epoch keeps the
    compiled shape instead of compiling the step a second time (seconds on CPU; the masked
    mean loss ignores the empty rows exactly). MoE models: only the local device count, since
    the reference's per-sequence aux loss is a mean over the batch's rows."""
    per_process, devices = batch_size // jax.process_count(), jax.local_device_count()
    if not config.use_moe and per_process % devices == 0:
        return per_process
    return devices


def _rows_line(data, data_config: DataConfig) -> str:
    """How full the rows are: packing's fill fraction, or the padding of one sample per row."""
    fill = 1.0 - data.padding_fraction
    if data_config.pack:
        how = ("next fit in file order" if data_config.pack_window == 0
               else f"best fit over windows of {data_config.pack_window:,} documents")
        return f"rows: {len(data):,} packed ({how}), filled {fill:.1%}"
    return f"rows: {len(data):,}, one sample each, filled {fill:.1%}"


def _layout_line(state, fsdp: bool, n_devices: int) -> str:
    """Where params and optimizer state live, with this device's share of the params."""
    from minimind_jax.train import train_step

    total = sum(leaf.nbytes for leaf in jax.tree.leaves(state.params))
    local = train_step.local_bytes(state.params)
    layout = (f"fsdp: params and optimizer state sharded over {n_devices} device(s)" if fsdp
              else "params and optimizer state replicated on every device")
    return (f"{layout}; params per device {local / 2**20:.3f} MiB of {total / 2**20:.3f} MiB "
            f"({100 * local / total:.1f}%)")


class TooManySkips(Exception):
    def __init__(self, step: int, reason: int):
        super().__init__(step, reason)
        self.step, self.reason = step, reason


def train_loop(run: Run):
    """Consume batches from `run.start` = (global step, epoch, batch) until `run.total_steps`;
    `run.flush_fn(state)` after each epoch's last batch (minimind-3's partial-window flush);
    with an evaluator, validate every --eval_interval micro-steps and at the end. Returns the
    final train state.

    Metrics of step s are fetched after step s+1 is dispatched, so the host never stalls the
    device; they are all written before any checkpoint, so a checkpoint never precedes its log.
    """
    from minimind_jax.train import train_step

    state, (step, epoch, batch) = run.state, run.start
    batches, epochs = run.loader.batches_per_epoch, run.config.optim.epochs
    run.log.start_clocks()
    pending = []  # (device metrics, host info) of the dispatched steps not logged yet
    evaluated_at = None  # the step of the last validation
    position = (epoch, batch)  # of the next batch to consume
    try:
        while step < run.total_steps and position[0] < epochs:
            epoch, batch = position
            run.log.start_epoch(batch)
            for b, host_batch in enumerate(run.loader.epoch(epoch, start_batch=batch),
                                           start=batch):
                state, metrics = run.step_fn(state, train_step.put_batch(host_batch, run.mesh))
                info = {"step": step, "epoch": epoch, "batch": b,
                        "seq_len": host_batch["input_ids"].shape[1]}
                step += 1
                if run.flush_fn is not None and b + 1 == batches:
                    state = run.flush_fn(state)
                position = (epoch + 1, 0) if b + 1 >= batches else (epoch, b + 1)
                run.log.advance()
                _log_dispatched(run, pending)  # the previous step's (this one runs meanwhile)
                pending.append((metrics, info))
                if run.evaluator is not None and step % run.config.eval.interval == 0:
                    evaluated_at = _validate(run, state, step, pending)
                if step % run.config.run.save_interval == 0:
                    _log_dispatched(run, pending)
                    save_checkpoint(run, state, position)
                if step >= run.total_steps:
                    break
            else:
                position = (epoch + 1, 0)  # in case an epoch had fewer batches than announced
        if run.evaluator is not None and evaluated_at != step:
            _validate(run, state, step, pending)
        _log_dispatched(run, pending)
        save_checkpoint(run, state, position)
    except TooManySkips as err:
        saved = save_checkpoint(run, state, position)
        checkpoint.finish(run.manager)
        raise UserError(_stop_message(run.config.run.max_consecutive_skips, run.model, err,
                                      f"{run.manager.directory}/{saved}")) from None
    return state


def _log_dispatched(run: Run, pending: list) -> None:
    """Log the dispatched steps' metrics (emptying `pending`); raise TooManySkips once too many
    in a row were non-finite."""
    from minimind_jax.train import train_step

    while pending:
        metrics, info = pending.pop(0)
        metrics = train_step.to_host(metrics)
        run.log.step(metrics, info, run.schedule.host)
        if int(metrics["consecutive_skips"]) >= run.config.run.max_consecutive_skips:
            raise TooManySkips(info["step"], int(metrics["nonfinite"]))


def _validate(run: Run, state, step: int, pending: list) -> int:
    """Validate the params after `step` micro-steps (once the steps before are logged)."""
    _log_dispatched(run, pending)
    result = run.evaluator(state.params)
    run.log.record_eval(result.record(), step, f"step {step}: " + result.line())
    return step


def save_checkpoint(run: Run, state, position: tuple[int, int]) -> int:
    """Every checkpoint of the run: `state`, `position` = (epoch, batch) of the next batch,
    the model, the stage, the rows' layout and the run time so far. Returns the step (saved
    asynchronously)."""
    return checkpoint.save(run.manager, state, epoch=position[0], batch=position[1],
                           config=run.model, stage=run.stage.command,
                           rows=rows_layout(run.config.data), elapsed_s=run.log.elapsed())


def rows_layout(data_config) -> dict:
    """The flags that decide which rows a (epoch, batch) position points at: a resumed run
    must keep them, or it would continue at another place in the data."""
    return {"pack": data_config.pack,
            "pack_window": data_config.pack_window if data_config.pack else None}


def _check_same_rows(saved: dict | None, now: dict, where: str) -> None:
    if saved is None or saved == now:  # checkpoints from before the layout was saved: unchecked
        return

    def flags(layout):
        if not layout["pack"]:
            return "one sample per row (no --pack)"
        return f"--pack --pack_window {layout['pack_window']}"

    raise UserError(f"--resume: {where} was trained on rows made with {flags(saved)}, but this "
                    f"run asks for {flags(now)}; resume with the same flags, or start a new run")


def _stop_message(max_skips: int, model: ModelConfig, err: TooManySkips, saved: str) -> str:
    """Why the run stopped after too many skipped micro-steps, and what to change."""
    from minimind_jax.train.train_step import NONFINITE_REASONS

    what = NONFINITE_REASONS.get(err.reason, "value")
    if err.reason == 3:
        advice = "The optimizer step overflowed: lower --learning_rate or --weight_decay."
    else:
        advice = "Lower --learning_rate" + (" or use --dtype float32" if model.dtype !=
                                            "float32" else "") + "."
    return (f"{max_skips} micro-steps in a row were skipped, the last (step "
            f"{err.step}) for a non-finite {what}; stopped. {advice} Checkpoint {saved} holds "
            "the state without the skipped steps' changes.")


# ------------------------------------------------------------------------------------- CLI


def _add_train_args(parser: argparse.ArgumentParser, stage: Stage) -> None:
    g = parser.add_argument_group("training (reference flag names)")
    g.add_argument("--out_dir", default="out",
                   help=f"runs go to OUT_DIR/{stage.run_prefix}_{{dim}}[_moe]/")
    g.add_argument("--data_path", default=stage.data_path, help="training JSONL file")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (tokenizer.json) or sentencepiece .model; default: "
                        "the run's own copy with --resume, "
                        + ("else the pretrain run's copy, " if stage.command == "sft" else "")
                        + f"else ./{REFERENCE_TOKENIZER_DIR} (where the reference keeps it)")
    _add_optim_flags(g, stage)
    _add_rows_flags(g)
    _add_run_flags(g, stage)


def _add_optim_flags(g, stage: Stage) -> None:
    """OptimConfig's flags, with --batch_size, --recipe, --no_sft_random and --seed (in the
    order --help lists them)."""
    ours = recipes.stage_defaults(stage.command, "minimind2")
    head = recipes.stage_defaults(stage.command, "minimind3")
    g.add_argument("--epochs", type=int, default=None,
                   help=f"passes over the data (default {ours['epochs']}; --arch minimind3: "
                        f"{head['epochs']})")
    g.add_argument("--batch_size", type=int, default=None,
                   help=f"sequences per micro-batch, over all devices (default "
                        f"{ours['batch_size']}; --arch minimind3: {head['batch_size']})")
    g.add_argument("--learning_rate", type=float, default=None,
                   help=f"peak LR (default {ours['learning_rate']}; --arch minimind3: "
                        f"{head['learning_rate']})")
    g.add_argument("--accumulation_steps", type=int, default=None,
                   help=f"micro-batches whose mean gradient makes one optimizer update (default "
                        f"{ours['accumulation_steps']}; --arch minimind3: "
                        f"{head['accumulation_steps']}). --arch minimind3 also defaults "
                        f"--max_seq_len to {head['max_seq_len']}")
    g.add_argument("--recipe", choices=recipes.RECIPES, default=None,
                   help="reproduce a reference's trainer: minimind2 = --no_shuffle "
                        "--lr_schedule minimind2; minimind3 = HEAD's per-epoch torch.randperm "
                        "seeded 42+epoch, its LR formula, end-of-epoch flush of a partial "
                        "accumulation window, SFT draws seeded 42+epoch, SFT from the "
                        "pretrain weights rounded to float16")
    g.add_argument("--no_sft_random", action="store_true",
                   help="minimind-3 SFT: no random system prompts and keep every empty think "
                        "block (HEAD adds a prompt with p=0.2 and strips with p=0.8)")
    g.add_argument("--grad_clip", type=float, default=1.0,
                   help="clip the global gradient norm to this (<= 0: no clipping)")
    g.add_argument("--weight_decay", type=float, default=0.01,
                   help="AdamW decoupled weight decay, on every parameter (torch default)")
    g.add_argument("--lr_schedule", choices=optim.SCHEDULES, default=None,
                   help="cosine (default): linear warmup over --warmup_iters updates, then cosine "
                        "to lr/10; minimind2: the reference's lr/10 + lr/2*(1+cos(pi*step/total)) "
                        "per micro-step (no warmup; use it to reproduce reference curves); "
                        "minimind3: HEAD's lr*(0.1+0.45*(1+cos(pi*(step+1)/total)))")
    g.add_argument("--warmup_iters", type=int, default=0,
                   help="warmup updates of the cosine schedule (the reference ignores it)")
    g.add_argument("--max_steps", type=int, default=None,
                   help="stop after this many micro-steps in total; the LR schedule then spans "
                        "them instead of all epochs")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the random init and of the shuffling order (default 1337; "
                        "--recipe minimind3: 42, HEAD's epoch e uses seed + e)")


def _add_rows_flags(g) -> None:
    """How DataConfig's rows are made and ordered."""
    g.add_argument("--no_shuffle", action="store_true",
                   help="file order every epoch, as the reference's DataLoader(shuffle=False)")
    g.add_argument("--pack", action="store_true",
                   help="pack several documents per row (attention stays within a document) "
                        "instead of one padded document per row")
    g.add_argument("--pack_window", type=int, default=DEFAULT_PACK_WINDOW,
                   help="--pack: best fit (longest first, tightest row) over windows of this "
                        "many documents in file order, whole documents only; 0 = next fit in "
                        "file order (fewer full rows)")
    prepare.add_cache_args(g)


def _add_run_flags(g, stage: Stage) -> None:
    """RunConfig's flags, with --fsdp."""
    g.add_argument("--log_interval", type=int, default=100,
                   help="log every N micro-batches of an epoch (metrics.jsonl, TensorBoard, "
                        "the reference-style line)")
    g.add_argument("--save_interval", type=int, default=100,
                   help="checkpoint every N micro-steps (and at the end); the last 3 are kept")
    g.add_argument("--init_from", default=None,
                   help="start from these weights: one of our run/checkpoint folders or a "
                        "reference-keyed .pth, .safetensors or .npz state dict (params only, "
                        "fresh optimizer)" + ("; default: the latest checkpoint of "
                                              "OUT_DIR/pretrain_{dim}[_moe]"
                                              if stage.command == "sft" else
                                              "; default: random init from --seed"))
    start = g.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue this stage's run from its newest intact checkpoint: "
                            "same weights, optimizer state, data position, schedule and RNG")
    start.add_argument("--overwrite", action="store_true",
                       help="start this stage's run afresh even though its folder holds an "
                            "earlier run: deletes that run's checkpoints, metrics and "
                            "TensorBoard events (without it, such a start is refused)")
    g.add_argument("--max_consecutive_skips", type=int, default=20,
                   help="stop (with a checkpoint) after this many micro-steps in a row with a "
                        "non-finite loss, gradient or update; single ones are skipped and "
                        "counted")
    g.add_argument("--fsdp", action="store_true",
                   help="shard params and optimizer state over all devices (each holds about "
                        "1/N; params are gathered for each step) instead of replicating them: "
                        "for models whose training state does not fit on one device; same "
                        "results. Checkpoints load into either layout")


def register(subparsers) -> None:
    descriptions = {
        "pretrain": "Pretrain a MiniMind2 model on {\"text\": ...} JSONL (the reference's "
                    "train_pretrain.py): next-token loss on every real token.",
        "sft": "Full supervised fine-tuning on {\"conversations\": [...]} JSONL (the "
               "reference's train_full_sft.py), starting from the pretrain weights; the loss "
               "covers the assistant replies only.",
    }
    for name, stage in STAGES.items():
        parser = subparsers.add_parser(
            name, formatter_class=model_args.HelpFormatter,
            help=descriptions[name].split(" (")[0],
            description=descriptions[name] + "\n\nPrints the parameter count and, every "
                        "--log_interval micro-batches, `Epoch:[e/E](step/iters) loss:.. lr:.. "
                        "epoch_Time:..min:` (--arch minimind3: HEAD's `Epoch:[e/E](s/iters), "
                        "loss: .., logits_loss: .., aux_loss: .., lr: .., epoch_time: ..min`); "
                        "writes config.json, metrics.jsonl, TensorBoard events and orbax "
                        "checkpoints into the run folder. Exact reference runs: --recipe "
                        "minimind2, or --arch minimind3 --recipe minimind3.")
        _add_train_args(parser, stage)
        model_args.add_model_args(parser, moe_value=True)
        evaluate.add_eval_args(parser)
        distributed.add_distributed_args(parser)
        tracking.add_tracker_args(parser)
        compat_flags.add_reference_args(parser)
        parser.set_defaults(func=lambda args, stage=stage: run_stage(args, stage),
                            host_hugepages=True, compile_cache=True)
