"""A training objective other than the LM loss (DPO, distillation): what a stage plugs into the
one training path (train.setup / train.loop / train.train_step) through `Stage.objective`.

`Stage.objective(config, model, tokenizer, init_source) -> Objective` is called once the run's
model config and tokenizer are known (`init_source`: where the initial weights come from, also
on --resume, or None for a random init).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a stage changes in a training run."""

    # (params, batch, frozen) -> (value to differentiate, metrics with at least loss and aux);
    # see train_step.make_train_step
    loss: Callable
    frozen: Any = None  # a frozen second params tree (reference model, teacher), or None
    rows: Any = None  # the training rows (a data.rows-like source); None: `rows_stage` samples
    rows_stage: str = "sft"  # the sample format read when `rows` is None (data.samples.STAGES)
    # (epoch, epochs, batch, batches, record, epoch_seconds, batches_done) -> the console line;
    # None: the arch's pretrain/SFT line
    line: Callable | None = None
    notes: tuple[str, ...] = ()  # lines printed when the run starts
