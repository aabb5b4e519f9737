"""The training run's typed configuration: frozen dataclasses, built once from the flags.

`TrainConfig` bundles the model (`ModelConfig`), the data, the optimisation and its schedule,
the run folder (checkpoints, resume, tracker), validation and the multi-process setup. The
`pretrain`/`sft` commands build it from their flags (`from_args`, at the CLI edge); Python
callers build it directly and call `train.run(config, stage)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from minimind_jax.data.packing import DEFAULT_WINDOW as DEFAULT_PACK_WINDOW
from minimind_jax.errors import UserError
from minimind_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the rows come from and how they are batched."""

    data_path: str
    tokenizer: str | None = None  # None: `train.resolve_tokenizer`'s search
    batch_size: int = 32  # sequences per micro-batch, over all devices
    shuffle: bool = True
    pack: bool = False  # several documents per row (pretrain only)
    pack_window: int = DEFAULT_PACK_WINDOW
    cache_dir: str | None = None
    skip_bad_lines: bool = False
    sft_random: bool = True  # minimind-3 SFT: random system prompts, think-block stripping


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with accumulation and clipping, and the learning-rate schedule over the run."""

    learning_rate: float
    accumulation_steps: int = 1
    epochs: int = 1
    max_steps: int | None = None  # None: all epochs
    lr_schedule: str = "cosine"  # optim.SCHEDULES
    warmup_iters: int = 0
    grad_clip: float = 1.0
    weight_decay: float = 0.01


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Validation on held-out data (none without `data_path`)."""

    data_path: str | None = None
    interval: int = 100  # micro-steps between evaluations
    batches: int | None = None  # None: all


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The run folder: where it is, how it starts, what it logs and keeps."""

    out_dir: str = "out"
    run_prefix: str | None = None  # None: the stage's (pretrain / full_sft)
    init_from: str | None = None  # None: random init (pretrain) or the pretrain run (sft)
    resume: bool = False
    overwrite: bool = False
    log_interval: int = 100
    save_interval: int = 100
    max_consecutive_skips: int = 20
    tracker: str = "tensorboard"  # tracking.TRACKERS
    tracker_project: str | None = None
    flags: Mapping[str, Any] | None = None  # recorded as train_args.json (None: this config)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """jax.distributed's explicit settings (None: auto-detected) and the parameter layout."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    fsdp: bool = False  # shard params and optimizer state instead of replicating them


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    run: RunConfig = RunConfig()
    eval: EvalConfig = EvalConfig()
    distributed: DistributedConfig = DistributedConfig()
    seed: int = 1337
    recipe: str | None = None  # recipes.RECIPES
    vocab_from_tokenizer: bool = False  # model.vocab_size := the tokenizer's

    def record(self) -> dict:
        """What train_args.json holds: the command's flags, else this config."""
        if self.run.flags is not None:
            return dict(self.run.flags)
        return dataclasses.asdict(self)


def distributed_from_args(args: argparse.Namespace) -> DistributedConfig:
    ids = getattr(args, "local_device_ids", None)
    return DistributedConfig(
        coordinator_address=getattr(args, "coordinator_address", None),
        num_processes=getattr(args, "num_processes", None),
        process_id=getattr(args, "process_id", None),
        local_device_ids=tuple(ids) if ids is not None else None,
        fsdp=bool(getattr(args, "fsdp", False)))


def settings_from_args(args: argparse.Namespace, tracker: str) -> dict:
    """The training flags (after `compat_flags.apply` and `recipes.apply_defaults`) as the
    fields of a `TrainConfig` but its model (whose dtype `auto` needs the JAX backend)."""
    return dict(
        data=DataConfig(data_path=args.data_path, tokenizer=args.tokenizer,
                        batch_size=args.batch_size, shuffle=not args.no_shuffle, pack=args.pack,
                        pack_window=args.pack_window, cache_dir=args.cache_dir,
                        skip_bad_lines=args.skip_bad_lines, sft_random=not args.no_sft_random),
        optim=OptimConfig(learning_rate=args.learning_rate,
                          accumulation_steps=args.accumulation_steps, epochs=args.epochs,
                          max_steps=args.max_steps, lr_schedule=args.lr_schedule,
                          warmup_iters=args.warmup_iters, grad_clip=args.grad_clip,
                          weight_decay=args.weight_decay),
        run=RunConfig(out_dir=args.out_dir, run_prefix=getattr(args, "run_prefix", None) or None,
                      init_from=args.init_from, resume=args.resume, overwrite=args.overwrite,
                      log_interval=args.log_interval, save_interval=args.save_interval,
                      max_consecutive_skips=args.max_consecutive_skips, tracker=tracker,
                      tracker_project=args.wandb_project,
                      flags={k: v for k, v in vars(args).items() if k != "func"}),
        eval=EvalConfig(data_path=args.eval_data, interval=args.eval_interval,
                        batches=args.eval_batches),
        distributed=distributed_from_args(args),
        seed=args.seed,
        recipe=args.recipe,
        vocab_from_tokenizer=args.vocab_size is None)


def check_settings(settings: Mapping[str, Any]) -> None:
    """Refuse numbers that make no run (named by their flags), before anything is created or
    opened. `settings`: a TrainConfig's fields (`settings_from_args`, or `vars(config)`)."""
    data, optim, run = settings["data"], settings["optim"], settings["run"]
    for flag, value in (("batch_size", data.batch_size), ("epochs", optim.epochs),
                        ("accumulation_steps", optim.accumulation_steps),
                        ("log_interval", run.log_interval), ("save_interval", run.save_interval),
                        ("eval_interval", settings["eval"].interval),
                        ("max_consecutive_skips", run.max_consecutive_skips)):
        if value < 1:
            raise UserError(f"--{flag} must be >= 1, got {value}")
    if optim.max_steps is not None and optim.max_steps < 1:
        raise UserError(f"--max_steps must be >= 1, got {optim.max_steps}")
    if optim.warmup_iters < 0:
        raise UserError(f"--warmup_iters must be >= 0, got {optim.warmup_iters}")
    for flag, value, at_least_zero in (("learning_rate", optim.learning_rate, True),
                                       ("weight_decay", optim.weight_decay, True),
                                       ("grad_clip", optim.grad_clip, False)):
        if not math.isfinite(value) or (at_least_zero and value < 0):
            raise UserError(f"--{flag} must be a finite number{' >= 0' if at_least_zero else ''}"
                            f", got {value}")
