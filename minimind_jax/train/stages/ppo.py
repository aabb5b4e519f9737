"""PPO (`minimind-jax ppo`): minimind-3's trainer/train_ppo.py (d65ef2c, shared/SPEC_RL.md 3),
an actor and a critic trained together on the one training path.

The train state's params are `{"actor": LM, "critic": {"backbone": LM, "value_head":
{"kernel" [D, 1], "bias" [1]}}}`; both start from the stage's start weights (the critic's
value head from `--value_head_from`, else torch's nn.Linear init U(+-1/sqrt(D)), seeded), and a
frozen copy of the start weights is the reference model. Each batch of B prompts is one
rollout step:

1. `produce`: one completion per prompt (the right-truncated, left-padded prompt; rollout
   engines as GRPO's), rule + reward-model rewards r_n, the old per-token log-probs, the
   completion mask m (up to and including the first EOS; L_n its length), and the minibatch
   orders of the PPO epochs.
2. The step: the critic's old values V (its backbone's final-normed hidden states normed again
   by the same norm, as the script's critic, then the value head) and the reference's log-probs;
   r_n at token L_n - 1; GAE over the whole width (gamma, lambda; V after the end is 0);
   returns = A + V; A whitened over the batch's masked tokens (no Bessel correction). Then for
   each PPO epoch (until early stop) and each minibatch of its order:

       ratio = exp(logp - old);  approx_kl = mean_m(0.5 (logp - old)^2)
       policy = mean_m(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))) + kl_coef k3(ref, logp)
       value = 0.5 mean_m(max((V' - R)^2, (clip(V', V - c, V + c) - R)^2))
       loss = (policy + vf_coef value + aux) / acc, times 0 once approx_kl > early_stop_kl

   and every `accumulation_steps` minibatches (counted over the data epoch), and at the end of a
   rollout step with a partial window, both models are clipped and take an AdamW step with
   their own CosineAnnealingLR (eta_min lr/10, over the script's count of optimizer steps).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from minimind_jax.data.prompts import PromptSource
from minimind_jax.errors import UserError
from minimind_jax.model.config import ModelConfig
from minimind_jax.train import log_lines, optim
from minimind_jax.train import rewards as reward_rules
from minimind_jax.train.stages import rl
from minimind_jax.train.stages.stage import (
    Objective,
    Stage,
    StageContext,
    start_params,
    weights_file_at_end,
)

WHITEN_EPS = 1e-8
# what a PPO step places on the device of a host batch
ROW_KEYS = ("input_ids", "segment_ids", "logp_pos", "old_logps", "rewards", "completion_mask")


@dataclasses.dataclass(frozen=True)
class PpoOptions:
    critic_learning_rate: float = 5e-7
    clip_epsilon: float = 0.2
    vf_coef: float = 0.5
    kl_coef: float = 0.02
    gamma: float = 1.0
    lam: float = 0.95
    cliprange_value: float = 0.2
    ppo_update_iters: int = 2
    early_stop_kl: float = 0.25
    mini_batch_size: int = 2
    max_gen_len: int = 1024
    thinking_ratio: float = 0.9
    reward_model_path: str | None = rl.DEFAULT_REWARD_MODEL
    rollout_engine: str = "torch"
    replay: str | None = None  # a golden file's rollouts and minibatch orders (exact runs)
    value_head_from: str | None = None  # an .npz with the critic's initial value head


def check_options(options: PpoOptions, model: ModelConfig) -> None:
    """One clear error per bad setting, before anything is created."""
    rl.check_rollout_options(options, model)
    for name in ("ppo_update_iters", "mini_batch_size"):
        if getattr(options, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(options, name)}")
    for name in ("critic_learning_rate", "clip_epsilon", "vf_coef", "kl_coef", "gamma", "lam",
                 "cliprange_value", "early_stop_kl"):
        value = getattr(options, name)
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"--{name} must be a finite number >= 0, got {value}")
    if jax.process_count() > 1:
        raise UserError("ppo runs in one process (its minibatch loop is driven from the host); "
                        "start it without jax.distributed")


class PpoOptState(NamedTuple):
    actor: Any  # clip + AdamW state (optim.make_inner_optimizer) of the actor
    critic: Any  # ... of the critic
    micro: jax.Array  # minibatches since the data epoch began (the script's grad_accum_step)


@dataclasses.dataclass(frozen=True)
class PpoOptimizer:
    """The train state's optimizer: one clip + AdamW per model (`init` only; the PPO step
    applies them)."""

    inner: Any

    def init(self, params) -> PpoOptState:
        return PpoOptState(self.inner.init(params["actor"]), self.inner.init(params["critic"]),
                           jnp.zeros((), jnp.int32))


def _adam_state(chain_state) -> optax.ScaleByAdamState:
    return next(s for s in chain_state if isinstance(s, optax.ScaleByAdamState))


def _final_norm(config: ModelConfig):
    from minimind_jax.model.transformer import RMSNorm

    return RMSNorm(config.norm_eps, config.dtype, config.param_dtype, config.norm_weight_fp32)


def critic_values(model, config: ModelConfig, critic, ids_NL, segment_NL, pos_NR):
    """The critic's values at the completion's positions [N, R] (float32): the backbone's
    final-normed hidden states normed once more by the same norm, then the value head."""
    h_NLD, _ = model.apply({"params": critic["backbone"]}, ids_NL, segment_ids=segment_NL,
                           hidden=True)
    h_NLD = _final_norm(config).apply({"params": critic["backbone"]["norm"]}, h_NLD)
    head = critic["value_head"]
    values_NL = (jnp.dot(h_NLD.astype(jnp.float32), head["kernel"].astype(jnp.float32))[..., 0]
                 + head["bias"].astype(jnp.float32)[0])
    return jnp.take_along_axis(values_NL, pos_NR, axis=1)


def gae(token_rewards_NR, values_NR, gamma: float, lam: float):
    """Generalised advantage estimates over the whole width (the value after the last column
    is 0), as the script's reversed loop in float32."""
    gamma32, gamma_lam = jnp.float32(gamma), jnp.float32(gamma * lam)
    next_values_NR = jnp.concatenate([values_NR[:, 1:], jnp.zeros_like(values_NR[:, :1])], 1)
    deltas_NR = token_rewards_NR + gamma32 * next_values_NR - values_NR

    def back(last_N, delta_N):
        last_N = delta_N + gamma_lam * last_N
        return last_N, last_N

    _, advantages_RN = jax.lax.scan(back, jnp.zeros_like(deltas_NR[:, 0]), deltas_NR.T,
                                    reverse=True)
    return advantages_RN.T


