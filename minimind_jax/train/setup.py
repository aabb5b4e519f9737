"""A run made ready to train, from its `TrainConfig`: tokenizer, model, the locked run folder,
data, the train state (fresh, from given weights, or resumed), step functions, checkpoint
manager and log. `build_run` returns it as a `Run`; `train.loop` consumes it."""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import shutil
from typing import Any

import jax
import numpy as np

from minimind_jax.data.batches import Loader, bucket_widths, row_buckets
from minimind_jax.data.rows import open_source
from minimind_jax.data.tokenizer import locate_tokenizer, training_tokenizer_candidates
from minimind_jax.errors import UserError
from minimind_jax.model.config import SHAPE_FIELDS, ModelConfig
from minimind_jax.model.generation import generation_of
from minimind_jax.model.run_checkpoint import CHECKPOINT_DIR
from minimind_jax.runtime import distributed, host_memory
from minimind_jax.train import checkpoint, evaluate, optim, run_folder, tracking
from minimind_jax.train.log_lines import LineStyle
from minimind_jax.train.run_log import RunLog, say, warn
from minimind_jax.train.stages.stage import (
    Objective,
    Stage,
    StageContext,
    init_source,
    start_name,
    start_params,
)
from minimind_jax.train.train_config import DataConfig, TrainConfig


def resolve_tokenizer(config: TrainConfig, stage: Stage, model: ModelConfig) -> pathlib.Path:
    """--tokenizer; else the run's own copy (--resume), the copy of the run folder it starts
    from (--init_from, or the stage's start weights), or the reference's own folder."""
    run = config.run
    own = run_folder.run_dir_for(run.out_dir, run.run_prefix, model) if run.resume else None
    return locate_tokenizer(config.data.tokenizer, training_tokenizer_candidates(
        generation_of(model), run_dir=own, start_dir=_start_folder(config, stage, model)),
        what=stage.name)


def _start_folder(config: TrainConfig, stage: Stage, model: ModelConfig):
    """The run folder the initial weights come from, if they come from one."""
    init_from = config.run.init_from
    if init_from is None and stage.start_from is not None:
        found = run_folder.saved_weights(config.run.out_dir, start_name(stage, model))
    else:
        found = pathlib.Path(init_from) if init_from not in (None, "none") else None
    return found if found is not None and found.is_dir() else None


def check_same_shape(saved: ModelConfig, config: ModelConfig, where: str) -> None:
    diffs = [f"{f}: checkpoint {getattr(saved, f)!r}, flags {getattr(config, f)!r}"
             for f in SHAPE_FIELDS if getattr(saved, f) != getattr(config, f)]
    if diffs:
        raise UserError(f"{where} was trained with another model shape; pass matching flags:\n  "
                        + "\n  ".join(diffs))


def initial_params(config: TrainConfig, stage: Stage, source: pathlib.Path | None,
                   model: ModelConfig):
    """(params, where they came from): the stage's own `initial_params`, else `start_params`."""
    return (stage.initial_params or start_params)(config, stage, source, model, warn)


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
    step_fn: Any  # (state, host batch) -> (state, metrics)
    flush_fn: Any  # minimind-3's end-of-epoch flush of a partial accumulation window, or None
    evaluator: Any  # evaluate.Evaluator or None
    manager: Any  # the orbax checkpoint manager
    log: RunLog
    finish_fn: Any = None  # (final state) -> None, on every process: lora writes its adapters
    save_fn: Any = None  # (state) -> None after each --save_interval checkpoint, or None
    # (state, host batch, info) -> host batch: the stage's batch producer, or None
    produce_fn: Any = None


