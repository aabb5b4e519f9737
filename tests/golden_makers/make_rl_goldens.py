#!/usr/bin/env python
"""Golden numbers for GRPO / CISPO, produced by minimind-3's REAL trainer/train_grpo.py (d65ef2c).

Nothing here re-implements the reference. Each case copies a reference checkout into a temp
folder, builds the layout the script expects (../out/full_sft_64[_moe].pth base weights,
../dataset/rlaif.jsonl, a stub reward model folder), sets sys.argv and runs the UNMODIFIED script
with runpy (run_name="__main__") from trainer/, in a fresh subprocess. Numbers are captured only
by wrapping (see README_rl.md):

  * trainer.rollout_engine.TorchRolloutEngine.rollout
        capture: calls the real rollout (model.generate sampling) and records what it returns;
        replay:  returns recorded output_ids and recomputes the old log-probs with the engine's
                 own compute_per_token_logps, building RolloutResult exactly as the engine does;
        both:    optionally add a constant old_logp_offset to the returned old log-probs;
  * torch.Tensor.backward      -> the loss scalar + the tensors of grpo_train_epoch's frame;
  * torch.nn.utils.clip_grad_norm_ -> the pre-clip total norm it returns;
  * torch.randperm             -> (n, permutation, caller);
  * LMForRewardModel.get_score -> messages, response, the conversation the reward model sees,
                                  its raw and clipped score;
  * sys.settrace (line events) in grpo_train_epoch / calculate_rewards -> the logged values
    (before `del prompt_inputs, ...`) and the rule part of the reward (before
    `rewards += reward_model_scores`);
  * sys.stdout                 -> the script's log lines.

The golden of every case is a REPLAY run (the token ids come from a capture run of the same
case, so the JAX side can replay the same ids). The maker checks that the capture run and its
replay agree on every recorded array, and that two replays are bit-identical.

Usage (one process at a time; needs datasets 3.6 + transformers 4.57.6, see README_rl.md):
    python tests/golden_makers/make_rl_goldens.py --ref3 /tmp/rl_ref3 --out tests/fixtures/rl \
        --python /tmp/rl_refenv/bin/python
"""

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.abspath(os.path.dirname(__file__))
FIXTURES = os.path.normpath(os.path.join(HERE, "..", "fixtures"))
REF3_COMMIT = "d65ef2c00ebc6082f9df11541e1b191655eddb00"
DEFAULT_SFT = "/work/shared/reference/golden_inputs/sft.jsonl"

# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------
COMMON_ARGV = (
    "--save_dir ../out --save_weight grpo --epochs 1 --batch_size 2 --learning_rate 5e-4 "
    "--device cpu --dtype float32 --num_workers 0 --grad_clip 1.0 --log_interval 1 "
    "--save_interval 1000 --hidden_size 64 --num_hidden_layers 2 --max_seq_len 64 "
    "--max_gen_len 16 --data_path ../dataset/rlaif.jsonl --beta 0.1 --epsilon 0.2 "
    "--epsilon_high 5.0 --from_weight full_sft --reward_model_path ../stub_reward_model "
    "--rollout_engine torch"
)


def _case(argv, base="m3_dense64", offset=0.0, full_final=False, first="capture", thinking=0.9):
    return dict(
        argv=(COMMON_ARGV + f" --thinking_ratio {thinking} " + argv).split(),
        base=base,
        offset=offset,
        full_final=full_final,
        first=first,  # the run whose token ids the golden (a replay run) replays
    )


CASES = {
    "m3_cispo": _case(
        "--loss_type cispo --num_generations 3 --accumulation_steps 1 --use_moe 0",
        full_final=True,
    ),
    "m3_grpo_acc2": _case(
        "--loss_type grpo --num_generations 2 --accumulation_steps 2 --use_moe 0"
    ),
    "m3_cispo_g6": _case(
        "--loss_type cispo --num_generations 6 --accumulation_steps 1 --use_moe 0"
    ),
    # rho = exp(logp - (old + offset)) = exp(-offset) on-policy: -2.0 -> 7.39 > epsilon_high 5
    "m3_cispo_offset": _case(
        "--loss_type cispo --num_generations 3 --accumulation_steps 1 --use_moe 0",
        offset=-2.0,
    ),
    # -0.5 -> rho = 1.65 > 1 + epsilon: the clipped term wins where A > 0, not where A < 0
    "m3_grpo_offset": _case(
        "--loss_type grpo --num_generations 3 --accumulation_steps 1 --use_moe 0",
        offset=-0.5,
    ),
    "m3_cispo_moe": _case(
        "--loss_type cispo --num_generations 3 --accumulation_steps 1 --use_moe 1",
        base="m3_moe64",
    ),
    # canned completions (SCRIPT_TEXTS) instead of sampling: drives every rule-reward branch.
    # --thinking_ratio 0.5: with 0.9 and seed 42 no prompt of a 9-row epoch is a non-thinking
    # one (the first random() >= 0.9 of the seed-42 stream is draw 25); 0.5 gives 4 of 9.
    "m3_cispo_script": _case(
        "--loss_type cispo --num_generations 3 --accumulation_steps 1 --use_moe 0",
        first="script",
        thinking=0.5,
    ),
}

