"""What makes a training stage, declared in one place per stage (train/stages/<name>.py).

`train.setup` and `train.loop` read these fields and call these hooks; they never ask which
stage they run. A stage is a frozen `Stage`; the hooks are plain functions:

- its defaults per generation (`defaults[generation name]`: epochs, batch_size, learning_rate,
  accumulation_steps, run_prefix, and where the reference's script sets them, max_seq_len,
  log_interval (else 100), its own LR schedule under a recipe, recipe_lr_schedule, and
  remat (on for the stages that hold a frozen second model, whose memory is what binds; it
  applies at max_seq_len >= train_config.REMAT_MIN_TOKENS);
- the rows it reads (`samples`, a data.samples format; or the objective brings its own);
- its starting weights (`start_from[generation name]`: the saved weights' name under
  OUT_DIR; None: a seeded random init) and `initial_params` (LoRA: the base plus adapters);
- which parameters train (`model_for`, `partition`: LoRA's adapters);
- its objective (`objective(StageContext) -> Objective`): the loss, a frozen second model,
  its own rows, console line and notes, and optionally a batch producer;
- what it writes at the end (`finish`);
- its own flags (`add_flags`, `options_from_args`) into its frozen `options`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

from minimind_jax.errors import UserError
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.generation import Generation, generation_of
from minimind_jax.train import recipes
from minimind_jax.train.run_folder import find_saved_weights
from minimind_jax.train.run_log import say


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a stage's objective changes in a run (all None / empty: the LM loss on the
    stage's samples, the generation's console line)."""

    # (params, batch, frozen) -> (value to differentiate, metrics with at least loss and aux);
    # see train_step.make_train_step. None: masked mean CE + MoE aux
    loss: Callable | None = None
    frozen: Any = None  # a frozen second params tree (reference model, teacher), or None
    rows: Any = None  # the training rows (a data.rows-like source); None: the stage's samples
    # (epoch, epochs, batch, batches, record, epoch_seconds, batches_done) -> the console line
    # (train.log_lines); None: the generation's pretrain/SFT line
    line: Callable | None = None
    notes: tuple[str, ...] = ()  # lines printed when the run starts
    # The batch producer: (state, host batch, info) -> the host batch the step consumes, made
    # from the current train state (rollouts); called after the previous step has run. None:
    # the loader's batches as they are.
    produce: Callable | None = None
    # Length buckets (data.batches): (host batch) -> [..., T] bool, the positions the loss
    # reads; a batch is cut after the last column with one. None: the loss mask's positions.
    # (A stage with a batch producer is never cut: its loader rows are not what the step reads.)
    loss_columns: Callable | None = None
    # The loss reads packed batches (data.batches.pack_batch: positions, segment ids, and
    # row_index / row_real for per-row sums) as it reads padded ones. The LM loss (loss None)
    # does; another loss only when it says so.
    packs_rows: bool = False
    # A stage that trains more than one model or updates more than once per batch (PPO):
    # `params_like()` -> a params tree of the train state's shapes (default: the model's),
    # `optimizer` whose `init(params)` makes the state's opt_state (default: AdamW inside
    # MultiSteps), and `make_step(mesh, the state's shardings)` -> its own step `(state, host
    # batch) -> (state, metrics)` with the metrics of train_step.make_train_step (default: that
    # step), keeping the state's layout (--fsdp).
    params_like: Callable | None = None
    optimizer: Any = None
    make_step: Callable | None = None


@dataclasses.dataclass(frozen=True)
class StageContext:
    """What a stage's objective hook is given once the run's model and tokenizer are known."""

    config: Any  # the resolved TrainConfig
    model: ModelConfig  # the run's model (the stage's `model_for`, the tokenizer's vocab)
    generation: Generation  # the model's (model.generation): its facts and name
    tokenizer: Any
    options: Any  # the stage's options
    # () -> (the run's initial params, where they came from); also on --resume, where the
    # train state comes from the checkpoint (DPO's reference model is these weights)
    start: Callable[[], tuple[Any, str]]


def lm_objective(context: StageContext) -> Objective:
    del context
    return Objective()


def same_model(model: ModelConfig) -> ModelConfig:
    return model


def no_partition(model: ModelConfig):
    del model


