"""PPO golden parity: `minimind-jax ppo` replays the rollouts and PPO minibatch orders of
minimind-3's own train_ppo.py runs (tests/fixtures/rl/m3_ppo*.npz, made by
tests/golden_makers/make_ppo_goldens.py from the unmodified script; commands in meta/command)
and computes everything else itself: prompts, rewards, old and reference log-probs, the
critic's values, GAE, whitening, every minibatch's losses and early-stop decision, the
accumulation windows and flushes, both AdamWs and their schedules. The critic's value head
starts from the script's (drawn from torch's global RNG: `--value_head_from`).

Compared: the console lines; per minibatch the loss the script back-propagated, the policy
and value losses, approx_kl, clipfrac, kl_ref and the early-stop flag; per optimizer step the
pre-clip gradient norms of both models and the LRs; per rollout the logged means; the final
actor (its float16 .pth and float32 sums of squares) and critic (float32 sums of squares, the
value head). fp32 on CPU.
"""

import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from minimind_jax.model import run_checkpoint, weights
from minimind_jax.model.config import ModelConfig, arch_defaults
from minimind_jax.train import optim
from minimind_jax.train.stages import ppo
from tests.helpers import FIXTURES, assert_within, max_abs_diff, max_rel_diff, metrics, run_command
from tests.test_dpo_golden import assert_reference_lines
from tests.test_grpo_golden import RL, _layout, float16_ulps

CASES = ["m3_ppo", "m3_ppo_moe_acc3"]
MINIBATCH = ("policy_loss", "value_loss", "approx_kl", "clipfrac", "kl_ref")
LOGGED = {"reward": "log/reward_val", "kl_ref": "log/kl_ref_val",
          "approx_kl": "log/approx_kl_val", "clipfrac": "log/clipfrac_val",
          "critic_loss": "log/critic_loss_val", "avg_response_len": "log/avg_len_val"}
# About 3x the largest figure measured over the two cases (CPU, float32): minibatch loss
# 2.8e-5 and its parts 5.4e-5, logged means 5.2e-5, grad norms 8.6e-5 of the largest (m3_ppo,
# lr 1e-3); weights' sums of squares 1.6e-5 relative (the MoE critic); value head 8.6e-8; the
# float16 actor file 8 float16 steps (m3_ppo). Not float noise of the forward or backward: the
# first minibatch's gradients agree per element within 2.4e-7, but AdamW's first step is
# g / (|g| + 1e-8), so elements whose clipped gradient is ~1e-8 move by up to lr times a
# fraction that float32 noise decides (8.7e-6 after one critic update at lr 1e-3); torch's own
# clip_grad_norm_ is 5.1e-5 off the float64 norm of its gradients (2.40999985 for 2.41012368).
BOUND = dict(loss=8e-5, parts=1.6e-4, logged=1.6e-4, grad_norm=2.6e-4, weights=5e-5,
             value_head=3e-7, ulps=24.0, gradient=7e-7)


def _recording(monkeypatch) -> dict:
    """Our minibatch metrics and per-update pre-clip norms, recorded as the step makes them."""
    seen = {"minibatch": [], "norms": []}
    make_minibatch, make_apply = ppo.minibatch_fn, ppo.apply_fn

    def minibatch_fn(*args):
        grads_of = make_minibatch(*args)

        def recorded(params, mb, stopped):
            grads, metrics_ = grads_of(params, mb, stopped)
            seen["minibatch"].append(jax.device_get(metrics_))
            return grads, metrics_

        return recorded

    def apply_fn(*args):
        apply = make_apply(*args)

        def recorded(params, opt_state, grads, lr_actor, lr_critic):
            params, opt_state, ok = apply(params, opt_state, grads, lr_actor, lr_critic)
            seen["norms"].append((float(optim.last_grad_norm(opt_state.actor)),
                                  float(optim.last_grad_norm(opt_state.critic)),
                                  float(lr_actor), float(lr_critic)))
            return params, opt_state, ok

        return recorded

    monkeypatch.setattr(ppo, "minibatch_fn", minibatch_fn)
    monkeypatch.setattr(ppo, "apply_fn", apply_fn)
    return seen


def saved_params(run_dir: pathlib.Path, like=None):
    """The params tree of a run folder's newest checkpoint, as saved (numpy); with `like`, a
    params tree of its shapes, restored onto this process's first device (a checkpoint saved
    on more devices than this process has)."""
    root = run_dir / "checkpoints"
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = None if like is None else jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=device), like)
    with run_checkpoint.reader(root) as manager:
        step = manager.latest_step()
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target)))["params"]
        meta = run_checkpoint.restore_meta(manager, step)
    return jax.tree.map(np.asarray, restored), ModelConfig.from_dict(meta["model_config"])