def whiten(advantages_NR, mask_NR):
    """(A - mean) / sqrt(var + 1e-8) over the masked tokens of the whole batch, masked."""
    count = jnp.maximum(mask_NR.sum(), 1)
    mean = (advantages_NR * mask_NR).sum() / count
    var = ((advantages_NR - mean) ** 2 * mask_NR).sum() / count
    return (advantages_NR - mean) * jax.lax.rsqrt(var + WHITEN_EPS) * mask_NR


def _masked_mean(x_NR, mask_NR):
    return (x_NR * mask_NR).sum() / jnp.maximum(mask_NR.sum(), 1)


def _whole(mesh):
    """(tree) -> the tree gathered whole on every device of `mesh` inside a jitted function
    (train_step.gathered: --fsdp's all-gathers); as it is without a mesh."""
    if mesh is None:
        return lambda tree: tree
    from minimind_jax.train.train_step import gathered

    return functools.partial(gathered, mesh=mesh)


def prepare_fn(config: ModelConfig, options: PpoOptions, mesh=None):
    """(critic, reference, rows) -> old values, reference log-probs, advantages, returns;
    the models gathered whole on `mesh`'s devices (--fsdp)."""
    from minimind_jax.model.transformer import MiniMind

    model = MiniMind(config)
    whole = _whole(mesh)

    def prepare(critic, reference, rows):
        critic, reference = whole((critic, reference))
        mask = rows["completion_mask"]
        ids, seg, pos = rows["input_ids"], rows["segment_ids"], rows["logp_pos"]
        old_values = critic_values(model, config, critic, ids, seg, pos) * mask
        ref_logps = rl.completion_logps(model, reference, ids, seg, pos)[0]
        lengths = mask.sum(axis=1).astype(jnp.int32)
        N = ids.shape[0]
        token_rewards = jnp.zeros_like(old_values).at[jnp.arange(N), lengths - 1].add(
            rows["rewards"])
        advantages = gae(token_rewards, old_values, options.gamma, options.lam)
        return {"old_values": old_values, "ref_logps": ref_logps,
                "advantages": whiten(advantages, mask), "returns": advantages + old_values}

    return jax.jit(prepare)


