"""DPO (`minimind-jax dpo`): the references' train_dpo.py (docs/post_training_spec.md section 2).

The policy trains from the SFT weights against a frozen reference model holding the same
starting weights (its forward takes no gradient). A batch of b pairs ([b, 2, T] rows from
data.pairs) runs as 2b rows, chosen rows first. Per row, the log-probabilities of the targets
over the loss mask: MiniMind2 averages them over the mask, minimind-3 sums them. With
`pi = pol_chosen - pol_rejected` and `ref = ref_chosen - ref_rejected`:
`dpo = mean_pairs(-logsigmoid(beta * (pi - ref)))`; beta 0.1 (MiniMind2, hard-coded there) or
0.15 (minimind-3's --beta). The loss is `dpo` (MiniMind2, which drops the policy's MoE aux)
or `dpo + aux` (minimind-3). Logged per step besides: dpo_loss, the rewards
`beta * (policy - reference)` of each side (means over the pairs), their margin and accuracy
(share of pairs whose chosen reward is strictly higher).

Data order, LR schedule, accumulation and minimind-3's end-of-epoch flush are the recipe's, as
for pretrain/SFT (`--recipe minimind2`, or `--arch minimind3 --recipe minimind3`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from minimind_jax.data.pairs import PairSource
from minimind_jax.errors import UserError
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.loss import token_cross_entropy
from minimind_jax.train import log_lines
from minimind_jax.train.stages.stage import Objective, Stage, StageContext


@dataclasses.dataclass(frozen=True)
class DpoRules:
    """What a generation's train_dpo.py computes."""

    beta: float  # the default temperature
    average: bool  # per-row log-probs averaged over the reply (else summed)
    with_aux: bool  # the policy's MoE aux loss added
    how: str  # said when the run starts


RULES = {
    "minimind2": DpoRules(beta=0.1, average=True, with_aux=False,  # beta hard-coded there
                          how="log-probs averaged over each reply, no MoE aux"),
    "minimind3": DpoRules(beta=0.15, average=False, with_aux=True,  # its --beta
                          how="log-probs summed over each reply, + the policy's MoE aux"),
}


def sequence_logps(logits_NTV, labels_NT, mask_NT, real_B, average: bool, row_index=None):
    """Per row: sum over the mask of log softmax(logits)[label] in float32, divided by the
    mask's size with `average` (a real row with an empty mask gives NaN, as the reference; a
    padding row, not `real_B`, gives 0). Rows are those of the [B, T] inputs, or with
    `row_index` ([N, T]: each position's row, B for none) the B rows packed into N."""
    logp_NT = -token_cross_entropy(logits_NTV, labels_NT)
    mask_NT = mask_NT.astype(jnp.float32)
    picked_NT = jnp.where(mask_NT > 0, logp_NT * mask_NT, 0.0)
    if row_index is None:
        total_B, count_B = picked_NT.sum(-1), mask_NT.sum(-1)
    else:
        n = real_B.shape[0]

        def per_row(values_NT):
            return jax.ops.segment_sum(values_NT.ravel(), row_index.ravel(), n + 1)[:n]

        total_B, count_B = per_row(picked_NT), per_row(mask_NT)
    if average:
        total_B = total_B / jnp.where(real_B, count_B, 1.0)
    return jnp.where(real_B, total_B, 0.0)


def dpo_terms(policy_2B, reference_2B, real_B, beta: float) -> dict:
    """The DPO loss (mean over the real pairs) and its rewards from per-row log-probs of the
    2b rows (chosen first)."""
    b = real_B.shape[0]
    chosen = beta * (policy_2B[:b] - reference_2B[:b])
    rejected = beta * (policy_2B[b:] - reference_2B[b:])
    losses_B = -jax.nn.log_sigmoid(chosen - rejected)  # = beta * (pi_logratios - ref_logratios)
    n = jnp.maximum(real_B.sum(), 1).astype(jnp.float32)

    def mean(values_B):
        return jnp.sum(jnp.where(real_B, values_B, 0.0)) / n

    return {"dpo_loss": mean(losses_B), "chosen_reward": mean(chosen),
            "rejected_reward": mean(rejected), "reward_margin": mean(chosen - rejected),
            "reward_accuracy": mean((chosen > rejected).astype(jnp.float32))}