def build_run(config: TrainConfig, stage: Stage, stack: contextlib.ExitStack) -> Run:
    """Tokenizer, model, run folder (locked), data, train state (fresh or resumed), step
    functions, checkpoint manager, tracker and log; what is opened is closed by `stack`."""
    from minimind_jax.data.tokenizer import load_tokenizer

    tokenizer_dir = resolve_tokenizer(config, stage, config.model)
    tokenizer = load_tokenizer(tokenizer_dir)
    model = stage.model_for(config.model)
    if config.vocab_from_tokenizer:
        model = model.replace(vocab_size=tokenizer.vocab_size)
    if model.vocab_size < tokenizer.vocab_size:
        raise UserError(f"--vocab_size {model.vocab_size} is smaller than the tokenizer's "
                        f"vocabulary ({tokenizer.vocab_size}, {tokenizer_dir})")
    source = None if config.run.resume else init_source(config, stage, model)
    run_dir = run_folder.run_dir_for(config.run.out_dir, config.run.run_prefix, model)
    stack.enter_context(run_folder.own(run_dir))
    with run_folder.write_failures(run_dir):
        return _build_owned(config, stage, model, tokenizer, tokenizer_dir, source, run_dir,
                            stack)


def _objective(config: TrainConfig, stage: Stage, model: ModelConfig, tokenizer,
               source) -> Objective:
    """The stage's objective; its `start()` gives the run's initial params, also on --resume
    (where `source` is None and looked up now)."""
    def start():
        where = init_source(config, stage, model) if config.run.resume else source
        return initial_params(config, stage, where, model)

    return stage.objective(StageContext(config, model, generation_of(model), tokenizer,
                                        stage.options, start))


def _build_owned(config: TrainConfig, stage: Stage, model: ModelConfig, tokenizer,
                 tokenizer_dir: pathlib.Path, source, run_dir: pathlib.Path,
                 stack: contextlib.ExitStack) -> Run:
    """`build_run` once the run folder is ours."""
    from minimind_jax.train import train_step

    previous = run_folder.check_start(config.run, run_dir)
    mesh = train_step.data_mesh()
    objective = _objective(config, stage, model, tokenizer, source)
    data, loader, evaluator = _open_data(config, stage, tokenizer, model, mesh, objective)
    batches = loader.batches_per_epoch
    total_steps = _total_steps(config, batches)
    opt = config.optim
    schedule = optim.Schedule(opt.lr_schedule, opt.learning_rate, total_steps,
                              opt.accumulation_steps, opt.warmup_iters, epoch_batches=batches)
    optimizer = objective.optimizer or optim.make_optimizer(
        accumulation_steps=opt.accumulation_steps, grad_clip=opt.grad_clip,
        weight_decay=opt.weight_decay,
        epoch_batches=batches if config.recipe.epoch_windows else None)
    partition = stage.partition(model)
    abstract = train_step.abstract_train_state(model, optimizer, mesh,
                                               fsdp=config.distributed.fsdp,
                                               partition=partition,
                                               params_like=objective.params_like)
    shardings = train_step.shardings_of(abstract)
    state, (epoch, batch), elapsed_before = _start_state(
        config, stage, model, source, run_dir, previous, abstract, optimizer, shardings,
        partition)
    manager = checkpoint.open_manager(run_dir)
    stack.callback(checkpoint.close, manager)
    start_step = int(train_step.to_host(state.step))
    if distributed.is_main_process():
        run_folder.write_run_files(run_dir, model, config, tokenizer_dir)
    _announce(config, stage, model, state, mesh, loader, run_dir, batches, total_steps,
              objective)

    log = _open_log(config, stage, model, objective, run_dir, batches, start_step, total_steps,
                    elapsed_before)
    stack.callback(log.close)
    step_fn = (objective.make_step(mesh, shardings) if objective.make_step else
               _lm_step(train_step.make_train_step(model, optimizer, schedule, mesh, shardings,
                                                   partition, objective=objective.loss,
                                                   frozen=objective.frozen,
                                                   fsdp=config.distributed.fsdp), mesh))
    flush_fn = None
    if (objective.make_step is None and config.recipe.flush_epoch_end
            and batches % opt.accumulation_steps != 0):
        inner = optim.make_inner_optimizer(grad_clip=opt.grad_clip,
                                           weight_decay=opt.weight_decay)
        flush_fn = train_step.make_flush_step(inner, schedule, opt.accumulation_steps, shardings,
                                              partition)
    finish_fn = stage.finish(config, model, run_dir) if stage.finish else None
    return Run(config=config, stage=stage, model=model, run_dir=run_dir, state=state,
               start=(start_step, epoch, batch), total_steps=total_steps, loader=loader,
               mesh=mesh, schedule=schedule, step_fn=step_fn, flush_fn=flush_fn,
               evaluator=evaluator, manager=manager, log=log,
               finish_fn=finish_fn, save_fn=finish_fn if stage.finish_at_saves else None,
               produce_fn=objective.produce)