def minibatch_fn(config: ModelConfig, options: PpoOptions, accumulation_steps: int, mesh=None,
                 params_layout=None):
    """(params, minibatch, stopped) -> (gradients, metrics): one minibatch's loss (zero once
    early stop fired, this minibatch's check included) and its gradients for both models.
    With a `mesh`, the params are gathered whole on its devices (--fsdp) and the gradients
    come back laid out as `params_layout` (the train state's params)."""
    from minimind_jax.model.transformer import MiniMind

    model = MiniMind(config)
    eps, value_clip = options.clip_epsilon, options.cliprange_value
    whole = _whole(mesh)

    def loss_fn(params, mb, stopped):
        params = whole(params)
        ids, seg, pos, mask = mb["input_ids"], mb["segment_ids"], mb["logp_pos"], mb[
            "completion_mask"]
        values = critic_values(model, config, params["critic"], ids, seg, pos)
        logp, aux = rl.completion_logps(model, params["actor"], ids, seg, pos)
        log_ratio = logp - mb["old_logps"]
        approx_kl = _masked_mean(0.5 * log_ratio ** 2, mask)
        stop = stopped | (jax.lax.stop_gradient(approx_kl) > options.early_stop_kl)
        ratio = jnp.exp(log_ratio)
        clipfrac = _masked_mean((jnp.abs(ratio - 1.0) > eps).astype(jnp.float32), mask)
        delta = mb["ref_logps"] - logp
        kl_ref = _masked_mean(jnp.exp(delta) - delta - 1.0, mask)
        adv = mb["advantages"]
        policy = (_masked_mean(jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1 - eps, 1 + eps)),
                               mask) + options.kl_coef * kl_ref)
        old_values, returns = mb["old_values"], mb["returns"]
        clipped = jnp.clip(values, old_values - value_clip, old_values + value_clip)
        value = 0.5 * _masked_mean(jnp.maximum((values - returns) ** 2,
                                               (clipped - returns) ** 2), mask)
        total = policy + options.vf_coef * value + aux
        loss = jnp.where(stop, total * 0.0, total / accumulation_steps)
        return loss, {"loss": loss, "policy_loss": policy, "value_loss": value,
                      "approx_kl": approx_kl, "clipfrac": clipfrac, "kl_ref": kl_ref,
                      "aux": aux, "stop": stop}

    def grads_of(params, mb, stopped):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb, stopped)
        return grads, metrics

    layout = None if params_layout is None else (params_layout, None)  # metrics: jit's choice
    return jax.jit(grads_of, out_shardings=layout)


def apply_fn(inner, shardings=None):
    """(params, opt state, summed gradients, actor lr, critic lr) -> (params, opt state, ok):
    each model clipped and stepped by its AdamW; nothing changes when anything is non-finite.
    With `shardings` (the train state's), params and optimizer state keep their layout (--fsdp:
    each device updates its shards)."""
    from minimind_jax.train.train_step import all_finite

    def update(params, state, grads, lr):
        updates, state = inner.update(grads, state, params, learning_rate=lr)
        return optax.apply_updates(params, updates), state

    def apply(params, opt_state: PpoOptState, grads, lr_actor, lr_critic):
        actor, actor_state = update(params["actor"], opt_state.actor, grads["actor"], lr_actor)
        critic, critic_state = update(params["critic"], opt_state.critic, grads["critic"],
                                      lr_critic)
        new = ({"actor": actor, "critic": critic},
               opt_state._replace(actor=actor_state, critic=critic_state))
        ok = all_finite((grads, new))
        keep = lambda n, o: jnp.where(ok, n, o)  # noqa: E731
        return (jax.tree.map(keep, new[0], params), jax.tree.map(keep, new[1], opt_state), ok)

    layout = None if shardings is None else (shardings.params, shardings.opt_state, None)
    return jax.jit(apply, out_shardings=layout)


