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

import argparse
import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp

from minimind_jax.data.pairs import PairSource, pair_record
from minimind_jax.data.samples import Stage
from minimind_jax.errors import UserError
from minimind_jax.model.config import ModelConfig, arch_of
from minimind_jax.model.loss import token_cross_entropy
from minimind_jax.train.objective import Objective
from minimind_jax.train.run_folder import saved_weights

BETA = {"minimind2": 0.1, "minimind3": 0.15}
RUN_PREFIX = {"minimind2": "rlhf", "minimind3": "dpo"}  # the references' output names


def sequence_logps(logits_BTV, labels_BT, mask_BT, real_B, average: bool):
    """Per row: sum over the mask of log softmax(logits)[label] in float32, divided by the
    mask's size with `average` (a real row with an empty mask gives NaN, as the reference; a
    padding row, not `real_B`, gives 0)."""
    logp_BT = -token_cross_entropy(logits_BTV, labels_BT)
    mask_BT = mask_BT.astype(jnp.float32)
    total_B = jnp.sum(jnp.where(mask_BT > 0, logp_BT * mask_BT, 0.0), axis=-1)
    if average:
        total_B = total_B / jnp.where(real_B, mask_BT.sum(-1), 1.0)
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
        ids_B2T = batch["input_ids"]
        real_B = jnp.any(ids_B2T.reshape(ids_B2T.shape[0], -1) != 0, axis=1)
        rows = {k: jnp.concatenate([batch[k][:, 0], batch[k][:, 1]])
                for k in ("input_ids", "labels", "loss_mask")}
        real_2B = jnp.concatenate([real_B, real_B])
        logits, aux = model.apply({"params": params}, rows["input_ids"])
        ref_logits, _ = model.apply({"params": reference}, rows["input_ids"])
        policy = sequence_logps(logits, rows["labels"], rows["loss_mask"], real_2B, average)
        ref = sequence_logps(jax.lax.stop_gradient(ref_logits), rows["labels"],
                             rows["loss_mask"], real_2B, average)
        terms = dpo_terms(policy, ref, real_B, beta)
        aux = aux if with_aux else jnp.zeros((), jnp.float32)
        loss = terms["dpo_loss"] + aux
        return loss, {"loss": loss, "aux": aux, **terms}

    return objective


def minimind3_line(epoch, epochs, batch, batches, record, epoch_seconds, batches_done) -> str:
    """minimind-3's train_dpo.py line (1-based step)."""
    eta_min = epoch_seconds / batches_done * (batches - batch - 1) // 60
    return (f"Epoch:[{epoch + 1}/{epochs}]({batch + 1}/{batches}), loss: {record['loss']:.4f}, "
            f"dpo_loss: {record['dpo_loss']:.4f}, aux_loss: {record['aux']:.4f}, "
            f"learning_rate: {record['lr']:.8f}, epoch_time: {eta_min:.3f}min")


def minimind2_line(accumulation_steps: int, epoch, epochs, batch, batches, record,
                   epoch_seconds, batches_done) -> str:
    """MiniMind2's train_dpo.py line: its pretrain/SFT line with the loss divided by the
    accumulation steps (the value it back-propagates)."""
    from minimind_jax.train import log_lines

    return log_lines.minimind2_line(epoch, epochs, batch, batches,
                                    record["loss"] / accumulation_steps, record["lr"],
                                    epoch_seconds, batches_done)


def make_objective(config, model: ModelConfig, tokenizer, source, *,
                   beta: float | None = None) -> Objective:
    """The DPO objective of a run: rows from --data_path, the reference model = the initial
    weights, the formulas of the model's arch."""
    from minimind_jax.train.setup import initial_params

    arch = arch_of(model)
    beta = BETA[arch] if beta is None else beta
    check_start_weights(config, "dpo")
    if config.data.pack:
        raise UserError("--pack: DPO rows keep one conversation each")
    rows = PairSource(config.data.data_path, tokenizer, model.max_seq_len, rules=arch,
                      seed=config.seed, randomize=config.data.sft_random,
                      skip_bad_lines=config.data.skip_bad_lines)
    reference, origin = initial_params(config, STAGE, source, model)
    how = ("log-probs averaged over each reply, no MoE aux" if arch == "minimind2"
           else "log-probs summed over each reply, + the policy's MoE aux")
    return Objective(loss=dpo_loss_fn(model, beta, average=arch == "minimind2",
                                      with_aux=arch == "minimind3"),
                     frozen=reference, rows=rows,
                     line=minimind3_line if arch == "minimind3" else functools.partial(
                         minimind2_line, config.optim.accumulation_steps),
                     notes=(f"dpo: {len(rows):,} pairs; reference model (frozen): {origin}; "
                            f"beta {beta}; {how}",))