def _lm_step(step_fn, mesh):
    """`(state, host batch) -> (state, metrics)`: this process's rows placed on the mesh."""
    from minimind_jax.train import train_step

    return lambda state, host_batch: step_fn(state, train_step.put_batch(host_batch, mesh))


def _open_log(config: TrainConfig, stage: Stage, model: ModelConfig, objective: Objective,
              run_dir: pathlib.Path, batches: int, start_step: int, total_steps: int,
              elapsed_before: float) -> RunLog:
    """The run's log: the tracker (process 0) and the reference's console line (the stage
    objective's own, if it has one), after the objective's notes."""
    opt = config.optim
    tracker = (tracking.open_tracker(config.run.tracker,
                                     config.run.tracker_project or stage.tracker_project,
                                     tracking.run_name(stage.tracker_run or stage.tracker_project,
                                                       opt.epochs, config.data.batch_size,
                                                       opt.learning_rate),
                                     config.record(), run_dir, start_step)
               if distributed.is_main_process() else None)
    lines = LineStyle(opt.epochs, batches, config.run.log_interval,
                      minimind3=generation_of(model).minimind3_lines,
                      line_fn=objective.line)
    for note in objective.notes:
        say(note)
    return RunLog(run_dir, start_step, total_steps, distributed.is_main_process(), tracker,
                  lines=lines, elapsed_before=elapsed_before)


def _open_data(config: TrainConfig, stage: Stage, tokenizer, model: ModelConfig, mesh,
               objective: Objective):
    """(training rows, their loader, the evaluator or None): the objective's own rows, else
    the stage's samples of --data_path."""
    data_config = config.data
    if not stage.validates and config.eval.data_path:
        raise UserError(f"--eval_data: validation measures the LM loss, which {stage.name} "
                        "does not train; leave it out")
    if objective.rows is not None:
        if data_config.pack:
            raise UserError(f"--pack: {stage.name} brings its own rows ({stage.samples}), which "
                            "are not packed; leave it out")
        data = objective.rows
    else:
        data = _open_source_once(config, stage.samples, tokenizer, model, data_config.data_path,
                                 data_config.pack)
    evaluator = None
    if config.eval.data_path:
        eval_source = _open_source_once(config, stage.samples, tokenizer, model,
                                        config.eval.data_path, pack=False)
        evaluator = evaluate.Evaluator(eval_source, model, mesh, data_config.batch_size,
                                       config.eval.batches)
    loader = Loader(data, data_config.batch_size, shuffle=data_config.shuffle, seed=config.seed,
                    num_shards=jax.process_count(), shard_index=jax.process_index(),
                    pad_to_multiple=_rows_multiple(model, data_config.batch_size),
                    permutation=config.recipe.permutation,
                    length_buckets=length_buckets(stage, data_config, model, objective),
                    loss_columns=objective.loss_columns,
                    batch_packing=batch_packing(stage, data_config, model, objective),
                    packed_rows_multiple=jax.local_device_count())
    return data, loader, evaluator


DEFAULT_LENGTH_BUCKETS = 4


