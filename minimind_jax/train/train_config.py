"""The training run's typed configuration: frozen dataclasses, resolved once.

`TrainConfig` bundles the model (`ModelConfig`), the data, the optimisation and its schedule,
the run folder (checkpoints, resume, tracker), validation, the multi-process setup and the
`Recipe`. A field left None takes the stage's default for the model's arch or the recipe's
choice; `TrainConfig.resolved(command)` fills them in, and is the one place that does: the
training commands build a TrainConfig from their flags (whose defaults are these
fields'), Python callers build one directly, and `train.run` resolves either the same way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from minimind_jax.data.packing import DEFAULT_WINDOW as DEFAULT_PACK_WINDOW
from minimind_jax.errors import UserError
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.generation import generation_of
from minimind_jax.runtime.distributed import DistributedConfig
from minimind_jax.train.recipes import Recipe, recipe_named


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the rows come from and how they are batched."""

    data_path: str
    tokenizer: str | None = None  # None: searched (train.setup.tokenizer_dir)
    batch_size: int | None = None  # sequences per micro-batch, over all devices; None: stage's
    shuffle: bool | None = None  # None: the recipe's (every epoch, except MiniMind2's)
    pack: bool = False  # several samples per row (pretrain, SFT-style stages)
    pack_window: int = DEFAULT_PACK_WINDOW
    cache_dir: str | None = None
    skip_bad_lines: bool = False
    sft_random: bool = True  # minimind-3 SFT: random system prompts, think-block stripping
    length_buckets: int | None = None  # batch widths (data.batches); None: 4, MoE models 0
    # with length buckets, pack each batch's rows into fewer rows instead of cutting its width
    # (data.batches); None: where the stage's loss reads packed rows and one process loads
    batch_packing: bool | None = None


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with accumulation and clipping, and the learning-rate schedule over the run."""

    learning_rate: float | None = None  # None: the stage's
    accumulation_steps: int | None = None  # None: the stage's
    epochs: int | None = None  # None: the stage's
    max_steps: int | None = None  # None: all epochs
    lr_schedule: str | None = None  # train.optim.SCHEDULES; None: the recipe's, else cosine
    warmup_iters: int = 0
    grad_clip: float = 1.0
    weight_decay: float = 0.01


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Validation on held-out data (none without `data_path`)."""

    data_path: str | None = None
    interval: int | None = None  # micro-steps between evaluations; None: run.save_interval
    batches: int | None = None  # None: all


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The run folder: where it is, how it starts, what it logs and keeps."""

    out_dir: str = "out"
    run_prefix: str | None = None  # None: the stage's (pretrain, full_sft, ...)
    init_from: str | None = None  # None: the stage's start (random, the pretrain run, ...)
    lora_init_from: str | None = None  # lora: adapter file to start from (None: seeded init)
    resume: bool = False
    overwrite: bool = False
    log_interval: int | None = None  # None: the stage's (100; grpo and ppo: 1, their scripts')
    save_interval: int = 100
    max_consecutive_skips: int = 20
    tracker: str = "tensorboard"  # train.tracking.TRACKERS
    tracker_project: str | None = None
    flags: Mapping[str, Any] | None = None  # recorded as train_args.json (None: this config)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()
    eval: EvalConfig = EvalConfig()
    distributed: DistributedConfig = DistributedConfig()
    seed: int | None = None  # None: the recipe's (1337; minimind3: 42)
    recipe: Recipe = Recipe()  # a Recipe, or its name (train.recipes.RECIPES)
    vocab_from_tokenizer: bool = False  # model.vocab_size := the tokenizer's

    def __post_init__(self):
        if not isinstance(self.recipe, Recipe):  # a name, for callers' convenience
            object.__setattr__(self, "recipe", recipe_named(self.recipe))

    def resolved(self, stage) -> TrainConfig:
        """This config with every None default filled in for `stage` (a train.stages.Stage:
        its defaults for the model's generation)."""
        defaults = stage.defaults_for(generation_of(self.model).name)
        settings = resolve_settings(vars(self), defaults)
        return dataclasses.replace(self, **{**settings,
                                            "model": resolve_model(self.model, defaults)})

    def record(self) -> dict:
        """What train_args.json holds: the command's flags, else this config."""
        if self.run.flags is not None:
            return dict(self.run.flags)
        return dataclasses.asdict(self)


# rows shorter than this train without remat whatever the stage: their activations are small,
# and the scanned, rematerialised blocks cost a tiny model more to compile than they save
REMAT_MIN_TOKENS = 256


def resolve_model(model, defaults: Mapping[str, Any]):
    """`model` (a ModelConfig) with its None remat set to the stage's default
    (`defaults["remat"]`) for rows of `model.max_seq_len`."""
    if model.remat is not None:
        return model
    return model.replace(remat=bool(defaults.get("remat", False))
                         and model.max_seq_len >= REMAT_MIN_TOKENS)


def resolve_settings(settings: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict:
    """A TrainConfig's fields but the model (`settings`), with the Nones filled in from a
    stage's `defaults` (for the model's generation) and from the recipe; a recipe's fixed
    choice given otherwise is an error. Resolved settings come back equal."""
    recipe = recipe_named(settings["recipe"])
    data, optim, run, eval_ = (settings[k] for k in ("data", "optim", "run", "eval"))

    def given_or(value, default):
        return default if value is None else value

    # a stage whose reference script schedules its own way (the RL scripts' cosine annealing)
    # says so with `recipe_lr_schedule`
    recipe_schedule = (defaults.get("recipe_lr_schedule", recipe.lr_schedule)
                       if recipe.lr_schedule else None)
    if recipe_schedule and optim.lr_schedule not in (None, recipe_schedule):
        raise UserError(f"--recipe {recipe.name} uses --lr_schedule {recipe_schedule}, "
                        f"not {optim.lr_schedule}")
    if recipe.name and data.shuffle not in (None, recipe.shuffle):
        raise UserError(f"--recipe {recipe.name} shuffles every epoch; drop --no_shuffle"
                        if recipe.shuffle else
                        f"--recipe {recipe.name} reads the data in file order; do not shuffle")
    return dict(
        settings,
        recipe=recipe,
        seed=given_or(settings["seed"], recipe.seed),
        data=dataclasses.replace(data, batch_size=given_or(data.batch_size,
                                                           defaults["batch_size"]),
                                 shuffle=given_or(data.shuffle, recipe.shuffle)),
        optim=dataclasses.replace(
            optim, learning_rate=given_or(optim.learning_rate, defaults["learning_rate"]),
            accumulation_steps=given_or(optim.accumulation_steps,
                                        defaults["accumulation_steps"]),
            epochs=given_or(optim.epochs, defaults["epochs"]),
            lr_schedule=given_or(optim.lr_schedule, recipe_schedule or "cosine")),
        eval=dataclasses.replace(eval_, interval=given_or(eval_.interval, run.save_interval)),
        run=dataclasses.replace(run, run_prefix=given_or(run.run_prefix,
                                                         defaults["run_prefix"]),
                                log_interval=given_or(run.log_interval,
                                                      defaults.get("log_interval", 100))),
    )


def check_settings(settings: Mapping[str, Any]) -> None:
    """Refuse numbers that make no run (named by their flags), before anything is created or
    opened. `settings`: resolved TrainConfig fields (`resolve_settings`, or `vars(config)`)."""
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