def check_start_weights(config, command: str) -> None:
    """A post-training run starts from trained weights: --init_from (the commands default it
    to the SFT weights), or `none` for a random init on purpose."""
    if config.run.init_from is None:
        raise UserError(f"{command} starts from trained weights: set init_from (a run folder, "
                        ".pth, .safetensors or .npz; the command defaults it to "
                        "OUT_DIR/full_sft_{dim}[_moe]), or `none` for a random init")


STAGE = Stage("dpo", pair_record, None, RUN_PREFIX["minimind2"], "./dataset/dpo.jsonl",
              objective=make_objective)


def stage(beta: float | None = None) -> Stage:
    """The DPO stage with `beta` (None: the arch's)."""
    return dataclasses.replace(STAGE, objective=functools.partial(make_objective, beta=beta))


# --- the command -------------------------------------------------------------------------------

def default_start(out_dir: str, model: ModelConfig, name: str = "full_sft") -> pathlib.Path:
    """OUT_DIR/{name}_{dim}[_moe]: our run folder, else the reference's .pth of that name."""
    found = saved_weights(out_dir, f"{name}_{model.tag}")
    if found is not None:
        return found
    base = pathlib.Path(out_dir) / f"{name}_{model.tag}"
    raise UserError(f"no {name} weights: neither {base} (a run folder) nor {base}.pth exists; "
                    f"train `{'sft' if name == 'full_sft' else name}` first with the same "
                    "--out_dir and model flags, or pass --init_from")


def post_training_config(args: argparse.Namespace, stage_: Stage, run_prefix: dict):
    """`flags.config_from_args` plus what the post-training scripts start from: --init_from
    defaults to the SFT weights, the run folder to the reference's output name (`run_prefix`
    by arch) unless --save_weight names it."""
    from minimind_jax.train.flags import config_from_args

    config = config_from_args(args, stage_)
    run = config.run
    if run.init_from is None:
        run = dataclasses.replace(run, init_from=str(default_start(run.out_dir, config.model)))
    if run.run_prefix is None:
        run = dataclasses.replace(run, run_prefix=run_prefix[arch_of(config.model)])
    return dataclasses.replace(config, run=run)


def run_command(args: argparse.Namespace) -> int:
    from minimind_jax.train.loop import run

    stage_ = stage(args.beta)
    return run(post_training_config(args, stage_, RUN_PREFIX), stage_)


def add_post_training_args(parser: argparse.ArgumentParser, stage_: Stage) -> None:
    """The pretrain/SFT training flags (train.flags), model flags, multi-process flags,
    tracker and reference flags; no validation (--eval_data)."""
    from minimind_jax.model import flags as model_flags
    from minimind_jax.runtime import distributed
    from minimind_jax.train import compat_flags, flags, tracking

    flags._add_train_args(parser, stage_)
    model_flags.add_model_args(parser, moe_value=True)
    distributed.add_distributed_args(parser)
    tracking.add_tracker_args(parser)
    compat_flags.add_reference_args(parser)
    parser.set_defaults(eval_data=None, eval_interval=None, eval_batches=None,
                        host_hugepages=True, compile_cache=True)


def register(subparsers) -> None:
    from minimind_jax.model import flags as model_flags

    parser = subparsers.add_parser(
        "dpo", formatter_class=model_flags.HelpFormatter,
        help="Direct preference optimisation from the SFT weights",
        description="DPO on {\"chosen\": [messages], \"rejected\": [messages]} JSONL (the "
                    "references' train_dpo.py): the policy starts from the SFT weights "
                    "(default OUT_DIR/full_sft_{dim}[_moe], our run folder or the reference's "
                    ".pth) and trains against a frozen copy of them. --arch minimind2: "
                    "log-probs averaged per reply, beta 0.1, run folder rlhf_{dim}; --arch "
                    "minimind3: summed, beta 0.15, + the MoE aux loss, run folder dpo_{dim}. "
                    "--batch_size counts pairs. metrics.jsonl logs loss, dpo_loss, aux, "
                    "chosen_reward, rejected_reward, reward_margin and reward_accuracy every "
                    "--log_interval batches. Exact reference runs: --recipe minimind2, or "
                    "--arch minimind3 --recipe minimind3.")
    add_post_training_args(parser, STAGE)
    parser.add_argument("--beta", type=float, default=None,
                        help="DPO temperature (default: 0.1, MiniMind2's hard-coded value; "
                             "--arch minimind3: 0.15, its --beta)")
    parser.set_defaults(func=run_command)