def _stats_diff(ours: dict, golden, prefix: str) -> float:
    return max(max_rel_diff(np.square(np.asarray(ours[key.removeprefix(prefix)], np.float64))
                            .sum(), golden[key][1])
               for key in golden.files if key.startswith(prefix))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_ppo_replays_the_reference(tmp_path, monkeypatch, case):
    golden = np.load(RL / f"{case}.npz")
    seen = _recording(monkeypatch)
    monkeypatch.chdir(_layout(tmp_path, golden))
    argv = ["ppo", *map(str, golden["meta/argv"][1:]), "--recipe", "minimind3", "--replay",
            RL / f"{case}.npz", "--value_head_from", RL / f"{case}.npz"]
    assert_reference_lines(run_command(argv), golden)
    run_dir = tmp_path / str(golden["meta/saved_file"][0]).removesuffix(".pth")

    mb = {k: np.array([float(m[k]) for m in seen["minibatch"]]) for k in (*MINIBATCH, "loss")}
    assert [bool(m["stop"]) for m in seen["minibatch"]] == golden["mb/stop"].tolist()
    assert_within(f"{case} minibatch loss", max_abs_diff(mb["loss"], golden["mb/loss_backward"]),
                  BOUND["loss"])
    assert_within(f"{case} minibatch policy/value loss, approx_kl, clipfrac, kl_ref", max(
        max_abs_diff(mb[k], golden[f"mb/{k}"]) for k in MINIBATCH), BOUND["parts"])

    norms = np.array(seen["norms"])
    assert len(norms) == int(golden["n_opt"])
    np.testing.assert_allclose(norms[:, 2:], np.stack([golden["opt/actor_lr_used"],
                                                       golden["opt/critic_lr_used"]], 1),
                               rtol=1e-6)
    # relative to the largest norm: a stopped minibatch's update has norm 0 on both sides
    assert_within(f"{case} pre-clip grad norms (actor, critic; relative to the largest)", max(
        max_abs_diff(norms[:, i], golden[key]) / float(np.max(golden[key]))
        for i, key in enumerate(("clip/actor_norm", "clip/critic_norm"))), BOUND["grad_norm"])

    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(int(golden["n_micro"])))
    assert_within(f"{case} logged means", max(
        max_abs_diff([r[ours] for r in records], golden[theirs])
        for ours, theirs in LOGGED.items()), BOUND["logged"])
    np.testing.assert_allclose([r["actor_lr"] for r in records], golden["log/actor_lr"],
                               rtol=1e-6)

    params, config = saved_params(run_dir)
    actor = weights.state_dict_from_params(params["actor"], config)
    critic = weights.state_dict_from_params(params["critic"]["backbone"], config)
    head = params["critic"]["value_head"]
    critic["value_head.weight"], critic["value_head.bias"] = head["kernel"].T, head["bias"]
    assert_within(f"{case} final actor's sums of squares (relative)",
                  _stats_diff(actor, golden, "final_fp32_stats/"), BOUND["weights"])
    assert_within(f"{case} final critic's sums of squares (relative)",
                  _stats_diff(critic, golden, "critic_final_fp32_stats/"), BOUND["weights"])
    assert_within(f"{case} final value head", max(
        max_abs_diff(critic["value_head.weight"], golden["critic_final/value_head.weight"]),
        max_abs_diff(critic["value_head.bias"], golden["critic_final/value_head.bias"])),
        BOUND["value_head"])
    saved = weights.load_state_dict(run_dir / str(golden["meta/saved_file"][0]).split("/")[-1])
    assert {str(v.dtype) for v in saved.values()} == {"float32"}  # read back from float16
    assert_within(f"{case} final actor file, in float16 ulps", float16_ulps(saved, golden),
                  BOUND["ulps"])


def _first_minibatch(golden) -> dict:
    """The first minibatch of the golden's first rollout step, as the step gives it."""
    row = int(golden["mb0/inds"][0])
    ids = golden["micro0/output_ids"][row:row + 1].astype(np.int32)
    P = golden["micro0/prompt_ids"].shape[1]
    batch = {"input_ids": ids, "segment_ids": (ids != 0).astype(np.int32),
             "logp_pos": (P - 1 + np.arange(ids.shape[1] - P, dtype=np.int32))[None]}
    for ours, theirs in (("old_logps", "rollout_logps"), ("completion_mask", "policy_mask"),
                         ("ref_logps", "ref_logps"), ("advantages", "advantages"),
                         ("returns", "returns"), ("old_values", "old_values")):
        batch[ours] = golden[f"micro0/{theirs}"][row:row + 1].astype(np.float32)
    return batch


