"""Reasoning distillation (`minimind-jax distill_reason`): MiniMind2's train_distill_reason.py
(d9453ed). SFT on reasoning traces (`<think>...</think><answer>...</answer>` replies), from the
DPO weights (rlhf_{dim}), with the CE of some targets weighted 10.

The script weights every target position whose id is one of the ids the tokenizer gives for
`<think>`, `</think>`, `<answer>`, `</answer>` (in MiniMind2's tokenizer several pieces each,
`<`, `th`, `ink`, `>`, ...: so every `<` and `>` target counts), prompt and padding positions
included, while the denominator is the loss mask's sum counted before:

    loss = sum(CE * w) / sum(mask) + aux,   w = 10 where the target is such an id, else mask
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from minimind_jax.model.config import ModelConfig
from minimind_jax.model.loss import token_cross_entropy
from minimind_jax.train import log_lines
from minimind_jax.train.stages.stage import Objective, Stage, StageContext

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
TAG_WEIGHT = 10.0


def tag_ids(tokenizer) -> np.ndarray:
    """Every id of the tags' encodings (the script's `sp_ids` source, duplicates kept)."""
    return np.asarray([i for tag in TAGS for i in tokenizer.encode(tag)], np.int32)


def target_weights(labels_BT, mask_BT, special_ids):
    """The script's per-target weights: TAG_WEIGHT where the target is one of `special_ids`,
    else the loss mask (float32)."""
    tagged_BT = jnp.isin(labels_BT, jnp.asarray(special_ids))
    return jnp.where(tagged_BT, TAG_WEIGHT, mask_BT.astype(jnp.float32))


def weighted_lm_loss(config: ModelConfig, special_ids: np.ndarray):
    """train_step's objective: (params, batch, None) -> (loss, metrics)."""
    from minimind_jax.model.transformer import MiniMind

    model = MiniMind(config)

    def objective(params, batch: dict, frozen):
        del frozen
        logits_BTV, aux = model.apply({"params": params}, batch["input_ids"],
                                      positions=batch.get("positions"),
                                      segment_ids=batch.get("segment_ids"))
        ce_BT = token_cross_entropy(logits_BTV, batch["labels"])
        weight_BT = target_weights(batch["labels"], batch["loss_mask"], special_ids)
        count = batch["loss_mask"].astype(jnp.float32).sum()
        ce = (jnp.sum(jnp.where(weight_BT > 0, ce_BT * weight_BT, 0.0))
              / jnp.where(count > 0, count, 1.0))
        return ce + aux, {"loss": ce + aux, "aux": aux, "ce": ce}

    return objective


def loss_columns(special_ids: np.ndarray):
    """Length buckets: the positions the loss reads, the supervised ones and every tagged
    target (prompt and padding positions included), so a batch is cut only after them all."""
    def read(batch: dict) -> np.ndarray:
        return (batch["loss_mask"] > 0) | np.isin(batch["labels"], special_ids)

    return read


def make_objective(context: StageContext) -> Objective:
    ids = tag_ids(context.tokenizer)
    return Objective(
        loss=weighted_lm_loss(context.model, ids), loss_columns=loss_columns(ids),
        packs_rows=True,
        line=log_lines.minimind2_divided_line(context.config.optim.accumulation_steps),
        notes=(f"distill_reason: targets {sorted(set(ids.tolist()))} (the pieces of "
               f"{', '.join(TAGS)}) weighted {TAG_WEIGHT:g}",))


STAGE = Stage(
    name="distill_reason",
    summary="Reasoning distillation: SFT on <think>/<answer> traces, tags weighted",
    description="MiniMind2's train_distill_reason.py: SFT on reasoning traces "
                "(<think>...</think><answer>...</answer> replies) starting from the DPO "
                "weights (default OUT_DIR/rlhf_{dim}[_moe], a run folder or .pth), the CE of "
                "every target that is a piece of those tags weighted 10 (prompt positions "
                "included, the denominator the loss mask's size). Run folder "
                "OUT_DIR/reason_{dim}[_moe]; metrics.jsonl logs loss, ce and aux.",
    samples="sft",
    data_path="./dataset/r1_mix_1024.jsonl",
    # train_distill_reason.py's defaults (minimind-3 has no such script: the same numbers,
    # from its DPO output)
    tracker_project="MiniMind-Full-SFT",
    tracker_run="MiniMind-Distill-Reasoning",
    defaults={
        "minimind2": dict(epochs=1, batch_size=8, learning_rate=1e-6, accumulation_steps=1,
                          max_seq_len=1024, run_prefix="reason"),
        "minimind3": dict(epochs=1, batch_size=8, learning_rate=1e-6, accumulation_steps=1,
                          max_seq_len=1024, run_prefix="reason"),
    },
    start_from={"minimind2": "rlhf", "minimind3": "dpo"},
    objective=make_objective,
)