# script mode: completion row r (counted over the whole run, rows i*G+j in each step) is
# SCRIPT_TEXTS[r % 9], tokenized without special tokens, followed by eos; shorter rows are
# filled with eos up to the longest one (as generate() fills finished rows). Comments: the
# rule reward of each text (+/-0.5 length, +1.0/-0.5 think length, +/-0.25 one </think>,
# - rep_penalty of the answer), before the reward model's score.
SCRIPT_TEXTS = [
    # 0.5 + 1.0 + 0.25 - 0: think 22 chars, one </think>, answer without repeated 3-grams
    "我先想一想：用户的问题很简单，直接回答即可。\n</think>\n\n答案就在这里，请参考。",
    # -0.5 - 0.5 + 0.25: short response, think of 1 char
    "嗯\n</think>\n好。",
    # 0.5 - 0.5: no </think>, rep_penalty capped at 0.5
    "好的好的。好的好的。好的好的。好的好的。好的好的。",
    # 0.5 - 0.5 - 0.25: two </think>, short think; answer keeps the second </think>
    "第一段思考。\n</think>\n中间</think>\n最后的回答写在这里，内容足够长。",
    # -0.5: empty completion (only eos)
    "",
    # 0.5 - rep_penalty(English with repeated 3-grams)
    "the cat sat on the mat, the cat sat on the mat, and the dog sat too.",
    # 0.5 + 1.0 + 0.25: long think, empty answer (the reward model scores ""); three times,
    # so that with G = 3 some groups (rows 6-8, 15-17, 24-26 of the run) get three identical
    # completions: zero reward variance, A = 0, only the KL term pulls
    "这是一个足够长的思考过程，用来测试空回答的情况。\n</think>\n",
    "这是一个足够长的思考过程，用来测试空回答的情况。\n</think>\n",
    "这是一个足够长的思考过程，用来测试空回答的情况。\n</think>\n",
]

# base weights: fixture npz (tests/fixtures/post) -> where the script loads them from
BASE_PTH = {"m3_dense64": "full_sft_64.pth", "m3_moe64": "full_sft_64_moe.pth"}
TIED_DUP, TIED_SRC = "lm_head.weight", "model.embed_tokens.weight"
EMB_ROWS = [0, 1, 2, 21, 22, 234, 1000, 6399]

# ---------------------------------------------------------------------------------------------
# inputs: RLAIF rows and the stub reward model
# ---------------------------------------------------------------------------------------------
RLAIF_SYSTEM = "You are a careful assistant. 请简洁回答。"
RLAIF_FULL_HISTORY = (0, 3)  # rows that keep the whole conversation (multi-turn prompts)
RLAIF_SYSTEM_ROW = 2  # the row that starts with a system message
N_RLAIF = 9  # batch 2 -> 5 steps, the last one a single prompt


def make_rlaif(sft_path):
    """rlaif.jsonl rows, one per shared SFT conversation i < 9, in upstream rlaif.jsonl's format:
    the conversation's messages up to its LAST user turn (rows 0 and 3: the whole multi-turn
    history; the others: the first user turn) + {"role": "assistant", "content": "无"}.
    Row 2 starts with a system message (RLAIF_SYSTEM), so pre_processing_chat never injects one
    there. Row 0's history (a long assistant reply) is longer than --max_seq_len 64 tokens."""
    with open(sft_path, encoding="utf-8") as f:
        convs = [json.loads(line)["conversations"] for line in f if line.strip()]
    rows = []
    for i in range(N_RLAIF):
        c = [{"role": m["role"], "content": m["content"]} for m in convs[i]]
        if i in RLAIF_FULL_HISTORY:
            last_user = max(j for j, m in enumerate(c) if m["role"] == "user")
            msgs = c[: last_user + 1]
        else:
            msgs = c[:1]
        if i == RLAIF_SYSTEM_ROW:
            msgs = [{"role": "system", "content": RLAIF_SYSTEM}] + msgs
        rows.append({"conversations": msgs + [{"role": "assistant", "content": "无"}]})
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


# The stub's source is the committed fixture (tests/fixtures/rl/stub_reward_model), the one
# copy both sides load; the maker writes it into each run's layout as it is.
with open(os.path.join(FIXTURES, "rl", "stub_reward_model", "modeling_stub.py"),
          encoding="utf-8") as _stub:
    STUB_MODELING = _stub.read()

STUB_CONFIG = {
    "architectures": ["StubRewardModel"],
    "auto_map": {
        "AutoConfig": "modeling_stub.StubRewardConfig",
        "AutoModel": "modeling_stub.StubRewardModel",
    },
    "model_type": "minimind_stub_reward",
    "torch_dtype": "float16",
}


def stub_score(conversation):
    """the stub's score, in plain Python (same code as STUB_MODELING's get_score)"""
    import hashlib

    text = json.dumps(conversation, ensure_ascii=False, sort_keys=True)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return -4.0 + 8.0 * ((int.from_bytes(digest[:8], "big") >> 11) / 2.0**53)


