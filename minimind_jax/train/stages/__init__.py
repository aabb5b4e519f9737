"""The training stages, one module each, and `STAGES`, their one table: the commands
(train.flags), `train.run` and `eval` read it. What a stage declares: stages.stage.Stage."""

from minimind_jax.errors import UserError
from minimind_jax.train.stages import (
    distill,
    distill_reason,
    dpo,
    grpo,
    lora,
    ppo,
    pretrain,
    sft,
)
from minimind_jax.train.stages.stage import Objective, Stage, StageContext

STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    pretrain.STAGE, sft.STAGE, lora.STAGE, dpo.STAGE, distill.STAGE, distill_reason.STAGE,
    grpo.STAGE, ppo.STAGE)}


def named(name: str) -> Stage:
    """The stage called `name`, or UserError."""
    if name not in STAGES:
        raise UserError(f"unknown stage {name!r}; expected one of {', '.join(STAGES)}")
    return STAGES[name]


__all__ = ["STAGES", "Objective", "Stage", "StageContext", "named"]