def _tree_add(a, b):
    return b if a is None else jax.tree.map(jnp.add, a, b)


def make_step_fn(config, model: ModelConfig, options: PpoOptions, reference, inner,
                 total_updates: int):
    """(mesh, the train state's shardings) -> the PPO step `(state, host batch of one rollout)
    -> (state, metrics)`. The reference model is placed like the params (replicated, or with
    --fsdp sharded by the same rule); each jitted part gathers the models it reads whole, and
    gradients, params and optimizer state keep the state's layout."""
    acc = config.optim.accumulation_steps
    lr_actor, lr_critic = config.optim.learning_rate, options.critic_learning_rate

    def make(mesh, shardings):
        from minimind_jax.train.train_step import place, state_shardings

        frozen = place(reference, state_shardings(reference, mesh,
                                                  fsdp=config.distributed.fsdp))
        prepare = prepare_fn(model, options, mesh)
        grads_of = minibatch_fn(model, options, acc, mesh, shardings.params)
        apply = apply_fn(inner, shardings)

        def step(state, batch):
            rows = {k: jnp.asarray(batch[k]) for k in ROW_KEYS}
            rows.update(prepare(state.params["critic"], frozen, rows))
            B = rows["input_ids"].shape[0]
            size = max(1, min(options.mini_batch_size, B))
            params, opt_state = state.params, state.opt_state
            micro = 0 if batch["epoch_start"] else int(opt_state.micro)
            updates = int(_adam_state(opt_state.actor).count)
            # stays on the device: the host waits for it once per PPO epoch, not per minibatch
            pending, stopped, records, oks = None, jnp.asarray(False), [], []

            def update(params, opt_state, pending):
                nonlocal updates
                params, opt_state, ok = apply(
                    params, opt_state, pending,
                    jnp.float32(rl.annealed_lr(lr_actor, total_updates, updates)),
                    jnp.float32(rl.annealed_lr(lr_critic, total_updates, updates)))
                updates += 1
                oks.append(ok)
                return params, opt_state

            for epoch in range(options.ppo_update_iters):
                if bool(stopped):
                    break
                order = batch["ppo_orders"][epoch]
                if (order < 0).any():
                    raise UserError("replay: the recording stopped this step's PPO epochs "
                                    f"before epoch {epoch + 1}, this run did not (an approx_kl "
                                    "on the other side of --early_stop_kl)")
                for start in range(0, B, size):
                    picked = jnp.asarray(order[start:start + size])
                    mb = {k: v[picked] for k, v in rows.items()}
                    grads, metrics = grads_of(params, mb, stopped)
                    stopped = metrics["stop"]
                    records.append(metrics)
                    pending = _tree_add(pending, grads)
                    micro += 1
                    if micro % acc == 0:
                        params, opt_state = update(params, opt_state, pending)
                        pending = None
            if micro % acc != 0:  # the script flushes a partial window at each step's end
                params, opt_state = update(params, opt_state, pending)
            opt_state = opt_state._replace(micro=jnp.int32(micro))
            lrs = (rl.annealed_lr(lr_actor, total_updates, updates),
                   rl.annealed_lr(lr_critic, total_updates, updates))
            return _finished(state, params, opt_state, records, batch,
                             bool(jnp.all(jnp.stack(oks))), updates, lrs, options.vf_coef)

        return step

    return make