def length_buckets(stage: Stage, data_config: DataConfig, model: ModelConfig,
                   objective: Objective) -> int:
    """--length_buckets, by default 4, or 0 for MoE models: their aux loss averages over every
    fed position, so cutting padding columns would change it. Always 0 for a stage with a batch
    producer (grpo, ppo): its loader rows are prompts, not the batches its step reads."""
    if objective.produce is not None:
        if data_config.length_buckets:
            raise UserError(f"--length_buckets: {stage.name} makes its batches from rollouts "
                            "(its rows are prompts), so they are not cut; leave it out")
        return 0
    if data_config.length_buckets is not None:
        return data_config.length_buckets
    return 0 if model.use_moe else DEFAULT_LENGTH_BUCKETS


def batch_packing(stage: Stage, data_config: DataConfig, model: ModelConfig,
                  objective: Objective) -> bool:
    """Whether batches are packed (data.batches.pack_batch) rather than cut: --batch_packing,
    by default wherever it can be: with length buckets, a loss that reads packed rows, samples
    one per row (not --pack) and one process loading the whole batch."""
    why_not = (None if length_buckets(stage, data_config, model, objective)
               else "there are no length buckets (--length_buckets 0, MoE or rollouts)")
    why_not = why_not or (None if objective.loss is None or objective.packs_rows
                          else f"{stage.name}'s loss reads padded rows only")
    why_not = why_not or ("--pack rows are packed already" if data_config.pack else None)
    why_not = why_not or (f"{jax.process_count()} processes each load part of the batch"
                          if jax.process_count() > 1 else None)
    if data_config.batch_packing and why_not:
        raise UserError(f"--batch_packing: {why_not}")
    return data_config.batch_packing is not False and why_not is None


def _total_steps(config: TrainConfig, batches: int) -> int:
    total_steps = config.optim.epochs * batches
    if config.optim.max_steps is not None:
        total_steps = min(total_steps, config.optim.max_steps)
    if total_steps < 1:
        raise UserError(f"nothing to train: {config.data.data_path} gives {batches} batches of "
                        f"--batch_size {config.data.batch_size} per epoch")
    return total_steps


def _start_state(config: TrainConfig, stage: Stage, model: ModelConfig, source, run_dir,
                 previous: str | None, abstract, optimizer, shardings, partition=None):
    """(train state, (epoch, batch) of the next batch, run seconds so far): resumed from the
    newest intact checkpoint, or fresh from `initial_params` (removing an earlier run's files
    with --overwrite)."""
    from minimind_jax.train import train_step

    if config.run.resume:
        def same_run(meta):
            where = f"{run_dir} (step {meta['step']})"
            check_same_shape(ModelConfig.from_dict(meta["model_config"]), model, where)
            _check_same_rows(meta.get("rows"), rows_layout(config.data), where)

        state, meta, damaged = checkpoint.resume_state(run_dir, abstract, same_run, warn)
        if damaged:
            distributed.barrier("train:damaged_seen")  # all restored before one moves them
            if distributed.is_main_process():
                moved = checkpoint.set_aside(run_dir, damaged)
                warn(f"warning: moved the damaged checkpoint(s) to {', '.join(map(str, moved))}")
            distributed.barrier("train:damaged_moved")
        epoch, batch = meta["epoch"], meta["batch"]
        say(f"resuming {run_dir} at step {meta['step']} (epoch {epoch + 1}, batch {batch})")
        return state, (epoch, batch), float(meta.get("elapsed_s", 0.0))
    params, origin = initial_params(config, stage, source, model)
    if previous:  # --overwrite, checked by run_folder.check_start
        say(f"starting over (--overwrite): removing the {previous} in {run_dir}")
        distributed.barrier("train:previous_seen")  # all decided before one deletes
        if distributed.is_main_process():
            shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        distributed.barrier("train:previous_removed")
    state = train_step.init_train_state(params, optimizer, config.seed, shardings, partition)
    say(f"initial weights: {origin}")
    return state, (0, 0), 0.0