def _reference_gradients(golden, batch, base: dict, options: ppo.PpoOptions) -> dict:
    """train_ppo.py's first minibatch loss, back-propagated through the reference's own model
    code (tests/fixtures/minimind3_model) as its actor and its CriticModel (the backbone, the
    final norm once more, the value head): {"actor": {key: grad}, "critic": {key: grad}}."""
    import torch

    from tests.test_rl_sampler import reference_model

    def model():
        made = reference_model(hidden_size=64, num_hidden_layers=2).train()
        made.load_state_dict({k: torch.from_numpy(v) for k, v in base.items()}, strict=False)
        return made

    actor, critic = model(), model()
    head = torch.nn.Linear(64, 1)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(golden["critic_init/value_head.weight"]))
        head.bias.copy_(torch.from_numpy(golden["critic_init/value_head.bias"]))
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    ids, mask, pos = t["input_ids"].long(), t["segment_ids"].long(), t["logp_pos"].long()
    values = head(critic.model.norm(critic.model(input_ids=ids, attention_mask=mask)[0]))
    values = values.squeeze(-1).gather(1, pos)
    logits = actor(input_ids=ids, attention_mask=mask).logits[:, :-1]
    logp = torch.log_softmax(logits, -1).gather(2, ids[:, 1:, None])[..., 0].gather(1, pos)
    m, adv, eps = t["completion_mask"], t["advantages"], options.clip_epsilon
    ratio = torch.exp(logp - t["old_logps"])
    delta = t["ref_logps"] - logp
    kl_ref = ((torch.exp(delta) - delta - 1) * m).sum() / m.sum()
    policy = ((torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - eps, 1 + eps)) * m).sum()
              / m.sum() + options.kl_coef * kl_ref)
    old, ret, c = t["old_values"], t["returns"], options.cliprange_value
    value = 0.5 * (torch.max((values - ret) ** 2, (torch.clamp(values, old - c, old + c) - ret)
                             ** 2) * m).sum() / m.sum()
    (policy + options.vf_coef * value).backward()
    grads = {name: {k: p.grad.numpy().copy() for k, p in made.named_parameters()
                    if p.grad is not None}
             for name, made in (("actor", actor), ("critic", critic))}
    grads["critic"]["value_head.weight"] = head.weight.grad.numpy().copy()
    grads["critic"]["value_head.bias"] = head.bias.grad.numpy().copy()
    # this recomputation is the script's run: its values and clip norms, bit for bit
    assert np.array_equal(values.detach().numpy(), golden["mb0/values"])
    norms = [float(torch.nn.utils.clip_grad_norm_(params, 1.0))
             for params in (list(actor.parameters()),
                            [*critic.parameters(), *head.parameters()])]
    assert norms == [golden["clip/actor_norm"][0], golden["clip/critic_norm"][0]]
    return grads


def test_the_first_minibatch_gradients_are_the_scripts():
    """Every gradient element of both models after the golden's first minibatch, against the
    reference's model code running the script's losses (which reproduces the script's
    recorded values and clip norms bit for bit): the comparison AdamW's amplification of
    near-zero gradients hides from the per-step figures above."""
    pytest.importorskip("torch")
    golden = np.load(RL / "m3_ppo.npz")
    base_file = np.load(FIXTURES / "post" / "weights_m3_dense64.npz")
    base = {k: base_file[k].astype(np.float32) for k in base_file.files
            if not k.startswith("meta/")}
    options = ppo.PpoOptions(early_stop_kl=0.0015)
    config = arch_defaults("minimind3").replace(dim=64, n_layers=2, vocab_size=6400,
                                                dtype="float32")
    lm = weights.params_from_state_dict(base, config)
    head = {"kernel": golden["critic_init/value_head.weight"].T,
            "bias": golden["critic_init/value_head.bias"]}
    batch = _first_minibatch(golden)
    grads, _ = ppo.minibatch_fn(config, options, 1)(ppo.actor_and_critic(lm, head), batch,
                                                    np.asarray(False))
    ours = {"actor": weights.state_dict_from_params(grads["actor"], config),
            "critic": weights.state_dict_from_params(grads["critic"]["backbone"], config)}
    value_head = grads["critic"]["value_head"]
    ours["critic"]["value_head.weight"] = np.asarray(value_head["kernel"]).T
    ours["critic"]["value_head.bias"] = np.asarray(value_head["bias"])
    theirs = _reference_gradients(golden, batch, base, options)
    for model in ("actor", "critic"):
        assert_within(f"first minibatch's {model} gradients, per element", max(
            max_abs_diff(ours[model][key], grad) for key, grad in theirs[model].items()),
            BOUND["gradient"])