def write_stub_reward_model(dest, tokenizer_dir):
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(dest, "modeling_stub.py"), "w", encoding="utf-8") as f:
        f.write(STUB_MODELING)
    with open(os.path.join(dest, "config.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(STUB_CONFIG, indent=2) + "\n")
    # model.safetensors with the one float16 parameter `anchor` = [0.0], written by hand
    # (8-byte little-endian header length, JSON header padded to 8 bytes, raw data)
    hdr = json.dumps(
        {
            "__metadata__": {"format": "pt"},
            "anchor": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]},
        },
        separators=(",", ":"),
    ).encode()
    hdr += b" " * (-len(hdr) % 8)
    with open(os.path.join(dest, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(hdr)) + hdr + b"\x00\x00")
    for fn in ("tokenizer.json", "tokenizer_config.json", "LICENSE"):
        shutil.copyfile(os.path.join(tokenizer_dir, fn), os.path.join(dest, fn))


def make_inputs(args):
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rlaif.jsonl"), "w", encoding="utf-8") as f:
        f.write(make_rlaif(args.sft))
    write_stub_reward_model(os.path.join(args.out, "stub_reward_model"), args.tokenizer)


# ---------------------------------------------------------------------------------------------
# child: base weights as the .pth files the script loads
# ---------------------------------------------------------------------------------------------
def child_make_weights(args):
    import torch

    for name, fn in BASE_PTH.items():
        z = np.load(os.path.join(args.post_fixtures, f"weights_{name}.npz"))
        sd = {}
        for k in z["meta/key_order"].tolist():
            src = TIED_SRC if k == TIED_DUP else k
            sd[k] = torch.from_numpy(z[src].copy())
            assert sd[k].dtype == torch.float16
        torch.save(sd, os.path.join(args.work, fn))
        print(f"[maker] {fn}: {len(sd)} tensors from weights_{name}.npz")


# ---------------------------------------------------------------------------------------------
# child: one run of the script (capture or replay)
# ---------------------------------------------------------------------------------------------
class Tee:
    def __init__(self, *streams):
        self.streams = streams
        self.buf = []

    def write(self, s):
        self.buf.append(s)
        for st in self.streams:
            st.write(s)

    def flush(self):
        for st in self.streams:
            st.flush()


def _f(t):
    import torch

    if isinstance(t, torch.Tensor):
        return float(t.detach().double().item())
    return float(t)


def _line_of(path, func, needle):
    """line number of the first line inside `def func` that starts with `needle`"""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = next(i for i, s in enumerate(lines) if s.startswith(f"def {func}("))
    for i in range(start + 1, len(lines)):
        if lines[i].strip().startswith(needle):
            return i + 1
        if lines[i].startswith("def "):
            break
    raise RuntimeError(f"{needle!r} not found in {func}")


# tensors of grpo_train_epoch's frame recorded at backward time (when present)
FRAME_TENSORS = [
    "full_mask",
    "logp_pos",
    "rewards",
    "per_token_logps",
    "ref_per_token_logps",
    "old_per_token_logps",
    "grouped_rewards",
    "mean_r",
    "std_r",
    "advantages",
    "completion_pad_mask",
    "is_eos",
    "eos_idx",
    "completion_mask",
    "kl_div",
    "per_token_kl",
    "ratio",
    "clamped_ratio",
    "clipped_ratio",
    "per_token_loss1",
    "per_token_loss2",
    "per_token_loss",
    "policy_loss",
    "aux_loss",
    "loss",
]
LOG_VALUES = [
    "policy_loss_val",
    "current_aux_loss",
    "avg_reward_val",
    "avg_len_val",
    "kl_ref_val",
    "advantages_mean_val",
    "advantages_std_val",
    "current_lr",
]