def _announce(config: TrainConfig, stage: Stage, model: ModelConfig, state, mesh, loader,
              run_dir: pathlib.Path, batches: int, total_steps: int,
              objective: Objective) -> None:
    """The run's opening lines: model size, devices, layout, host memory, schedule, rows."""
    from minimind_jax.model.transformer import count_params

    opt = config.optim
    n_params = count_params(state.params)
    say(f"model parameters: {n_params / 1e6:.3f} M ({n_params:,}); {mesh.devices.size} "
         f"device(s) {jax.devices()[0].platform} in {jax.process_count()} process(es); "
         f"dtype {model.dtype}; run folder {run_dir}")
    say(_layout_line(state, config.distributed.fsdp, mesh.devices.size))
    if objective.frozen is not None:
        say("frozen model (reference / teacher): " + (
            "sharded over the devices like the params (fsdp)" if config.distributed.fsdp
            else "replicated on every device"))
    say(host_memory.describe())
    if cache_dir := jax.config.jax_compilation_cache_dir:
        say(f"compilation cache: {cache_dir} (reruns of these shapes skip most compiling)")
    say(f"{stage.name}: {opt.epochs} epoch(s) x {batches} batches of "
         f"{config.data.batch_size}, accumulation {opt.accumulation_steps}, {total_steps} "
         f"micro-steps, lr {opt.learning_rate} ({opt.lr_schedule})")
    say(_rows_line(loader, config.data))


def _open_source_once(config: TrainConfig, samples: str, tokenizer, model: ModelConfig,
                      data_path: str, pack: bool):
    """The rows of `data_path`; with several processes, process 0 builds a missing token cache
    first, so the others find it (shared storage) instead of racing on it."""
    data_config = config.data

    def open_it(quiet: bool):
        return open_source(data_path, tokenizer, samples, model.max_seq_len,
                           pack=pack, pack_window=data_config.pack_window,
                           cache_dir=data_config.cache_dir,
                           skip_bad_lines=data_config.skip_bad_lines,
                           progress=False if quiet else None,
                           log=(lambda message: None) if quiet else None,
                           rules=generation_of(model).name, sft_seed=config.seed,
                           sft_random=data_config.sft_random)

    if not distributed.is_main_process():
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


def _rows_line(loader, data_config: DataConfig) -> str:
    """How full the rows are: packing's fill fraction, or the padding of one sample per row;
    with length buckets, also how full the fed (cut) batches are in epoch 1."""
    data = loader.source
    fill = 1.0 - data.padding_fraction
    if data_config.pack:
        how = ("next fit in file order" if data_config.pack_window == 0
               else f"best fit over windows of {data_config.pack_window:,} samples")
        line = f"rows: {len(data):,} packed ({how}), filled {fill:.1%}"
    else:
        line = f"rows: {len(data):,}, one sample each, filled {fill:.1%}"
    if loader.length_buckets and hasattr(data, "row_lengths"):
        mask = data.get_batch(np.arange(1))["loss_mask"][0]  # [T] or [sides, T]
        width = mask.shape[-1]  # max_seq_len (- 1)
        widths = "/".join(map(str, bucket_widths(width, loader.length_buckets)))
        fill = loader.bucketed_fill(data.row_lengths, width)
        if loader.batch_packing:
            n_rows = mask.size // width
            counts = "/".join(map(str, row_buckets(data_config.batch_size * n_rows,
                                                   loader.length_buckets,
                                                   loader.packed_rows_multiple)))
            line += (f"; each batch packed into {counts} rows of {width}: about {fill:.1%}")
        else:
            line += f"; cut to widths {widths} per batch: about {fill:.1%}"
    return line


def _layout_line(state, fsdp: bool, n_devices: int) -> str:
    """Where params and optimizer state live, with this device's share of the params."""
    from minimind_jax.train import train_step

    total = sum(leaf.nbytes for leaf in jax.tree.leaves(state.params))
    local = train_step.local_bytes(state.params)
    layout = (f"fsdp: params and optimizer state sharded over {n_devices} device(s)" if fsdp
              else "params and optimizer state replicated on every device")
    return (f"{layout}; params per device {local / 2**20:.3f} MiB of {total / 2**20:.3f} MiB "
            f"({100 * local / total:.1f}%)")


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