def dpo_loss_fn(config: ModelConfig, beta: float, average: bool, with_aux: bool):
    """train_step's objective: (params, batch of pairs, reference params) -> (loss, metrics)."""
    from minimind_jax.model.transformer import MiniMind

    model = MiniMind(config)

    def objective(params, batch: dict, reference):
        if "row_index" in batch:  # packed (data.batches.pack_batch): pair i's sides 2i, 2i+1
            real_B2 = batch["row_real"]
            real_B = jnp.any(real_B2, axis=1)
            rows = {k: batch[k] for k in ("input_ids", "labels", "loss_mask", "positions",
                                          "segment_ids", "row_index")}
            real_rows = real_B2.reshape(-1)
        else:
            ids_B2T = batch["input_ids"]
            real_B = jnp.any(ids_B2T.reshape(ids_B2T.shape[0], -1) != 0, axis=1)
            rows = {k: jnp.concatenate([batch[k][:, 0], batch[k][:, 1]])
                    for k in ("input_ids", "labels", "loss_mask")}
            real_rows = jnp.concatenate([real_B, real_B])
        inputs = {k: rows[k] for k in ("positions", "segment_ids") if k in rows}
        logits, aux = model.apply({"params": params}, rows["input_ids"], **inputs)
        ref_logits, _ = model.apply({"params": reference}, rows["input_ids"], **inputs)

        def logps(logits_NTV):
            values = sequence_logps(logits_NTV, rows["labels"], rows["loss_mask"], real_rows,
                                    average, rows.get("row_index"))
            if "row_index" in rows:  # [b, 2] -> chosen rows, then rejected ones
                values = values.reshape(-1, 2).T.reshape(-1)
            return values

        policy = logps(logits)
        ref = logps(jax.lax.stop_gradient(ref_logits))
        terms = dpo_terms(policy, ref, real_B, beta)
        aux = aux if with_aux else jnp.zeros((), jnp.float32)
        loss = terms["dpo_loss"] + aux
        return loss, {"loss": loss, "aux": aux, **terms}

    return objective


@dataclasses.dataclass(frozen=True)
class DpoOptions:
    beta: float | None = None  # None: the generation's (BETA)


def make_objective(context: StageContext) -> Objective:
    """The DPO objective of a run: rows from --data_path, the reference model = the initial
    weights, the formulas of the model's generation."""
    config, model, generation = context.config, context.model, context.generation
    rules = RULES[generation.name]
    beta = rules.beta if context.options.beta is None else context.options.beta
    if config.data.pack:
        raise UserError("--pack: DPO rows keep one conversation each")
    rows = PairSource(config.data.data_path, context.tokenizer, model.max_seq_len,
                      rules=generation.name, seed=config.seed,
                      randomize=config.data.sft_random,
                      skip_bad_lines=config.data.skip_bad_lines)
    reference, origin = context.start()
    return Objective(loss=dpo_loss_fn(model, beta, average=rules.average,
                                      with_aux=rules.with_aux),
                     frozen=reference, rows=rows, packs_rows=True,
                     line=(log_lines.minimind3_dpo_line if generation.minimind3_lines else
                           log_lines.minimind2_divided_line(config.optim.accumulation_steps)),
                     notes=(f"dpo: {len(rows):,} pairs; reference model (frozen): {origin}; "
                            f"beta {beta}; {rules.how}",))


def add_flags(parser) -> None:
    parser.add_argument("--beta", type=float, default=None,
                        help=f"DPO temperature (default: {RULES['minimind2'].beta}, MiniMind2's "
                             f"hard-coded value; --arch minimind3: {RULES['minimind3'].beta}, its "
                             "--beta)")


STAGE = Stage(
    name="dpo",
    summary="Direct preference optimisation from the SFT weights",
    description="DPO on {\"chosen\": [messages], \"rejected\": [messages]} JSONL (the "
                "references' train_dpo.py): the policy starts from the SFT weights "
                "(default OUT_DIR/full_sft_{dim}[_moe], our run folder or the reference's "
                ".pth) and trains against a frozen copy of them. --arch minimind2: "
                "log-probs averaged per reply, beta 0.1, run folder rlhf_{dim}; --arch "
                "minimind3: summed, beta 0.15, + the MoE aux loss, run folder dpo_{dim}. "
                "--batch_size counts pairs. metrics.jsonl logs loss, dpo_loss, aux, "
                "chosen_reward, rejected_reward, reward_margin and reward_accuracy every "
                "--log_interval batches.",
    samples="pairs",  # the objective brings its rows (data.pairs)
    data_path="./dataset/dpo.jsonl",
    # The post-training scripts (docs/post_training_spec.md 2.3); batch_size counts pairs;
    # run_prefix: the references' output names.
    tracker_project="MiniMind-Full-DPO",
    defaults={
        "minimind2": dict(epochs=2, batch_size=8, learning_rate=1e-8, accumulation_steps=1,
                          remat=True, max_seq_len=1024, run_prefix="rlhf"),
        "minimind3": dict(epochs=1, batch_size=4, learning_rate=4e-8, accumulation_steps=1,
                          remat=True, max_seq_len=1024, run_prefix="dpo"),
    },
    start_from={"minimind2": "full_sft", "minimind3": "full_sft"},
    validates=False,
    options=DpoOptions(),
    objective=make_objective,
    add_flags=add_flags,
    options_from_args=lambda args: DpoOptions(beta=args.beta),
)
