"""The training loop: `run(config, stage)` builds the run (train.setup) and consumes its
batches, logging, validating and checkpointing as it goes, until the last micro-step."""

from __future__ import annotations

import contextlib
import math

from minimind_jax.errors import UserError
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.run_checkpoint import CHECKPOINT_DIR
from minimind_jax.runtime import distributed
from minimind_jax.train import checkpoint, run_folder
from minimind_jax.train.run_log import say
from minimind_jax.train.setup import Run, build_run, rows_layout
from minimind_jax.train.stages import Stage, named
from minimind_jax.train.train_config import TrainConfig, check_settings


def row_positions(batch: dict) -> int:
    """Positions a row of `batch` stands for, as padded (tokens_per_sec counts real rows times
    this): its width, both sides of a DPO pair, a packed batch's rows at their full width."""
    ids = batch["input_ids"]
    sides = batch["row_real"].shape[1:] if "row_real" in batch else ids.shape[1:-1]
    return ids.shape[-1] * math.prod(sides)


def run(config: TrainConfig, stage: Stage | str) -> int:
    """Train `stage` (a name of train.stages.STAGES, e.g. `"dpo"`, or a `Stage`, e.g. with
    its options changed) as `config` says; 0 when done. The same run as the stage's command
    with the same settings.

    Bad input raises UserError, an environment failure while writing RunFailure."""
    from minimind_jax.train import train_step

    stage = named(stage) if isinstance(stage, str) else stage
    config = config.resolved(stage)
    check_settings(vars(config))
    distributed.initialize(config.distributed)  # a no-op when the command started it
    with contextlib.ExitStack() as stack:  # what is opened below is closed on every path
        trainer = build_run(config, stage, stack)
        with run_folder.write_failures(trainer.run_dir):
            state = train_loop(trainer)
            checkpoint.finish(trainer.manager)
            if trainer.finish_fn is not None:
                trainer.finish_fn(state)
            say(f"done: {int(train_step.to_host(state.step))} micro-steps, "
                f"{int(train_step.to_host(state.skipped))} skipped; checkpoints in "
                f"{trainer.run_dir / CHECKPOINT_DIR}")
    return 0


class TooManySkips(Exception):
    def __init__(self, step: int, reason: int):
        super().__init__(step, reason)
        self.step, self.reason = step, reason


def train_loop(run: Run):
    """Consume batches from `run.start` = (global step, epoch, batch) until `run.total_steps`
    (each through the stage's batch producer `run.produce_fn(state, batch, info)` if it has
    one); `run.flush_fn(state)` after each epoch's last batch (minimind-3's partial-window flush);
    with an evaluator, validate every --eval_interval micro-steps and at the end. Returns the
    final train state.

    Metrics of step s are fetched after step s+1 is dispatched, so the host never stalls the
    device; they are all written before any checkpoint, so a checkpoint never precedes its log.
    """

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
                info = {"step": step, "epoch": epoch, "batch": b}
                if run.produce_fn is not None:  # a batch made from the current state
                    host_batch = run.produce_fn(state, host_batch, info)
                state, metrics = run.step_fn(state, host_batch)
                info["seq_len"] = row_positions(host_batch)
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
                    if run.save_fn is not None and step < run.total_steps:  # (the end: finish)
                        run.save_fn(state)  # the reference's weights file, as it saves
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
                           config=run.model, stage=run.stage.name,
                           lm_params_at=list(run.stage.lm_params_at),
                           rows=rows_layout(run.config.data), elapsed_s=run.log.elapsed())


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
