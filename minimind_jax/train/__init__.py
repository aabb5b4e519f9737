"""Training: the typed config and recipes, the optimizer, the jitted train step, the loop,
checkpoints, validation, tracking and the run folder's lock.

From Python: `train.run(TrainConfig(...), "dpo")` is the `dpo` command without its flags, for
every stage of `train.stages.STAGES` (`from minimind_jax import train`).

The modules, from flags to checkpoint: `stages` (one module per stage, and their table) ->
`flags` (a command per stage) -> `train_config` (`TrainConfig`, resolved with the stage's
defaults and `recipes`) -> `setup` (`build_run`: tokenizer, model, `run_folder`, data, train
state, `train_step`, `optim`, `checkpoint`, `run_log`) -> `loop` (`run`, `train_loop`;
`evaluate` validates, `tracking` and `log_lines` report).
"""

from minimind_jax.train.loop import run
from minimind_jax.train.recipes import Recipe
from minimind_jax.train.train_config import (
    DataConfig,
    EvalConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)

__all__ = ["DataConfig", "EvalConfig", "OptimConfig", "Recipe", "RunConfig", "TrainConfig",
           "run"]
