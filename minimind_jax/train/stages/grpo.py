"""GRPO and CISPO (`minimind-jax grpo`): minimind-3's trainer/train_grpo.py (d65ef2c,
shared/SPEC_RL.md 2), on the one training path through the batch-producer hook.

Each step's batch is made from the current train state (`produce`): B prompts (data.prompts)
-> G completions each from a rollout engine (infer.rollout: ours, a replay of the reference's
ids, or canned texts) -> rewards (train.rewards) -> per-group advantages (r - mean) /
(std + 1e-4) (population std) -> the old per-token log-probs (a forward of the current
policy, no temperature) -> a batch of N = B * G rows. The step then takes, over each row's
completion up to and including its first EOS (mask m):

    logp, ref = the policy's and the frozen reference's per-token log-probs
    kl = exp(ref - logp) - (ref - logp) - 1,   ratio = exp(logp - old)
    cispo: l = -(stopgrad(min(ratio, eps_high)) * A * logp - beta * kl)
    grpo:  l = -(min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) - beta * kl)
    loss = mean_rows(sum_t l * m / max(sum_t m, 1)) + MoE aux

Positions are the column index (left padding is not rebased) and no query attends to
padding, as the script's masked forward.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from minimind_jax.data.prompts import PromptSource
from minimind_jax.errors import UserError
from minimind_jax.model.config import ModelConfig
from minimind_jax.train import log_lines
from minimind_jax.train import rewards as reward_rules
from minimind_jax.train.stages import rl
from minimind_jax.train.stages.rl import annealed_lr, completion_logps, completion_mask
from minimind_jax.train.stages.stage import (
    Objective,
    Stage,
    StageContext,
    weights_file_at_end,
)

LOSS_TYPES = ("cispo", "grpo")
ADV_EPS = 1e-4
__all__ = ["STAGE", "GrpoOptions", "advantages", "annealed_lr", "check_options",
           "completion_mask", "grpo_loss_fn"]


@dataclasses.dataclass(frozen=True)
class GrpoOptions:
    num_generations: int = 6
    beta: float = 0.1  # the KL penalty
    loss_type: str = "cispo"
    epsilon: float = 0.2  # GRPO's clip
    epsilon_high: float = 5.0  # CISPO's clamp
    max_gen_len: int = 1024
    thinking_ratio: float = 0.9
    reward_model_path: str | None = rl.DEFAULT_REWARD_MODEL
    rollout_engine: str = "torch"
    replay: str | None = None  # a golden file's recorded output ids (tests, exact runs)
    script: tuple[str, ...] = ()  # canned completions
    old_logp_offset: float = 0.0  # added to the old log-probs (off-policy checks)


def check_options(options: GrpoOptions, model: ModelConfig) -> None:
    """One clear error per bad setting, before anything is created."""
    rl.check_rollout_options(options, model)
    if options.loss_type not in LOSS_TYPES:
        raise UserError(f"--loss_type must be one of {', '.join(LOSS_TYPES)}")
    if options.num_generations < 2:
        raise UserError(f"--num_generations {options.num_generations}: a group of one has "
                        "zero advantage on every step (its reward minus its own mean); use 2 "
                        "or more")


def grpo_loss_fn(config: ModelConfig, options: GrpoOptions):
    """train_step's objective: (params, batch, reference params) -> (loss, metrics)."""
    from minimind_jax.model.transformer import MiniMind

    model = MiniMind(config)

    def objective(params, batch: dict, reference):
        rows = (batch["input_ids"], batch["segment_ids"], batch["logp_pos"])
        logp, aux = completion_logps(model, params, *rows)
        ref = jax.lax.stop_gradient(completion_logps(model, reference, *rows)[0])
        adv = batch["advantages"][:, None]
        mask = batch["completion_mask"]
        delta = ref - logp
        kl = jnp.exp(delta) - delta - 1
        ratio = jnp.exp(logp - batch["old_logps"])
        if options.loss_type == "cispo":
            gain = jax.lax.stop_gradient(jnp.minimum(ratio, options.epsilon_high)) * adv * logp
        else:
            clipped = jnp.clip(ratio, 1 - options.epsilon, 1 + options.epsilon)
            gain = jnp.minimum(ratio * adv, clipped * adv)
        per_token = -(gain - options.beta * kl)
        lengths = mask.sum(axis=1)
        real = batch["row_mask"]  # 0: a row that only pads N to the devices' multiple
        n = real.sum()
        mean = lambda x_N: jnp.sum(x_N * real) / n  # noqa: E731
        policy_loss = mean((per_token * mask).sum(axis=1) / jnp.maximum(lengths, 1))
        loss = policy_loss + aux
        adv_mean = mean(adv[:, 0])
        return loss, {
            "loss": loss, "aux": aux, "reward": mean(batch["rewards"]),
            "kl_ref": jnp.sum(delta * mask) / jnp.maximum(jnp.sum(mask), 1),
            "advantages_mean": adv_mean,
            "advantages_std": jnp.sqrt(jnp.sum((adv[:, 0] - adv_mean) ** 2 * real)
                                       / jnp.maximum(n - 1, 1)),
            "avg_response_len": mean(lengths),
            "ratio_max": jnp.max(jnp.where(mask > 0, ratio, 0.0)),
        }

    return objective