@dataclasses.dataclass(frozen=True)
class Stage:
    """A training stage: see the module docstring."""

    name: str  # the command, and the stage recorded in checkpoints
    summary: str  # the command's one-line --help
    description: str  # the command's --help description
    samples: str  # the sample format of its rows (data.samples.SAMPLE_FORMATS)
    data_path: str  # the reference's default data file
    # generation name -> the defaults of unset settings
    defaults: Mapping[str, Mapping[str, Any]]
    tracker_project: str  # the reference's wandb project (and run-name prefix)
    tracker_run: str | None = None  # the reference's run-name prefix, if not the project
    # generation name -> the saved weights' name; None: a random init
    start_from: Mapping[str, str] | None = None
    # minimind-3's recipe starts from its .pth weights, which hold float16 values
    start_rounded_to_float16: bool = False
    validates: bool = True  # --eval_data measures the loss it trains (the LM loss)
    options: Any = None
    objective: Callable[[StageContext], Objective] = lm_objective
    model_for: Callable[[ModelConfig], ModelConfig] = same_model
    partition: Callable[[ModelConfig], Any] = no_partition  # -> model.lora.Partition or None
    # (config, stage, source, model, warn) -> (params, origin); None: `start_params`
    initial_params: Callable | None = None
    finish: Callable | None = None  # (config, model, run_dir) -> (final state) -> None
    finish_at_saves: bool = False  # `finish` also runs at each --save_interval checkpoint
    # where the LM's params sit in the train state's params (PPO: ("actor",)); recorded in
    # each checkpoint, so generate, eval, convert and --init_from load that model
    lm_params_at: tuple[str, ...] = ()
    add_flags: Callable | None = None  # (parser) -> None: the stage's own flags
    options_from_args: Callable | None = None  # (args) -> options
    # (args) -> lines: maps the reference script's own flags onto ours, before the config
    map_flags: Callable | None = None

    def defaults_for(self, generation: str) -> dict:
        """The defaults of a generation (its name)."""
        return dict(self.defaults[generation])

    def with_options(self, **changes) -> Stage:
        """This stage with some of its options changed."""
        return dataclasses.replace(self, options=dataclasses.replace(self.options, **changes))


def start_name(stage: Stage, model: ModelConfig) -> str | None:
    """NAME_{dim}[_moe] of the weights the stage starts from under OUT_DIR (None: random)."""
    if stage.start_from is None:
        return None
    return f"{stage.start_from[generation_of(model).name]}_{model.tag}"


def init_source(config, stage: Stage, model: ModelConfig) -> pathlib.Path | None:
    """Where the initial weights come from: --init_from (`none`: a seeded random init); else
    the stage's `start_from` weights of the model's tag; else None. Checked to exist."""
    init_from = config.run.init_from
    if init_from == "none":  # minimind-3's --from_weight none
        return None
    if init_from:
        source = pathlib.Path(init_from)
        if not source.exists():
            raise UserError(f"--init_from: {source} does not exist")
        return source
    if stage.start_from is None:
        return None
    return find_saved_weights(config.run.out_dir, start_name(stage, model),
                              f"{stage.name} starts from the "
                              f"{stage.start_from[generation_of(model).name]} weights")


def start_params(config, stage: Stage, source: pathlib.Path | None, model: ModelConfig,
                 warn) -> tuple[Any, str]:
    """(params, where they came from): `source`'s weights (minimind-3's recipe: rounded to
    float16 where the stage starts from its .pth files), or a seeded random init."""
    import jax

    from minimind_jax.model import weights
    from minimind_jax.model.transformer import init_params

    if source is None:
        return init_params(model, jax.random.PRNGKey(config.seed)), "random init"
    params, _, origin = weights.load_weights(source, model, exact=True, warn=warn)
    if stage.start_rounded_to_float16 and config.recipe.fp16_sft_init:
        return recipes.round_to_float16(params), f"{origin} (rounded to float16, as minimind-3)"
    return params, origin


def on_host(x):
    """A numpy copy of a (possibly sharded, possibly multi-process) array; every process must
    call it."""
    import numpy as np

    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(x, tiled=True)


def with_torch_or_npz(path: pathlib.Path) -> pathlib.Path:
    """`path` (.pth) when torch can write it, else the same name as .npz (the same keys)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return path.with_suffix(".npz")
    return path


def weights_file_at_end(config, model: ModelConfig, run_dir: pathlib.Path,
                        params_of: Callable = lambda state: state.params):
    """A `finish` hook: the final weights (`params_of(state)`) as the reference's script saves
    them, in the run folder: {run_prefix}_{dim}[_moe].pth, float16 where its generation saves
    float16."""
    import jax
    import numpy as np

    from minimind_jax.model import weights
    from minimind_jax.runtime import distributed

    path = run_dir / f"{config.run.run_prefix}_{model.tag}.pth"
    half = generation_of(model).float16_files

    def write(state):
        params = jax.tree.map(on_host, params_of(state))  # every process takes part
        if not distributed.is_main_process():
            return
        state_dict = weights.state_dict_from_params(params, model)
        if half:
            state_dict = {k: np.asarray(v, np.float16) for k, v in state_dict.items()}
        target = with_torch_or_npz(path)
        weights.save_state_dict(state_dict, target)
        say(f"weights: {target}")

    return write
