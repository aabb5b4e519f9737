#!/usr/bin/env python
"""Golden numbers for PPO, produced by minimind-3's REAL trainer/train_ppo.py (d65ef2c).

The PPO twin of make_rl_goldens.py (GRPO/CISPO), built from its pieces (inputs, stub reward
model, base weights, run layout, rollout capture/replay wrapper, reward-model spy, rule-reward
tracer, meta, weights/resume arrays, the capture -> replay -> replay parent loop). Nothing here
re-implements the reference: each run executes the UNMODIFIED script with runpy
(run_name="__main__") from trainer/ of a temp copy of the checkout, in a fresh subprocess, with
these hooks (see README_rl.md, "PPO"):

  * trainer.rollout_engine.TorchRolloutEngine.rollout: capture (real sampling) / replay
    (recorded output_ids, old log-probs recomputed by the engine's compute_per_token_logps);
  * torch.randperm: the PPO minibatch permutations drawn inside ppo_train_epoch are recorded
    (capture) and fed back in order (replay; generate() is not called there, so the global RNG
    differs); the data-order randperm(len(ds)) is left alone (setup_seed(42+epoch) fixes it);
  * torch.Tensor.backward -> per minibatch: the loss scalar and ppo_train_epoch's locals
    (policy/value loss, approx_kl, clipfrac, kl_ref, aux, stop_ppo, inds, logp, values, ...);
    per rollout (first minibatch): old values, ref logps, token rewards, GAE, whitening, masks;
  * torch.nn.utils.clip_grad_norm_ -> the pre-clip total norms (actor, critic) and the LRs used;
  * LMForRewardModel.get_score, sys.settrace (calculate_rewards: rule rewards; ppo_train_epoch:
    the logged values at `del enc`), stdout tee.

Usage (one process at a time; datasets 3.6 + transformers 4.57.6, see README_rl.md):
    OMP_NUM_THREADS=1 python tests/golden_makers/make_ppo_goldens.py --ref3 /tmp/rl_ref3 \
        --out tests/fixtures/rl --python /tmp/rs_refenv/bin/python
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.dirname(__file__)))

from make_rl_goldens import (  # noqa: E402
    EMB_ROWS,
    _f,
    _line_of,
    build_layout,
    child_make_weights,
    make_get_score,
    make_rewards_tracer,
    make_rollout,
    meta_arrays,
    parse_args,
    rm_arrays,
    run_parent,
    run_traced,
    weights_arrays,
)

SCRIPT = "train_ppo.py"
COMMON_ARGV = (
    "--device cpu --dtype float32 --num_workers 0 --hidden_size 64 --num_hidden_layers 2 "
    "--max_seq_len 64 --max_gen_len 16 --save_interval 1000 --log_interval 1 --grad_clip 1.0 "
    "--epochs 1 --data_path ../dataset/rlaif.jsonl --from_weight full_sft "
    "--reward_model_path ../stub_reward_model --rollout_engine torch --save_dir ../out "
    "--save_weight ppo_actor --thinking_ratio 0.9"
)


def _case(argv, base="m3_dense64", full_final=False):
    return dict(
        argv=(COMMON_ARGV + " " + argv).split(),
        base=base,
        full_final=full_final,
        offset=0.0,
        first="capture",
    )


CASES = {
    # B 2, minibatch 1: 2 minibatches per PPO epoch, an optimizer step after each.
    # --early_stop_kl 0.0015 (default 0.25): with 0.25 (and 0.05, 0.02) the largest approx_kl
    # of this run (0.087) never / only once stops; 0.0015 stops in PPO epoch 0 of rollout 0
    # (approx_kl 0.00171: epoch 1 and its randperm are skipped), in epoch 1 of rollouts 1-3
    # and never in rollout 4; every approx_kl is >= 14% away from the threshold
    "m3_ppo": _case(
        "--use_moe 0 --batch_size 2 --mini_batch_size 1 --ppo_update_iters 2 "
        "--accumulation_steps 1 --learning_rate 1e-3 --critic_learning_rate 1e-3 "
        "--early_stop_kl 0.0015",
        full_final=True,
    ),
    # B 3, minibatch 2: minibatches of 2 and 1 rows; accumulation 3 over 4 minibatches per
    # rollout, so grad_accum_step (reset once per epoch) crosses rollouts, with flushes
    "m3_ppo_moe_acc3": _case(
        "--use_moe 1 --batch_size 3 --mini_batch_size 2 --ppo_update_iters 2 "
        "--accumulation_steps 3 --learning_rate 5e-4 --critic_learning_rate 5e-4",
        base="m3_moe64",
    ),
}
KL_COEF, VF_COEF, CLIP_EPS, CLIP_V, GAMMA, LAM = 0.02, 0.5, 0.2, 0.2, 1.0, 0.95

# ppo_train_epoch locals recorded once per rollout (at its first backward) -> micro{i}/<name>
ROLLOUT_TENSORS = {
    "old_resp_values": "old_values",
    "ref_resp_logp": "ref_logps",
    "token_rewards": "token_rewards",
    "advantages": "advantages",
    "returns": "returns",
    "resp_policy_mask": "policy_mask",
    "resp_lengths": "resp_lengths",
    "rewards": "rewards",
    "logp_pos": "logp_pos",
    "old_resp_logp": "old_logps",
}
# per-minibatch scalars (ppo_train_epoch locals at backward) -> mb/<name>
MB_SCALARS = {
    "policy_loss": "policy_loss",
    "value_loss": "value_loss",
    "approx_kl_val": "approx_kl",
    "clipfrac": "clipfrac",
    "kl_ref_penalty": "kl_ref",
    "aux_loss": "aux_loss",
}
LOG_VALUES = [
    "reward_val",
    "kl_ref_val",
    "approx_kl_val",
    "clipfrac_val",
    "critic_loss_val",
    "avg_len_val",
    "actor_lr",
    "critic_lr",
]


def child_run_case(args):
    import torch

    torch.set_num_threads(1)
    cfg = CASES[args.case]
    mode = args.mode
    acc = int(cfg["argv"][cfg["argv"].index("--accumulation_steps") + 1])
    work, root, script, fn = build_layout(args, cfg, SCRIPT)

    import trainer.rollout_engine as rollout_mod
    import trainer.trainer_utils as utils_mod

    replay = np.load(args.rollouts) if mode == "replay" else None

    rs = {"i": -1}  # rollout index (the script's step - 1)
    per = {}  # rollout index -> {name: array}
    mb = []  # one dict per minibatch (backward)
    clips = []  # one dict per clip_grad_norm_ call
    data_perms = []
    rm_rec, rule_rec, log_rec = [], [], {}
    state = {"first": None}

    def index():
        return rs["i"]

    def cur():
        return per.setdefault(rs["i"], {})

    # ---- rollout: the shared capture/replay wrapper, counted ----
    orig_rollout = rollout_mod.TorchRolloutEngine.rollout
    shared_rollout = make_rollout(rollout_mod, mode, replay, index, cur, 0.0, state, depth=2)

    def rollout(self, *a, **k):
        rs["i"] += 1
        cur()["n_ppo_epochs_run"] = np.array(0)
        return shared_rollout(self, *a, **k)

    rollout_mod.TorchRolloutEngine.rollout = rollout

    orig_get_score = utils_mod.LMForRewardModel.get_score
    utils_mod.LMForRewardModel.get_score = make_get_score(orig_get_score, rm_rec, index)

    def in_epoch(fr):
        return fr.f_code.co_name == "ppo_train_epoch" and fr.f_code.co_filename == script

    # ---- backward: per-minibatch (and per-rollout) locals of ppo_train_epoch ----
    orig_backward = torch.Tensor.backward

    def backward(self, *a, **k):
        fr = sys._getframe(1)
        if in_epoch(fr):
            L, G = fr.f_locals, fr.f_globals
            i = rs["i"]
            d = cur()
            if "advantages" not in d:
                for n, key in ROLLOUT_TENSORS.items():
                    d[key] = L[n].detach().numpy().copy()
            r = dict(
                loss_backward=_f(self),
                stop=bool(L["stop_ppo"]),
                rollout=i,
                step=int(L["step"]),
                ppo_epoch=int(L["ppo_epoch"]),
                grad_accum_step=int(L["grad_accum_step"]) + 1,  # as after `+= 1`
                inds=L["inds"].numpy().copy(),
                logp=L["mb_resp_logp"].detach().numpy().copy(),
                values=L["mb_resp_values"].detach().numpy().copy(),
                actor_lr=float(G["actor_optimizer"].param_groups[0]["lr"]),
            )
            for n, key in MB_SCALARS.items():
                r[key] = _f(L[n])
            mb.append(r)
            if state["first"] is None:
                state["first"] = {
                    n: p.detach().clone().numpy() for n, p in G["actor_model"].state_dict().items()
                }
                state["critic_first"] = {
                    n: p.detach().clone().numpy() for n, p in G["critic_model"].state_dict().items()
                }
        return orig_backward(self, *a, **k)

    torch.Tensor.backward = backward

    # ---- clip_grad_norm_: actor then critic, in the loop or in the end-of-rollout flush ----
    flush_line = _line_of(
        script, "ppo_train_epoch", "if grad_accum_step % args.accumulation_steps != 0"
    )
    orig_clip = torch.nn.utils.clip_grad_norm_

    def clip(*a, **k):
        fr = sys._getframe(1)
        n = orig_clip(*a, **k)
        if in_epoch(fr):
            G = fr.f_globals
            clips.append(
                dict(
                    norm=_f(n),
                    after_mb=len(mb),
                    rollout=rs["i"],
                    flush=fr.f_lineno > flush_line,
                    actor_lr=float(G["actor_optimizer"].param_groups[0]["lr"]),
                    critic_lr=float(G["critic_optimizer"].param_groups[0]["lr"]),
                )
            )
        return n

    torch.nn.utils.clip_grad_norm_ = clip

    # ---- randperm: PPO minibatch orders recorded (capture) / fed back (replay) ----
    orig_randperm = torch.randperm

    def randperm(*a, **k):
        fr = sys._getframe(1)
        if not in_epoch(fr):
            p = orig_randperm(*a, **k)
            data_perms.append((int(a[0]), p.numpy().copy()))
            return p
        d = cur()
        e = int(d["n_ppo_epochs_run"])
        key = f"ppo_perm{e}"
        if mode == "replay":
            assert f"micro{rs['i']}/{key}" in replay.files, f"no recorded {key} in {rs['i']}"
            p = torch.from_numpy(replay[f"micro{rs['i']}/{key}"].copy())
            assert p.numel() == int(a[0]), "randperm n differs from the recorded one"
            assert int(fr.f_locals["ppo_epoch"]) == e
        else:
            p = orig_randperm(*a, **k)
        d[key] = p.numpy().copy()
        d["n_ppo_epochs_run"] = np.array(e + 1)
        return p

    torch.randperm = randperm

    # ---- line tracer: logged values (ppo_train_epoch) and rule rewards (calculate_rewards) ----
    del_line = _line_of(script, "ppo_train_epoch", "del enc, gen_out")
    add_line = _line_of(script, "calculate_rewards", "rewards += reward_model_scores")
    rewards_tracer = make_rewards_tracer(add_line, rule_rec, index)

    def epoch_tracer(frame, event, arg):
        if event == "line" and frame.f_lineno == del_line:
            L = frame.f_locals
            log_rec[rs["i"]] = {n: float(L[n]) for n in LOG_VALUES}
        return epoch_tracer

    def undo_hooks():
        torch.Tensor.backward = orig_backward
        torch.nn.utils.clip_grad_norm_ = orig_clip
        torch.randperm = orig_randperm
        rollout_mod.TorchRolloutEngine.rollout = orig_rollout
        utils_mod.LMForRewardModel.get_score = orig_get_score

    g, tee = run_traced(script, "ppo_train_epoch", epoch_tracer, rewards_tracer, undo_hooks)

    # ---------------- collect ----------------
    n_micro = rs["i"] + 1
    if mode == "replay":
        n_rec = int(replay["n_micro"])
        assert n_micro == n_rec, f"{n_micro} rollouts, {n_rec} recorded"
        for i in range(n_micro):
            k = f"micro{i}/n_ppo_epochs_run"
            assert int(per[i]["n_ppo_epochs_run"]) == int(replay[k]), "PPO epochs run differ"
    out = {}
    meta_arrays(out, args, cfg, SCRIPT, fn)
    out["meta/wrapping"] = np.array(
        [
            "trainer.rollout_engine.TorchRolloutEngine.rollout wrapped (make_rl_goldens."
            "make_rollout): capture = the real rollout, recorded; replay = recorded output_ids, "
            "old logps recomputed with rollout_engine.compute_per_token_logps, RolloutResult "
            "built as in L73-92",
            "torch.randperm wrapped: calls from ppo_train_epoch (PPO minibatch order) recorded "
            "in capture, fed back in order in replay (asserting n); the data-order "
            "randperm(len(train_ds)) runs as is (recorded in randperm/data_order)",
            "torch.Tensor.backward wrapped (loss value + ppo_train_epoch frame locals)",
            "torch.nn.utils.clip_grad_norm_ wrapped (returned pre-clip total norm; actor then "
            "critic per optimizer step; optimizer param_groups lr at that moment)",
            "trainer.trainer_utils.LMForRewardModel.get_score wrapped (messages, response, "
            "conversation given to the reward model, raw and clipped score)",
            "sys.settrace line events in ppo_train_epoch (logged values at `del enc, ...`) and "
            "calculate_rewards (rule rewards before `rewards += reward_model_scores`)",
            "stdout tee",
            "--reward_model_path: the stub reward model folder (stub_reward_model/)",
        ]
    )
    out["log_lines"] = np.array("".join(tee.buf).splitlines())
    out["n_micro"] = np.array(n_micro)
    for i in range(n_micro):
        d = per[i]
        assert np.array_equal(d["old_logps"], d["rollout_logps"])
        for k, v in d.items():
            if k != "old_logps":
                out[f"micro{i}/{k}"] = v
    rm_arrays(out, rm_rec, rule_rec, n_micro)
    assert len(data_perms) == 1
    out["randperm/data_order"] = data_perms[0][1].astype(np.int64)

    # per minibatch
    M = len(mb)
    out["n_mb"] = np.array(M)
    for key in ["loss_backward", *MB_SCALARS.values(), "actor_lr"]:
        out[f"mb/{key}"] = np.array([r[key] for r in mb], dtype=np.float64)
    out["mb/stop"] = np.array([r["stop"] for r in mb], dtype=bool)
    for key in ("rollout", "step", "ppo_epoch", "grad_accum_step"):
        out[f"mb/{key}"] = np.array([r[key] for r in mb], dtype=np.int64)
    for j, r in enumerate(mb):
        for key in ("inds", "logp", "values"):
            out[f"mb{j}/{key}"] = r[key]

    # per optimizer step (clip calls come in pairs: actor, critic)
    assert len(clips) % 2 == 0
    act, cri = clips[0::2], clips[1::2]
    for a, c in zip(act, cri, strict=True):
        assert a["after_mb"] == c["after_mb"] and a["flush"] == c["flush"]
    out["n_opt"] = np.array(len(act))
    out["clip/actor_norm"] = np.array([c["norm"] for c in act], dtype=np.float64)
    out["clip/critic_norm"] = np.array([c["norm"] for c in cri], dtype=np.float64)
    out["clip/after_mb"] = np.array([c["after_mb"] for c in act], dtype=np.int64)
    out["clip/rollout"] = np.array([c["rollout"] for c in act], dtype=np.int64)
    out["clip/flush"] = np.array([c["flush"] for c in act], dtype=bool)
    out["opt/actor_lr_used"] = np.array([c["actor_lr"] for c in act], dtype=np.float64)
    out["opt/critic_lr_used"] = np.array([c["critic_lr"] for c in act], dtype=np.float64)

    for n in LOG_VALUES:
        out[f"log/{n}"] = np.array(
            [log_rec.get(i, {}).get(n, np.nan) for i in range(n_micro)], dtype=np.float64
        )

    # critic: initial value head (torch's default Linear init from the global RNG) and backbone
    cf = state["critic_first"]
    out["critic_init/value_head.weight"] = cf["value_head.weight"]
    out["critic_init/value_head.bias"] = cf["value_head.bias"]
    out["check/critic_start_backbone_vs_actor_start_maxabs"] = np.array(
        max(
            float(np.abs(v - state["first"][k]).max()) for k, v in cf.items() if k in state["first"]
        )
    )

    # actor weights, saved file, resume (shared with the GRPO maker)
    resume = weights_arrays(out, args, cfg, root, g["actor_model"], state["first"], "ppo_actor")
    out["resume/critic_scheduler_last_epoch"] = np.array(
        int(resume["critic_scheduler"]["last_epoch"])
    )
    out["resume/critic_scheduler_last_lr"] = np.array(
        resume["critic_scheduler"]["_last_lr"], dtype=np.float64
    )
    out["resume/critic_optimizer_step"] = np.array(
        [float(s["step"]) for s in resume["critic_optimizer"]["state"].values()][:1],
        dtype=np.float64,
    )
    critic = g["critic_model"]
    cfin = {k: v.detach() for k, v in critic.state_dict().items()}
    out["check/resume_critic_vs_inmemory_equal"] = np.array(
        all(torch.equal(resume["critic_model"][k], cfin[k]) for k in cfin)
    )
    out["critic_final/value_head.weight"] = cfin["value_head.weight"].numpy().copy()
    out["critic_final/value_head.bias"] = cfin["value_head.bias"].numpy().copy()
    for k, v in cfin.items():
        b = v.numpy().astype(np.float64)
        out[f"critic_final_fp32_stats/{k}"] = np.array([b.sum(), (b**2).sum()])
    out["critic_final_rows/model.embed_tokens.weight"] = (
        cfin["model.embed_tokens.weight"].numpy()[EMB_ROWS].copy()
    )

    # derived
    stops = sorted({r["rollout"] for r in mb if r["stop"]})
    out["derived/early_stop_rollouts"] = np.array(stops, dtype=np.int64)
    out["derived/n_mb_per_rollout"] = np.array(
        [sum(r["rollout"] == i for r in mb) for i in range(n_micro)], dtype=np.int64
    )
    out["derived/accumulation_steps"] = np.array(acc)
    for k, v in recompute(out).items():
        out[f"check/numpy_{k}_maxabs"] = np.array(v)

    np.savez_compressed(args.result, **out)
    print(
        f"[maker] {args.case} {mode}: {n_micro} rollouts, {M} minibatches, {len(act)} optimizer "
        f"steps, early stop in rollouts {stops}"
    )
    os.chdir("/")
    import shutil

    shutil.rmtree(work)


# ---------------------------------------------------------------------------------------------
# independent float64 recomputation from the recorded tensors
# ---------------------------------------------------------------------------------------------
def recompute(z):
    """max |numpy float64 - recorded| for GAE/returns/whitening and every minibatch's losses;
    z: a dict or npz of the keys above"""
    n_micro = int(z["n_micro"])
    acc = int(z["derived/accumulation_steps"])
    dif = {
        k: 0.0
        for k in (
            "token_rewards",
            "advantages",
            "returns",
            "policy_loss",
            "value_loss",
            "approx_kl",
            "clipfrac",
            "kl_ref",
            "loss_backward",
        )
    }

    def upd(k, a, b):
        dif[k] = max(dif[k], float(np.abs(np.asarray(a, np.float64) - np.asarray(b)).max()))

    for i in range(n_micro):
        p = f"micro{i}/"
        V = z[p + "old_values"].astype(np.float64)
        m = z[p + "policy_mask"].astype(np.float64)
        B, R = V.shape
        L = z[p + "resp_lengths"]
        tr = np.zeros((B, R))
        tr[np.arange(B), L - 1] += z[p + "rewards"].astype(np.float64)
        upd("token_rewards", tr, z[p + "token_rewards"])
        A = np.zeros((B, R))
        last = np.zeros(B)
        for t in reversed(range(R)):
            nv = V[:, t + 1] if t < R - 1 else 0.0
            last = tr[:, t] + GAMMA * nv - V[:, t] + GAMMA * LAM * last
            A[:, t] = last
        ret = A + V
        upd("returns", ret, z[p + "returns"])
        mu = (A * m).sum() / max(m.sum(), 1)
        var = ((A - mu) ** 2 * m).sum() / max(m.sum(), 1)
        Aw = (A - mu) / np.sqrt(var + 1e-8) * m
        upd("advantages", Aw, z[p + "advantages"])
    rol = z["mb/rollout"]
    for j in range(len(rol)):
        p = f"micro{int(rol[j])}/"
        ix = z[f"mb{j}/inds"]
        m = z[p + "policy_mask"][ix].astype(np.float64)
        old = z[p + "rollout_logps"][ix].astype(np.float64)
        ref = z[p + "ref_logps"][ix].astype(np.float64)
        A = z[p + "advantages"][ix].astype(np.float64)
        ret = z[p + "returns"][ix].astype(np.float64)
        Vold = z[p + "old_values"][ix].astype(np.float64)
        lp = z[f"mb{j}/logp"].astype(np.float64)
        V = z[f"mb{j}/values"].astype(np.float64)
        den = max(m.sum(), 1)
        lr = lp - old
        rho = np.exp(lr)
        akl = (0.5 * lr**2 * m).sum() / den
        cf = ((np.abs(rho - 1) > CLIP_EPS) * m).sum() / den
        d = ref - lp
        klr = ((np.exp(d) - d - 1) * m).sum() / den
        pl = (np.maximum(-A * rho, -A * np.clip(rho, 1 - CLIP_EPS, 1 + CLIP_EPS)) * m).sum() / den
        pl += KL_COEF * klr
        vc = np.clip(V, Vold - CLIP_V, Vold + CLIP_V)
        vl = 0.5 * (np.maximum((V - ret) ** 2, (vc - ret) ** 2) * m).sum() / den
        tot = pl + VF_COEF * vl + float(z["mb/aux_loss"][j])
        lb = 0.0 if z["mb/stop"][j] else tot / acc
        upd("approx_kl", akl, z["mb/approx_kl"][j])
        upd("clipfrac", cf, z["mb/clipfrac"][j])
        upd("kl_ref", klr, z["mb/kl_ref"][j])
        upd("policy_loss", pl, z["mb/policy_loss"][j])
        upd("value_loss", vl, z["mb/value_loss"][j])
        upd("loss_backward", lb, z["mb/loss_backward"][j])
    return dif


def main():
    args = parse_args(CASES)
    if args._child == "weights":
        return child_make_weights(args)
    if args._child == "case":
        return child_run_case(args)
    run_parent(args, CASES, __file__, "mb/loss_backward")


if __name__ == "__main__":
    main()