def advantages(rewards: np.ndarray, num_generations: int) -> np.ndarray:
    """(r - group mean) / (group population std + 1e-4), float32."""
    grouped = rewards.reshape(-1, num_generations)
    mean = grouped.mean(axis=1, dtype=np.float32)
    std = grouped.std(axis=1, dtype=np.float32)
    return ((grouped - mean[:, None]) / (std[:, None] + np.float32(ADV_EPS))
            ).reshape(-1).astype(np.float32)


def make_producer(context: StageContext, engine, reward_model, options: GrpoOptions):
    """(state, host batch of prompts, info) -> the step's batch (see the module docstring)."""
    old_logps = rl.old_logps_fn(context.model)
    tokenizer = context.tokenizer
    G = options.num_generations
    longest = context.model.max_seq_len + options.max_gen_len  # prompt + completion

    def produce(state, batch: dict, info: dict) -> dict:
        real = batch["attention_mask"].any(axis=1)  # the loader's padding rows are empty
        prompt_ids, mask = batch["input_ids"][real], batch["attention_mask"][real]
        result = engine.rollout(state.params, prompt_ids, mask, G, options.max_gen_len,
                                info["step"])
        texts = batch["prompt_text"][real]
        row_rewards = reward_rules.completion_rewards(texts, result.completions, G,
                                                      reward_model)
        rows = rl.rollout_rows(result, tokenizer.pad_id)
        done = completion_mask(result.completion_ids, tokenizer.eos_id)
        if not context.model.use_moe:  # a few widths, a few programs (rl.widened)
            completion = rl.padded_width(done.shape[1], options.max_gen_len)
            rows, done = rl.widened(rows, done, completion, rl.padded_width(
                result.prompt_len + completion, longest))
        old = np.asarray(old_logps(state.params, rows["input_ids"], rows["segment_ids"],
                                   rows["logp_pos"])) + np.float32(options.old_logp_offset)
        return padded_rows({**rows, "old_logps": old,
                            "advantages": advantages(row_rewards, G), "rewards": row_rewards,
                            "completion_mask": done, "loss_mask": done,
                            "row_mask": np.ones(len(done), np.float32)},
                           jax.local_device_count())

    return produce


def padded_rows(batch: dict, multiple: int) -> dict:
    """`batch` with rows of zeros (no tokens, no mask, `row_mask` 0) up to a multiple of
    `multiple` rows (the devices the batch is split over); positions repeat the last row's."""
    n = len(batch["row_mask"])
    extra = -n % multiple
    if not extra:
        return batch
    return {k: np.concatenate([v, np.repeat(v[-1:], extra, 0) if k == "logp_pos"
                               else np.zeros((extra, *v.shape[1:]), v.dtype)])
            for k, v in batch.items()}