def build_layout(args, cfg, script_name):
    """a temp copy of the checkout with out/<base>.pth, dataset/rlaif.jsonl and
    stub_reward_model/; chdir to its trainer/, put it first on sys.path, set sys.argv.
    Returns (temp folder, checkout root, script path, base weights file name)."""
    work = tempfile.mkdtemp(prefix=f"rlgolden_{args.case}_{args.mode}_")
    root = os.path.join(work, "repo")
    shutil.copytree(args.ref3, root)
    for d in ("out", "dataset"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    fn = BASE_PTH[cfg["base"]]
    shutil.copyfile(os.path.join(args.work, fn), os.path.join(root, "out", fn))
    shutil.copyfile(
        os.path.join(args.out, "rlaif.jsonl"), os.path.join(root, "dataset", "rlaif.jsonl")
    )
    shutil.copytree(
        os.path.join(args.out, "stub_reward_model"), os.path.join(root, "stub_reward_model")
    )
    script = os.path.join(root, "trainer", script_name)
    os.chdir(os.path.join(root, "trainer"))
    sys.path.insert(0, root)
    sys.argv = [script_name] + cfg["argv"]
    return work, root, script, fn


def make_rollout(rollout_mod, mode, replay, index, cur, offset, state, depth=1):
    """the TorchRolloutEngine.rollout wrapper: capture (the real rollout, recorded), replay
    (recorded output_ids; old logps recomputed as the engine does) or script (canned texts);
    + offset on the returned old logps. index() = the rollout's number, cur() = its record dict;
    the script's frame (its `prompts`) is `depth` frames up (more when wrapped again)."""
    import dataclasses
    from contextlib import nullcontext

    import torch

    orig_rollout = rollout_mod.TorchRolloutEngine.rollout

    def rollout(self, prompt_ids, attention_mask, num_generations, max_new_tokens, temperature=0.8):
        i = index()
        fr = sys._getframe(depth)
        prompts = list(fr.f_locals["prompts"])
        d = cur()
        if mode == "capture":
            res = orig_rollout(
                self, prompt_ids, attention_mask, num_generations, max_new_tokens, temperature
            )
        else:
            if mode == "replay":
                assert i < int(replay["n_micro"]), "more rollouts than recorded"
                p = f"micro{i}/"
                assert prompts == replay[p + "prompts"].tolist(), "prompt strings differ"
                assert np.array_equal(prompt_ids.numpy(), replay[p + "prompt_ids"])
                assert np.array_equal(attention_mask.numpy(), replay[p + "prompt_attention_mask"])
                assert int(replay[p + "num_generations"]) == num_generations
                recorded = torch.from_numpy(replay[p + "output_ids"]).to(prompt_ids.device)
                if p + "script_text_index" in replay.files:
                    d["script_text_index"] = replay[p + "script_text_index"]
            else:  # script: prompt (+) tok(canned text) (+) eos, eos-filled to the longest row
                eos = self.tokenizer.eos_token_id
                n = prompt_ids.size(0) * num_generations
                r0 = state.setdefault("script_rows", 0)
                state["script_rows"] += n
                rows = [
                    self.tokenizer(
                        SCRIPT_TEXTS[(r0 + r) % len(SCRIPT_TEXTS)], add_special_tokens=False
                    ).input_ids
                    + [eos]
                    for r in range(n)
                ]
                width = max(len(x) for x in rows)
                comp = torch.tensor([x + [eos] * (width - len(x)) for x in rows])
                recorded = torch.cat(
                    [prompt_ids.repeat_interleave(num_generations, dim=0), comp.to(prompt_ids)], 1
                )
                d["script_text_index"] = np.array(
                    [(r0 + r) % len(SCRIPT_TEXTS) for r in range(n)], dtype=np.int64
                )
            # exactly as TorchRolloutEngine.rollout L73-92, with generate() replaced by the ids
            ctx = self.autocast_ctx if self.autocast_ctx else nullcontext()
            with torch.no_grad(), ctx:
                output_ids = recorded.clone()
                prompt_len = prompt_ids.size(1)
                completion_ids = output_ids[:, prompt_len:]
                full_mask = (output_ids != self.tokenizer.pad_token_id).long()
                per_token_logps = rollout_mod.compute_per_token_logps(
                    self.policy_model,
                    output_ids,
                    completion_ids.size(1),
                    attention_mask=full_mask,
                )
            completions = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
            res = rollout_mod.RolloutResult(
                output_ids,
                completion_ids,
                per_token_logps,
                completions,
                prompt_ids.new_full((output_ids.size(0),), prompt_len),
                attention_mask.new_ones(output_ids.size(0), completion_ids.size(1)),
            )
        d["prompts"] = np.array(prompts)
        d["prompt_ids"] = prompt_ids.numpy().copy()
        d["prompt_attention_mask"] = attention_mask.numpy().copy()
        d["num_generations"] = np.array(num_generations)
        d["max_new_tokens"] = np.array(max_new_tokens)
        d["temperature"] = np.array(float(temperature))
        d["output_ids"] = res.output_ids.numpy().copy()
        d["completion_ids"] = res.completion_ids.numpy().copy()
        d["rollout_logps"] = res.per_token_logps.numpy().copy()
        d["completions"] = np.array(list(res.completions))
        d["prompt_lens"] = res.prompt_lens.numpy().copy()
        d["rollout_completion_mask"] = res.completion_mask.numpy().copy()
        if offset != 0.0:
            res = dataclasses.replace(res, per_token_logps=res.per_token_logps + offset)
        d["returned_old_logps"] = res.per_token_logps.numpy().copy()
        return res

    return rollout


def make_get_score(orig_get_score, rm_rec, index):
    """LMForRewardModel.get_score wrapper: appends messages, response, the conversation the
    reward model sees, its raw and clipped score to rm_rec (micro = index())"""

    def get_score(self, messages, response):
        inner = self.model.get_score
        box = {}

        def spy(tokenizer, conversation):
            box["conversation"] = json.loads(json.dumps(conversation))
            box["raw"] = inner(tokenizer, conversation)
            return box["raw"]

        self.model.get_score = spy
        try:
            score = orig_get_score(self, messages, response)
        finally:
            del self.model.get_score
        rm_rec.append(
            dict(
                micro=index(),
                messages=json.dumps(messages, ensure_ascii=False),
                response=response,
                conversation=json.dumps(box["conversation"], ensure_ascii=False),
                raw=float(box["raw"]),
                clipped=float(score),
            )
        )
        return score

    return get_score


def make_rewards_tracer(add_line, rule_rec, index):
    """line tracer for calculate_rewards: at `rewards += reward_model_scores` appends
    (index(), rule part of the rewards, clipped reward model scores) to rule_rec"""

    def rewards_tracer(frame, event, arg):
        if event == "line" and frame.f_lineno == add_line:
            L = frame.f_locals
            rule_rec.append(
                (index(), L["rewards"].numpy().copy(), L["reward_model_scores"].numpy().copy())
            )
        return rewards_tracer

    return rewards_tracer


def run_traced(script, epoch_function, epoch_tracer, rewards_tracer, undo_hooks):
    """Run `script` as __main__ with stdout teed and the line tracers on `epoch_function` and
    calculate_rewards; `undo_hooks()` afterwards, whatever happens -> (its globals, the tee)"""
    import runpy

    def global_tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_filename == script:
            if frame.f_code.co_name == epoch_function:
                return epoch_tracer
            if frame.f_code.co_name == "calculate_rewards":
                return rewards_tracer
        return None

    tee = Tee(sys.__stdout__)
    old_stdout = sys.stdout
    sys.stdout = tee
    sys.settrace(global_tracer)
    try:
        return runpy.run_path(script, run_name="__main__"), tee
    finally:
        sys.settrace(None)
        sys.stdout = old_stdout
        undo_hooks()


def meta_arrays(out, args, cfg, script_name, fn):
    """meta/* common to the RL makers (case, mode, commit, script, command, argv, base weights,
    seeds, versions)"""
    import datasets
    import torch
    import transformers

    out["meta/case"] = np.array([args.case])
    out["meta/mode"] = np.array([args.mode])
    out["meta/reference_commit"] = np.array([REF3_COMMIT])
    out["meta/script"] = np.array([f"trainer/{script_name}"])
    out["meta/command"] = np.array(
        [f"cd trainer && python {script_name} " + " ".join(cfg["argv"])]
    )
    out["meta/argv"] = np.array(sys.argv)
    out["meta/base_weights_file"] = np.array([f"tests/fixtures/post/weights_{cfg['base']}.npz"])
    out["meta/base_weights_in_layout"] = np.array([f"out/{fn}"])
    out["meta/seeds"] = np.array(
        [
            "reference: setup_seed(42) at start (random, numpy, torch); setup_seed(42+epoch) "
            "right before the epoch's torch.randperm(len(train_ds)); the dataset's CPython "
            "random draws (system prompt p=0.2, thinking p=--thinking_ratio) happen in the main "
            "process (--num_workers 0) in data order",
            "capture run: model.generate samples with torch's global RNG (multinomial); "
            "the replay run never samples",
        ]
    )
    out["meta/versions"] = np.array(
        [
            f"python {sys.version.split()[0]}",
            f"torch {torch.__version__}",
            f"transformers {transformers.__version__}",
            f"datasets {datasets.__version__}",
            f"numpy {np.__version__}",
        ]
    )


def rm_arrays(out, rm_rec, rule_rec, n_micro):
    """micro{i}/rm_* (reward model calls) and micro{i}/rule_rewards, reward_model_scores"""
    for i in range(n_micro):
        calls = [r for r in rm_rec if r["micro"] == i]
        for k in ("messages", "response", "conversation"):
            out[f"micro{i}/rm_{k}"] = np.array([c[k] for c in calls])
        out[f"micro{i}/rm_raw_score"] = np.array([c["raw"] for c in calls], dtype=np.float64)
        out[f"micro{i}/rm_clipped_score"] = np.array(
            [c["clipped"] for c in calls], dtype=np.float64
        )
        # the stub's hash recomputed here must be what the reward model returned
        assert all(stub_score(json.loads(c["conversation"])) == c["raw"] for c in calls)
    assert [r[0] for r in rule_rec] == list(range(n_micro))
    for i, (_, rule, rms) in enumerate(rule_rec):
        out[f"micro{i}/rule_rewards"] = rule
        out[f"micro{i}/reward_model_scores"] = rms


def weights_arrays(out, args, cfg, root, model, first, weight):
    """check/start_vs_base_maxabs (first = the model's state dict at the first backward), the
    script's saved fp16 file out/<weight>_64[_moe].pth vs the model in memory, resume/*,
    final_stats/final_rows/final/final_fp32_stats of the policy, the .pth files written.
    Returns the loaded resume dict."""
    import torch

    base = np.load(os.path.join(args.post_fixtures, f"weights_{cfg['base']}.npz"))
    out["check/start_vs_base_maxabs"] = np.array(
        max(
            float(np.abs(v - base[TIED_SRC if k == TIED_DUP else k].astype(np.float32)).max())
            for k, v in first.items()
        )
    )
    moe = "_moe" if "--use_moe 1" in " ".join(cfg["argv"]) else ""
    saved_path = os.path.join(root, "out", f"{weight}_64{moe}.pth")
    saved = torch.load(saved_path, map_location="cpu")
    resume = torch.load(
        os.path.join(root, "checkpoints", f"{weight}_64{moe}_resume.pth"),
        map_location="cpu",
        weights_only=False,
    )
    fin = {k: v.detach() for k, v in model.state_dict().items()}
    out["meta/saved_file"] = np.array([f"out/{weight}_64{moe}.pth"])
    out["meta/saved_dtype"] = np.array([str(next(iter(saved.values())).dtype)])
    out["meta/saved_key_order"] = np.array(list(saved.keys()))
    out["check/saved_vs_inmemory_fp16_equal"] = np.array(
        all(torch.equal(saved[k], fin[k].half()) for k in saved)
    )
    out["check/saved_vs_inmemory_maxabs"] = np.array(
        max(float((saved[k].float() - fin[k]).abs().max()) for k in saved)
    )
    out["resume/step"] = np.array(int(resume["step"]))
    out["resume/epoch"] = np.array(int(resume["epoch"]))
    out["resume/scheduler_last_epoch"] = np.array(int(resume["scheduler"]["last_epoch"]))
    out["resume/scheduler_last_lr"] = np.array(resume["scheduler"]["_last_lr"], dtype=np.float64)
    out["resume/optimizer_step"] = np.array(
        [float(s["step"]) for s in resume["optimizer"]["state"].values()][:1], dtype=np.float64
    )
    for k, v in saved.items():
        if k == TIED_DUP:
            continue
        a = v.float().numpy()
        b = fin[k].numpy()
        s64 = a.astype(np.float64)
        out[f"final_stats/{k}"] = np.array([s64.sum(), (s64**2).sum(), np.abs(s64).max()])
        out[f"final_fp32_stats/{k}"] = np.array(
            [b.astype(np.float64).sum(), (b.astype(np.float64) ** 2).sum()]
        )
        if k == TIED_SRC:
            out[f"final_rows/{k}"] = a[EMB_ROWS].copy()
        elif cfg["full_final"] or a.ndim == 1 or k.endswith("mlp.gate.weight"):
            out[f"final/{k}"] = a.copy()
        else:
            out[f"final_rows/{k}"] = a[[0, a.shape[0] // 2, a.shape[0] - 1]].copy()
    out["final_rows_index/embedding"] = np.array(EMB_ROWS)
    out["meta/final_note"] = np.array(
        [
            "final/* and final_rows/* and final_stats/* come from the script's saved fp16 file "
            "(float32 of the fp16 values); final_stats = [sum, sum of squares, max |w|] in "
            "float64; final_fp32_stats = [sum, sum of squares] of the model in memory after the "
            "run (after the end-of-epoch flush, if any); final_rows/<2-D key> = rows "
            "[0, n//2, n-1] (embedding: final_rows_index/embedding)"
        ]
    )
    written = []
    for dp, _dirs, fns in os.walk(root):
        for f_ in fns:
            if f_.endswith(".pth"):
                written.append(os.path.relpath(os.path.join(dp, f_), root))
    out["meta/pth_files_in_layout_after_run"] = np.array(sorted(written))
    return resume


def child_run_case(args):
    import torch

    torch.set_num_threads(1)
    cfg = CASES[args.case]
    mode = args.mode
    offset = float(cfg["offset"])
    work, root, script, fn = build_layout(args, cfg, "train_grpo.py")

    # the modules the script will import (same objects: root is first on sys.path)
    import trainer.rollout_engine as rollout_mod
    import trainer.trainer_utils as utils_mod

    replay = None
    if mode == "replay":
        z = np.load(args.rollouts)
        replay = z
        n_replay = int(z["n_micro"])

    rec = dict(loss=[], lr=[], epoch=[], step=[], clip_norm=[], clip_after_micro=[])
    per = {}  # micro index -> {name: value}
    perm_rec = []
    rm_rec = []  # one dict per get_score call
    log_rec = {}  # micro index -> log values
    rule_rec = []  # rule part of the rewards, one [N] array per calculate_rewards call
    state = {"first": None}

    def cur():
        return per.setdefault(len(rec["loss"]), {})

    # ---- rollout: capture / replay, + old_logp_offset ----
    orig_rollout = rollout_mod.TorchRolloutEngine.rollout
    rollout = make_rollout(rollout_mod, mode, replay, lambda: len(rec["loss"]), cur, offset, state)
    rollout_mod.TorchRolloutEngine.rollout = rollout

    # ---- reward model calls ----
    orig_get_score = utils_mod.LMForRewardModel.get_score
    get_score = make_get_score(orig_get_score, rm_rec, lambda: len(rec["loss"]))
    utils_mod.LMForRewardModel.get_score = get_score

    # ---- backward: the loss and grpo_train_epoch's tensors ----
    orig_backward = torch.Tensor.backward

    def backward(self, *a, **k):
        fr = sys._getframe(1)
        L, G = fr.f_locals, fr.f_globals
        if fr.f_code.co_name == "grpo_train_epoch" and fr.f_code.co_filename == script:
            rec["loss"].append(_f(self))
            rec["lr"].append(float(G["optimizer"].param_groups[0]["lr"]))
            rec["epoch"].append(int(L["epoch"]))
            rec["step"].append(int(L["step"]))
            d = per.setdefault(len(rec["loss"]) - 1, {})
            for n in FRAME_TENSORS:
                if n in L and isinstance(L[n], torch.Tensor):
                    d[n] = L[n].detach().numpy().copy()
            if state["first"] is None:
                model = G["model"]
                state["first"] = {
                    n: p.detach().clone().numpy() for n, p in model.state_dict().items()
                }
        return orig_backward(self, *a, **k)

    torch.Tensor.backward = backward

    orig_clip = torch.nn.utils.clip_grad_norm_

    def clip(*a, **k):
        n = orig_clip(*a, **k)
        rec["clip_norm"].append(_f(n))
        rec["clip_after_micro"].append(len(rec["loss"]))
        return n

    torch.nn.utils.clip_grad_norm_ = clip

    orig_randperm = torch.randperm

    def randperm(*a, **k):
        p = orig_randperm(*a, **k)
        fr = sys._getframe(1)
        perm_rec.append((int(a[0]), p.numpy().copy(), f"{fr.f_code.co_name}"))
        return p

    torch.randperm = randperm

    # ---- line tracer: log values (grpo_train_epoch) and rule rewards (calculate_rewards) ----
    del_line = _line_of(script, "grpo_train_epoch", "del prompt_inputs")
    add_line = _line_of(script, "calculate_rewards", "rewards += reward_model_scores")

    def epoch_tracer(frame, event, arg):
        if event == "line" and frame.f_lineno == del_line:
            L = frame.f_locals
            log_rec[len(rec["loss"]) - 1] = {n: float(L[n]) for n in LOG_VALUES if n in L}
        return epoch_tracer

    rewards_tracer = make_rewards_tracer(add_line, rule_rec, lambda: len(rec["loss"]))

    def undo_hooks():
        torch.Tensor.backward = orig_backward
        torch.nn.utils.clip_grad_norm_ = orig_clip
        torch.randperm = orig_randperm
        rollout_mod.TorchRolloutEngine.rollout = orig_rollout
        utils_mod.LMForRewardModel.get_score = orig_get_score

    g, tee = run_traced(script, "grpo_train_epoch", epoch_tracer, rewards_tracer, undo_hooks)

    # ---------------- collect ----------------
    n_micro = len(rec["loss"])
    if mode == "replay":
        assert n_micro == n_replay, f"{n_micro} micro-steps, {n_replay} recorded"
    out = {}
    meta_arrays(out, args, cfg, "train_grpo.py", fn)
    out["meta/old_logp_offset"] = np.array(offset)
    out["meta/wrapping"] = np.array(
        [
            "trainer.rollout_engine.TorchRolloutEngine.rollout wrapped: capture = the real "
            "rollout, recorded; replay = recorded output_ids, old logps recomputed with "
            "rollout_engine.compute_per_token_logps, RolloutResult built as in L73-92; "
            "script = output_ids built from SCRIPT_TEXTS, then as replay; "
            "old_logp_offset added to the returned per_token_logps (both modes)",
            "torch.Tensor.backward wrapped (loss value + grpo_train_epoch frame tensors)",
            "torch.nn.utils.clip_grad_norm_ wrapped (returned pre-clip total norm)",
            "torch.randperm wrapped (n, permutation, caller)",
            "trainer.trainer_utils.LMForRewardModel.get_score wrapped (messages, response, "
            "conversation given to the reward model, raw and clipped score)",
            "sys.settrace line events in grpo_train_epoch (log values before `del "
            "prompt_inputs`) and calculate_rewards (rule rewards before `rewards += "
            "reward_model_scores`)",
            "stdout tee",
            "--reward_model_path: the stub reward model folder (stub_reward_model/)",
        ]
    )
    out["log_lines"] = np.array("".join(tee.buf).splitlines())
    out["n_micro"] = np.array(n_micro)
    out["loss_backward"] = np.array(rec["loss"], dtype=np.float64)
    out["lr"] = np.array(rec["lr"], dtype=np.float64)
    out["epoch"] = np.array(rec["epoch"], dtype=np.int64)
    out["step"] = np.array(rec["step"], dtype=np.int64)
    out["clip_total_norm"] = np.array(rec["clip_norm"], dtype=np.float64)
    out["clip_after_micro"] = np.array(rec["clip_after_micro"], dtype=np.int64)
    for n in LOG_VALUES:
        out[f"log/{n}"] = np.array(
            [log_rec.get(i, {}).get(n, np.nan) for i in range(n_micro)], dtype=np.float64
        )
    out["randperm/n"] = np.array([p[0] for p in perm_rec], dtype=np.int64)
    out["randperm/caller"] = np.array([p[2] for p in perm_rec])
    for j, p in enumerate(perm_rec):
        out[f"randperm/{j}"] = p[1].astype(np.int64)
    for i in range(n_micro):
        for k, v in per[i].items():
            out[f"micro{i}/{k}"] = v
    rm_arrays(out, rm_rec, rule_rec, n_micro)

    # ---- derived by this maker (float64 / counts) from the recorded tensors ----
    eps, eps_high = 0.2, 5.0
    der = {k: [] for k in ("n_tokens", "n_ratio_gt_eps_high", "n_ratio_outside_clip")}
    der.update({k: [] for k in ("n_grpo_clip_active", "ratio_min", "ratio_max")})
    der.update({k: [] for k in ("n_rows", "n_rows_with_eos", "n_rows_with_think_close")})
    for i in range(n_micro):
        d = per[i]
        m = d["completion_mask"].astype(bool)
        rho = d["ratio"].astype(np.float64)
        A = d["advantages"].astype(np.float64)[:, None] * np.ones_like(rho)
        der["n_tokens"].append(int(m.sum()))
        der["n_ratio_gt_eps_high"].append(int((m & (rho > eps_high)).sum()))
        der["n_ratio_outside_clip"].append(int((m & (np.abs(rho - 1) > eps)).sum()))
        active = ((A > 0) & (rho > 1 + eps)) | ((A < 0) & (rho < 1 - eps))
        der["n_grpo_clip_active"].append(int((m & active).sum()))
        der["ratio_min"].append(float(rho[m].min()))
        der["ratio_max"].append(float(rho[m].max()))
        der["n_rows"].append(int(m.shape[0]))
        der["n_rows_with_eos"].append(int(d["is_eos"].any(1).sum()))
        der["n_rows_with_think_close"].append(
            int(sum("</think>" in c for c in d["completions"].tolist()))
        )
    for k, v in der.items():
        out[f"derived/{k}"] = np.array(v)

    # ---- weights: start, the script's saved file, the model in memory after the run ----
    weights_arrays(out, args, cfg, root, g["model"], state["first"], "grpo")
    np.savez_compressed(args.result, **out)
    print(f"[maker] {args.case} {mode}: {n_micro} micro-steps, {len(rec['clip_norm'])} updates")
    os.chdir("/")
    shutil.rmtree(work)


# ---------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------
def compare(a, b, skip=("meta/mode", "meta/argv")):
    """names of arrays that differ between two result files (bitwise)"""
    diff = sorted(set(a.files) ^ set(b.files))
    for k in sorted(set(a.files) & set(b.files)):
        if k in skip:
            continue
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            diff.append(k)
    return diff


def parse_args(cases):
    """the command line shared by the RL makers (parent and child modes)"""
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref3", required=True, help="checkout of jingyaogong/minimind at d65ef2c")
    ap.add_argument("--out", required=True)
    ap.add_argument("--sft", default=DEFAULT_SFT)
    ap.add_argument("--tokenizer", default=os.path.join(FIXTURES, "minimind3_tokenizer"))
    ap.add_argument("--post-fixtures", default=os.path.join(FIXTURES, "post"))
    ap.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter for the reference runs (torch, transformers 4.x, datasets)",
    )
    ap.add_argument("--cases", default=",".join(cases))
    ap.add_argument(
        "--rollouts-from",
        default=None,
        help="folder of existing goldens: replay their token ids instead of a capture run",
    )
    ap.add_argument("--_child", default=None)
    ap.add_argument("--case", default=None)
    ap.add_argument("--mode", default=None)
    ap.add_argument("--rollouts", default=None)
    ap.add_argument("--result", default=None)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    for k in ("out", "ref3", "tokenizer", "post_fixtures", "sft", "rollouts_from", "rollouts"):
        if getattr(args, k):
            setattr(args, k, os.path.abspath(getattr(args, k)))
    return args


def child_env(work):
    """environment of the child processes: offline, one thread, no GPU, fixed hash seed"""
    return dict(
        os.environ,
        HF_HOME=os.path.join(work, "hf_home"),
        PYTHONHASHSEED="0",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        CUDA_VISIBLE_DEVICES="",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        WANDB_MODE="disabled",
    )


def run_parent(args, cases, maker_file, loss_key):
    """inputs, base weights, then per case: first run (capture/script), two replays fed with
    its token ids, compare, write <out>/<case>.npz = the first replay + check/*. The children
    are `maker_file --_child weights|case`; loss_key names the losses array compared in
    check/capture_vs_replay_loss_maxabs."""
    make_inputs(args)
    work = tempfile.mkdtemp(prefix="rlgolden_work_")
    env = child_env(work)
    common = [args.python, os.path.abspath(maker_file), "--ref3", args.ref3, "--out", args.out]
    common += ["--post-fixtures", args.post_fixtures, "--work", work]
    subprocess.run(common + ["--_child", "weights"], check=True, env=env)

    def run(case, mode, result, rollouts=None):
        cmd = common + ["--_child", "case", "--case", case, "--mode", mode, "--result", result]
        if rollouts:
            cmd += ["--rollouts", rollouts]
        subprocess.run(cmd, check=True, env=env)
        return np.load(result)

    summary = []
    for case in args.cases.split(","):
        print(f"===== {case} =====", flush=True)
        if args.rollouts_from:
            cap_path = os.path.join(args.rollouts_from, f"{case}.npz")
            cap = None
        else:
            cap_path = os.path.join(work, f"{case}_{cases[case]['first']}.npz")
            cap = run(case, cases[case]["first"], cap_path)
        gold_path = os.path.join(work, f"{case}_replay1.npz")
        gold = run(case, "replay", gold_path, cap_path)
        again = run(case, "replay", os.path.join(work, f"{case}_replay2.npz"), cap_path)
        d_twice = compare(gold, again)
        out = {k: gold[k] for k in gold.files}
        out["check/replay_twice_differing_keys"] = np.array(d_twice, dtype=str)
        out["check/replay_twice_identical"] = np.array(not d_twice)
        if cap is not None:
            d_cap = compare(cap, gold)
            out["check/capture_vs_replay_differing_keys"] = np.array(d_cap, dtype=str)
            out["check/capture_vs_replay_identical"] = np.array(not d_cap)
            out["check/capture_vs_replay_loss_maxabs"] = np.array(
                float(np.abs(cap[loss_key] - gold[loss_key]).max())
            )
        path = os.path.join(args.out, f"{case}.npz")
        np.savez_compressed(path, **out)
        line = (
            f"{case}: {os.path.getsize(path)} bytes, replay twice identical: {not d_twice} "
            f"{d_twice[:5]}"
        )
        if cap is not None:
            line += f", capture == replay: {not d_cap} {d_cap[:5]}"
        print("[maker] " + line, flush=True)
        summary.append(line)
    print("\n".join(summary))
    shutil.rmtree(work, ignore_errors=True)


def main():
    args = parse_args(CASES)
    if args._child == "weights":
        return child_make_weights(args)
    if args._child == "case":
        return child_run_case(args)
    run_parent(args, CASES, __file__, "loss_backward")


if __name__ == "__main__":
    main()