def _finished(state, params, opt_state, records, batch, ok, updates, lrs, vf_coef):
    """The next train state and the step's metrics (the script's means over minibatches);
    `lrs`: the actor's and the critic's learning rates after the step's updates."""
    skip = jnp.int32(0 if ok else 1)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              skipped=state.skipped + skip,
                              consecutive_skips=(state.consecutive_skips + 1) * skip)
    mean = {k: jnp.mean(jnp.stack([r[k] for r in records]))
            for k in ("policy_loss", "value_loss", "approx_kl", "clipfrac", "kl_ref", "aux")}
    mask = np.asarray(batch["completion_mask"])
    actor_lr, critic_lr = lrs
    parts = {"reward": jnp.mean(jnp.asarray(batch["rewards"])), "kl_ref": mean["kl_ref"],
             "approx_kl": mean["approx_kl"], "clipfrac": mean["clipfrac"],
             "critic_loss": mean["value_loss"], "policy_loss": mean["policy_loss"],
             "avg_response_len": jnp.float32(mask.sum(axis=1).mean()),
             "actor_lr": jnp.float32(actor_lr),
             "critic_lr": jnp.float32(critic_lr),
             "minibatches": jnp.float32(len(records)),
             "early_stopped": jnp.float32(bool(records[-1]["stop"]))}
    loss = mean["policy_loss"] + vf_coef * mean["value_loss"] + mean["aux"]
    return new_state, {
        "loss": loss, "aux": mean["aux"], "parts": parts, "lr_now": jnp.float32(actor_lr),
        "n_tokens": jnp.float32(mask.sum()), "n_rows": jnp.int32(mask.shape[0]),
        "update": jnp.int32(updates), "updated": jnp.asarray(True),
        "grad_norm": optim.last_grad_norm(opt_state.actor),
        "skipped": new_state.skipped, "consecutive_skips": new_state.consecutive_skips,
        "nonfinite": jnp.int32(0 if ok else 2)}


def minibatch_orders(options: PpoOptions, seed: int):
    """(rollout step, rows) -> [ppo_update_iters, rows] orders of the PPO epochs: the recorded
    ones of a replay (-1 for epochs the reference never reached), else seeded permutations."""
    if options.replay:
        recording = rl.recorded(options.replay)

        def recorded_orders(step: int, rows: int) -> np.ndarray:
            orders = np.full((options.ppo_update_iters, rows), -1, np.int64)
            for epoch in range(int(recording[f"micro{step}/n_ppo_epochs_run"])):
                orders[epoch] = recording[f"micro{step}/ppo_perm{epoch}"]
            return orders

        return recorded_orders

    def seeded_orders(step: int, rows: int) -> np.ndarray:
        rng = np.random.default_rng([seed, step])
        return np.stack([rng.permutation(rows) for _ in range(options.ppo_update_iters)])

    return seeded_orders


def make_producer(context: StageContext, engine, reward_model, options: PpoOptions):
    """(state, host batch of prompts, info) -> one rollout step's batch (module docstring)."""
    old_logps = rl.old_logps_fn(context.model)
    tokenizer = context.tokenizer
    orders = minibatch_orders(options, context.config.seed)

    def produce(state, batch: dict, info: dict) -> dict:
        real = batch["attention_mask"].any(axis=1)  # the loader's padding rows are empty
        prompt_ids, mask = batch["input_ids"][real], batch["attention_mask"][real]
        actor = state.params["actor"]
        result = engine.rollout(actor, prompt_ids, mask, 1, options.max_gen_len, info["step"])
        rewards = reward_rules.completion_rewards(batch["prompt_text"][real],
                                                  result.completions, 1, reward_model)
        rows = rl.rollout_rows(result, tokenizer.pad_id)
        old = np.asarray(old_logps(actor, rows["input_ids"], rows["segment_ids"],
                                   rows["logp_pos"]))
        done = rl.completion_mask(result.completion_ids, tokenizer.eos_id)
        return {**rows, "old_logps": old, "rewards": rewards, "completion_mask": done,
                "loss_mask": done, "ppo_orders": orders(info["step"], len(rows["input_ids"])),
                "epoch_start": info["batch"] == 0}

    return produce