def make_objective(context: StageContext) -> Objective:
    config, model, options = context.config, context.model, context.options
    check_options(options, model)
    rows = PromptSource(config.data.data_path, context.tokenizer, model.max_seq_len,
                        seed=config.seed, thinking_ratio=options.thinking_ratio,
                        skip_bad_lines=config.data.skip_bad_lines)
    reward_model = reward_rules.reward_model(options.reward_model_path)
    reference, origin = context.start()
    batches = math.ceil(len(rows) / config.data.batch_size)
    total_updates = math.ceil(batches / config.optim.accumulation_steps) * config.optim.epochs
    return Objective(
        loss=grpo_loss_fn(model, options), frozen=reference, rows=rows,
        produce=make_producer(context, rl.engine(context, options, options.script),
                              reward_model, options),
        line=log_lines.minimind3_grpo_line(
            lambda updates: annealed_lr(config.optim.learning_rate, total_updates, updates)),
        notes=(f"grpo: {len(rows):,} prompts x {options.num_generations} generations of up to "
               f"{options.max_gen_len} tokens; loss {options.loss_type}, beta {options.beta}; "
               f"reference model (frozen): {origin}; reward model: "
               f"{options.reward_model_path or 'none'}",))


def add_flags(parser) -> None:
    g = parser.add_argument_group("GRPO / CISPO (train_grpo.py's flags)")
    defaults = GrpoOptions()
    g.add_argument("--num_generations", type=int, default=defaults.num_generations,
                   help="completions per prompt (a group)")
    g.add_argument("--beta", type=float, default=defaults.beta, help="KL penalty")
    g.add_argument("--loss_type", choices=LOSS_TYPES, default=defaults.loss_type,
                   help="cispo: clamped, stop-gradient ratio times A * logp; grpo: PPO's "
                        "clipped surrogate")
    g.add_argument("--epsilon", type=float, default=defaults.epsilon, help="GRPO's clip")
    g.add_argument("--epsilon_high", type=float, default=defaults.epsilon_high,
                   help="CISPO's clamp of the ratio")
    g.add_argument("--old_logp_offset", type=float, default=0.0,
                   help="added to the old log-probs (checks the clip and clamp; keep 0)")
    rl.add_rollout_flags(g, defaults)


def options_from_args(args) -> GrpoOptions:
    return GrpoOptions(num_generations=args.num_generations, beta=args.beta,
                       loss_type=args.loss_type, epsilon=args.epsilon,
                       epsilon_high=args.epsilon_high, old_logp_offset=args.old_logp_offset,
                       **rl.rollout_options(args))


STAGE = Stage(
    name="grpo",
    summary="GRPO / CISPO reinforcement learning with rollouts from the current weights",
    description="minimind-3's train_grpo.py: B prompts of RLAIF JSONL "
                "({\"conversations\": [..., {\"role\": \"assistant\", \"content\": ...}]}, the "
                "last message dropped), G sampled completions each (temperature 0.8, top_k "
                "50, top_p 0.85), rule rewards plus a reward model's score, group-normalised "
                "advantages, and the CISPO (default) or GRPO loss against a frozen reference "
                "copy of the start weights (default OUT_DIR/full_sft_{dim}[_moe]). Run folder "
                "OUT_DIR/grpo_{dim}[_moe]; metrics.jsonl logs loss, reward, kl_ref, "
                "advantages_mean, advantages_std, avg_response_len.",
    samples="prompts",  # the objective brings its rows (data.prompts)
    data_path="../dataset/rlaif.jsonl",
    tracker_project="MiniMind-GRPO",
    defaults={
        "minimind2": dict(epochs=1, batch_size=2, learning_rate=3e-7, accumulation_steps=1,
                          remat=True, max_seq_len=768, run_prefix="grpo",
                          recipe_lr_schedule="annealing", log_interval=1),
        "minimind3": dict(epochs=1, batch_size=2, learning_rate=3e-7, accumulation_steps=1,
                          remat=True, max_seq_len=768, run_prefix="grpo",
                          recipe_lr_schedule="annealing", log_interval=1),
    },
    start_from={"minimind2": "full_sft", "minimind3": "full_sft"},
    validates=False,
    options=GrpoOptions(),
    objective=make_objective,
    add_flags=add_flags,
    options_from_args=options_from_args,
    finish=weights_file_at_end,
    finish_at_saves=True,
)