def initial_value_head(options: PpoOptions, model: ModelConfig, seed: int):
    """The critic's value head: `--value_head_from` (`value_head.weight` [1, D] and
    `value_head.bias` [1], optionally under `critic_init/`: the reference's own, which its
    script draws from torch's global RNG), else U(+-1/sqrt(D)) as torch's nn.Linear."""
    D = model.dim
    if options.value_head_from:
        try:
            saved = np.load(options.value_head_from)
        except (OSError, ValueError) as err:
            raise UserError(f"--value_head_from {options.value_head_from}: cannot read it "
                            f"({err})") from None
        for prefix in ("critic_init/", ""):
            if f"{prefix}value_head.weight" in saved.files:
                weight = np.asarray(saved[f"{prefix}value_head.weight"], np.float32)
                bias = np.asarray(saved[f"{prefix}value_head.bias"], np.float32)
                break
        else:
            raise UserError(f"--value_head_from {options.value_head_from}: no "
                            "value_head.weight / value_head.bias in it")
        if weight.shape != (1, D) or bias.shape != (1,):
            raise UserError(f"--value_head_from {options.value_head_from}: value_head.weight "
                            f"{weight.shape} / bias {bias.shape}, expected (1, {D}) / (1,)")
        return {"kernel": jnp.asarray(weight.T), "bias": jnp.asarray(bias)}
    bound = 1.0 / math.sqrt(D)
    k_weight, k_bias = jax.random.split(jax.random.PRNGKey(seed))
    return {"kernel": jax.random.uniform(k_weight, (D, 1), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(k_bias, (1,), jnp.float32, -bound, bound)}


def actor_and_critic(lm_params, value_head) -> dict:
    return {"actor": lm_params,
            "critic": {"backbone": jax.tree.map(jnp.array, lm_params), "value_head": value_head}}


def initial_params(config, stage: Stage, source, model: ModelConfig, warn):
    """The actor and the critic's backbone both from the start weights; the value head."""
    params, origin = start_params(config, stage, source, model, warn)
    head = initial_value_head(stage.options, model, config.seed)
    where = stage.options.value_head_from or f"U(+-1/sqrt({model.dim})), seed {config.seed}"
    return actor_and_critic(params, head), f"{origin}; critic value head: {where}"


def make_objective(context: StageContext) -> Objective:
    config, model, options = context.config, context.model, context.options
    check_options(options, model)
    rows = PromptSource(config.data.data_path, context.tokenizer, model.max_seq_len,
                        seed=config.seed, thinking_ratio=options.thinking_ratio,
                        skip_bad_lines=config.data.skip_bad_lines, truncation="right")
    reward_model = reward_rules.reward_model(options.reward_model_path)
    start, origin = context.start()
    batches = math.ceil(len(rows) / config.data.batch_size)
    per_rollout = math.ceil(config.data.batch_size / options.mini_batch_size)
    total_updates = math.ceil(batches * config.optim.epochs * options.ppo_update_iters
                              * per_rollout / config.optim.accumulation_steps)
    inner = optim.make_inner_optimizer(grad_clip=config.optim.grad_clip,
                                       weight_decay=config.optim.weight_decay)

    def params_like():
        from minimind_jax.model.transformer import init_params

        return actor_and_critic(init_params(model, jax.random.PRNGKey(0)),
                                initial_value_head(dataclasses.replace(
                                    options, value_head_from=None), model, 0))

    return Objective(
        frozen=start["actor"], rows=rows,
        produce=make_producer(context, rl.engine(context, options), reward_model, options),
        line=log_lines.minimind3_ppo_line, params_like=params_like,
        optimizer=PpoOptimizer(inner),
        make_step=make_step_fn(config, model, options, start["actor"], inner, total_updates),
        notes=(f"ppo: {len(rows):,} prompts, one completion of up to {options.max_gen_len} "
               f"tokens each; {options.ppo_update_iters} PPO epoch(s) of minibatches of "
               f"{options.mini_batch_size}, {total_updates} optimizer steps planned; critic lr "
               f"{options.critic_learning_rate}; reference model (frozen) and critic: "
               f"{origin}; reward model: {options.reward_model_path or 'none'}",))


def add_flags(parser) -> None:
    g = parser.add_argument_group("PPO (train_ppo.py's flags)")
    defaults = PpoOptions()
    for name, what in (("critic_learning_rate", "the critic's AdamW learning rate"),
                       ("clip_epsilon", "the policy ratio's clip"),
                       ("vf_coef", "the value loss's weight"),
                       ("kl_coef", "the KL-to-reference penalty (k3)"),
                       ("gamma", "GAE's discount"), ("lam", "GAE's lambda"),
                       ("cliprange_value", "the value clip around the old values"),
                       ("early_stop_kl", "stop a step's PPO epochs once a minibatch's "
                                         "approx_kl exceeds this (its loss and the rest "
                                         "count zero)")):
        g.add_argument(f"--{name}", type=float, default=getattr(defaults, name), help=what)
    g.add_argument("--ppo_update_iters", type=int, default=defaults.ppo_update_iters,
                   help="PPO epochs over each rollout")
    g.add_argument("--mini_batch_size", type=int, default=defaults.mini_batch_size,
                   help="rows per PPO minibatch")
    g.add_argument("--value_head_from", default=None, metavar="NPZ",
                   help="the critic's initial value head (value_head.weight [1, dim], "
                        "value_head.bias [1]; a PPO golden file's critic_init/ works); default "
                        "U(+-1/sqrt(dim)) as torch's nn.Linear, seeded")
    g.add_argument("--debug_log_ratio", action="store_true", help="accepted; see metrics.jsonl")
    rl.add_rollout_flags(g, defaults)


def options_from_args(args) -> PpoOptions:
    names = ("critic_learning_rate", "clip_epsilon", "vf_coef", "kl_coef", "gamma", "lam",
             "cliprange_value", "early_stop_kl", "ppo_update_iters", "mini_batch_size",
             "value_head_from")
    return PpoOptions(**{name: getattr(args, name) for name in names},
                      **rl.rollout_options(args))


STAGE = Stage(
    name="ppo",
    summary="PPO reinforcement learning: an actor and a critic, rollouts from the current "
            "weights",
    description="minimind-3's train_ppo.py: B prompts of RLAIF JSONL (as grpo), one sampled "
                "completion each (temperature 0.8, top_k 50, top_p 0.85), rule rewards plus a "
                "reward model's score at the completion's last token, GAE advantages from a "
                "critic (the start weights plus a value head), and PPO-clip epochs over "
                "minibatches with a value loss, a KL penalty to a frozen reference copy of the "
                "start weights (default OUT_DIR/full_sft_{dim}[_moe]) and early stop. Run "
                "folder OUT_DIR/ppo_actor_{dim}[_moe] (ppo_actor_{dim}.pth float16 at the "
                "end); metrics.jsonl logs reward, kl_ref, approx_kl, clipfrac, critic_loss, "
                "avg_response_len, actor_lr, critic_lr.",
    samples="prompts",  # the objective brings its rows (data.prompts)
    data_path="../dataset/rlaif.jsonl",
    tracker_project="MiniMind-PPO",
    defaults={generation: dict(remat=True, epochs=1, batch_size=2, learning_rate=3e-7,
                               accumulation_steps=1, max_seq_len=768, run_prefix="ppo_actor",
                               recipe_lr_schedule="annealing", log_interval=1)
              for generation in ("minimind2", "minimind3")},
    start_from={"minimind2": "full_sft", "minimind3": "full_sft"},
    validates=False,
    options=PpoOptions(),
    objective=make_objective,
    initial_params=initial_params,
    add_flags=add_flags,
    options_from_args=options_from_args,
    finish=functools.partial(weights_file_at_end, params_of=lambda state: state.params["actor"]),
    finish_at_saves=True,
    lm_params_at=("actor",),
)
