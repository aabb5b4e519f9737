#!/usr/bin/env python
"""Golden numbers for LoRA / DPO / distillation, produced by the REAL MiniMind reference scripts.

Nothing here re-implements the reference. Each case copies a reference checkout into a temp
folder, builds the folder layout the script expects (tokenizer, ../out/*.pth base weights,
dataset), sets sys.argv and runs the UNMODIFIED script file with runpy (run_name="__main__") in a
fresh subprocess. Numbers are captured only by wrapping:

  * torch.Tensor.backward      -> value of the tensor the script calls .backward() on (the loss,
                                  already divided by accumulation_steps where the script does so),
                                  plus tensors read from the caller's (train_epoch's) frame locals
                                  (batch, lr from the optimizer, loss parts);
  * torch.nn.utils.clip_grad_norm_ -> the total (pre-clip) gradient norm it returns;
  * sys.settrace on the script's own loss function (dpo_loss / distillation_loss[_fn]) -> its
                                  local variables at return (per-sequence log-prob aggregates,
                                  margins, KL);
  * torch.isin (v2 train_distill_reason.py only) -> the batch's loss mask as the dataset made it
                                  (the script overwrites it in place with the weights right
                                  after this call) and the special ids the script passes;
  * sys.stdout                 -> the script's own log lines;
  * v2 distillation only: model.LMConfig.LMConfig is replaced by a subclass that maps the two
    configurations hard-coded in train_distillation.py (512/8 student, 768/16 teacher) to tiny
    ones (the script has no flags for them). See README.md.

Usage (one process at a time; the reference needs datasets + scikit-learn + transformers 4.x,
see README.md):
    python tests/golden_makers/make_post_training_goldens.py --ref2 /tmp/ref2 --ref3 /tmp/ref3 \
        --out tests/fixtures/post/
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.abspath(os.path.dirname(__file__))
REF2_COMMIT = "d9453ed9a35847d7363a4b16b8a84274941c3609"
REF3_COMMIT = "d65ef2c00ebc6082f9df11541e1b191655eddb00"
DEFAULT_SFT = "/work/shared/reference/golden_inputs/sft.jsonl"
DEFAULT_M3_GOLDEN = "/work/shared/reference/minimind3_golden.npz"

# Seeds used by THIS maker (the reference scripts seed themselves: v2 torch.manual_seed(1337),
# HEAD setup_seed(42) at start and setup_seed(42 + epoch) before each epoch's randperm).
SEED_M2_BASE = 1337  # torch.manual_seed before MiniMindLM(LMConfig(dim=64, n_layers=2))
SEED_M2_TEACHER = 2024  # torch.manual_seed before MiniMindLM(LMConfig(dim=80, n_layers=2))
SEED_M3_TEACHER = 7  # torch.manual_seed before MiniMindForCausalLM(hidden 96, 2 layers)

N_DPO_PAIRS = 24
MULTI_TURN_KEEP = (
    0,
    3,
)  # pair 0: long multi-turn (last reply beyond 64 tokens); pair 3: short multi-turn
# Reasoning-distillation data (reason_sft.jsonl): the 40 shared SFT conversations cut to their
# first exchange, the reply rewritten in upstream r1_mix_1024's format. See make_reason_sft.
REASON_THINKS = [
    "好",
    "用户问{topic}",
    "先想一想。",
    "这是一个关于“{topic}”的问题，我需要先理解它，再给出简洁、准确的回答。",
    "嗯",
    "问题是{topic}，直接回答。",
    "简单。",
    "用户说：{topic}。我先回忆相关知识，然后整理成一句话回答。",
]
BAD_REPLIES = [
    "我不知道。",
    "Sorry, I cannot help with that.",
    "嗯。",
    "这个问题没有意义，请换一个问题。",
]

# --------------------------------------------------------------------------------------------
# cases: (generation, script, argv, extra layout)
# --------------------------------------------------------------------------------------------
# Every case trains 2 epochs of batch 4 on the CPU in float32, logging every micro-step.
COMMON_ARGV = [
    "--epochs",
    "2",
    "--batch_size",
    "4",
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--num_workers",
    "0",
    "--grad_clip",
    "1.0",
    "--log_interval",
    "1",
]


def _case(gen, script, argv, **rest):
    """A case: its generation, script, working folder (the checkout root for MiniMind2,
    trainer/ for minimind-3) and argv."""
    return dict(
        gen=gen,
        script=script,
        cwd="trainer" if gen == 3 else "",
        argv=COMMON_ARGV + argv.split(),
        **rest,
    )


CASES = {
    "m2_lora": _case(
        2,
        "train_lora.py",
        "--out_dir out --learning_rate 5e-3 --accumulation_steps 3 --save_interval 1 "
        "--dim 64 --n_layers 2 --max_seq_len 64 --data_path ./dataset/lora_sft.jsonl "
        "--lora_name lora_golden",
        base="m2_dense64",
        kind="lora",
    ),
    "m3_lora": _case(
        3,
        "trainer/train_lora.py",
        "--save_dir ../out --lora_name lora_golden --learning_rate 5e-3 "
        "--accumulation_steps 3 --save_interval 1000 --hidden_size 64 "
        "--num_hidden_layers 2 --max_seq_len 64 --use_moe 0 --data_path "
        "../dataset/lora_sft.jsonl --from_weight full_sft",
        base="m3_dense64",
        kind="lora",
    ),
    "m3_lora_moe": _case(
        3,
        "trainer/train_lora.py",
        "--save_dir ../out --lora_name lora_golden --learning_rate 5e-3 "
        "--accumulation_steps 3 --save_interval 1000 --hidden_size 64 "
        "--num_hidden_layers 2 --max_seq_len 64 --use_moe 1 --data_path "
        "../dataset/lora_sft.jsonl --from_weight full_sft",
        base="m3_moe64",
        kind="lora",
    ),
    "m2_dpo": _case(
        2,
        "train_dpo.py",
        "--out_dir out --learning_rate 1e-4 --accumulation_steps 1 --save_interval 6 "
        "--dim 64 --n_layers 2 --max_seq_len 64 --data_path ./dataset/dpo_pairs.jsonl",
        base="m2_dense64",
        kind="dpo",
    ),
    "m3_dpo": _case(
        3,
        "trainer/train_dpo.py",
        "--save_dir ../out --save_weight dpo --learning_rate 1e-4 "
        "--accumulation_steps 1 --save_interval 1000 --hidden_size 64 "
        "--num_hidden_layers 2 --max_seq_len 64 --use_moe 0 --data_path "
        "../dataset/dpo_pairs.jsonl --from_weight full_sft --beta 0.15",
        base="m3_dense64",
        kind="dpo",
    ),
    "m3_dpo_moe": _case(
        3,
        "trainer/train_dpo.py",
        "--save_dir ../out --save_weight dpo --learning_rate 1e-4 "
        "--accumulation_steps 2 --save_interval 1000 --hidden_size 64 "
        "--num_hidden_layers 2 --max_seq_len 64 --use_moe 1 --data_path "
        "../dataset/dpo_pairs.jsonl --from_weight full_sft --beta 0.15",
        base="m3_moe64",
        kind="dpo",
    ),
    "m2_distill": _case(
        2,
        "train_distillation.py",
        "--out_dir out --learning_rate 1e-4 --accumulation_steps 1 --save_interval 10 "
        "--data_path ./dataset/lora_sft.jsonl",
        base="m2_dense64",
        teacher="m2_dense80_teacher",
        kind="distill",
        config_map={"512/8": [64, 2, 64], "768/16": [80, 2, 64]},
    ),
    "m2_distill_reason": _case(
        2,
        "train_distill_reason.py",
        "--out_dir out --learning_rate 1e-4 --accumulation_steps 2 --save_interval 10 "
        "--dim 64 --n_layers 2 --max_seq_len 64 --data_path ./dataset/reason_sft.jsonl",
        base="m2_dense64",
        kind="reason",
    ),
    "m3_distill": _case(
        3,
        "trainer/train_distillation.py",
        "--save_dir ../out --save_weight full_dist --learning_rate 1e-4 "
        "--accumulation_steps 1 --save_interval 1000 --max_seq_len 64 --data_path "
        "../dataset/lora_sft.jsonl --student_hidden_size 64 --student_num_layers 2 "
        "--teacher_hidden_size 96 --teacher_num_layers 2 --student_use_moe 0 "
        "--teacher_use_moe 0 --from_student_weight full_sft --from_teacher_weight "
        "full_sft --alpha 0.5 --temperature 1.5",
        base="m3_dense64",
        teacher="m3_dense96_teacher",
        kind="distill",
    ),
    "m3_distill_moe_teacher": _case(
        3,
        "trainer/train_distillation.py",
        "--save_dir ../out --save_weight full_dist --learning_rate 1e-4 "
        "--accumulation_steps 1 --save_interval 1000 --max_seq_len 64 --data_path "
        "../dataset/lora_sft.jsonl --student_hidden_size 64 --student_num_layers 2 "
        "--teacher_hidden_size 64 --teacher_num_layers 2 --student_use_moe 0 "
        "--teacher_use_moe 1 --from_student_weight full_sft --from_teacher_weight "
        "full_sft --alpha 0.5 --temperature 1.5",
        base="m3_dense64",
        teacher="m3_moe64",
        kind="distill",
    ),
}

# where each base-weight set goes inside the checkout copy (relative to the checkout root)
WEIGHT_FILES = {
    "m2_dense64": ["out/full_sft_64.pth", "out/rlhf_64.pth"],
    "m2_dense80_teacher": ["out/full_sft_80.pth"],
    "m3_dense64": ["out/full_sft_64.pth"],
    "m3_moe64": ["out/full_sft_64_moe.pth"],
    "m3_dense96_teacher": ["out/full_sft_96.pth"],
}
TIED_DUP = {2: "output.weight", 3: "lm_head.weight"}
TIED_SRC = {2: "tok_embeddings.weight", 3: "model.embed_tokens.weight"}


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def make_inputs(sft_path, out):
    with open(sft_path, encoding="utf-8") as f:
        convs = [json.loads(line) for line in f if line.strip()]
    # LoRA / distillation data: the 40 shared SFT conversations, unchanged.
    shutil.copyfile(sft_path, os.path.join(out, "lora_sft.jsonl"))
    # DPO pairs: conversation i (i < 24); chosen = the conversation (role/content only), cut to
    # its first user/assistant exchange unless i is in MULTI_TURN_KEEP (so that, at max_seq_len
    # 64, most pairs still differ after truncation); rejected = the same with its LAST assistant
    # reply replaced: even i -> the last assistant reply of conversation (i + 7) % 40,
    # odd i -> BAD_REPLIES[(i // 2) % 4].
    lines = []
    for i in range(N_DPO_PAIRS):
        msgs = [{"role": m["role"], "content": m["content"]} for m in convs[i]["conversations"]]
        if i not in MULTI_TURN_KEEP:
            msgs = msgs[:2]
        if i % 2 == 0:
            other = convs[(i + 7) % len(convs)]["conversations"]
            bad = [m for m in other if m["role"] == "assistant"][-1]["content"]
        else:
            bad = BAD_REPLIES[(i // 2) % len(BAD_REPLIES)]
        rej = [dict(m) for m in msgs]
        last = max(j for j, m in enumerate(rej) if m["role"] == "assistant")
        rej[last]["content"] = bad
        lines.append(json.dumps({"chosen": msgs, "rejected": rej}, ensure_ascii=False))
    with open(os.path.join(out, "dpo_pairs.jsonl"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "reason_sft.jsonl"), "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in make_reason_sft(convs)))


def make_reason_sft(convs):
    """Reasoning-format SFT rows for train_distill_reason.py, one per shared SFT conversation i:
    user = its first user turn; assistant =
    "<think>\\n{think}\\n</think>\\n<answer>\\n{answer}\\n</answer>"
    (upstream r1_mix_1024.jsonl's format) with think = REASON_THINKS[i % 8]
    ({topic} = the question without its "（i）" marker) and answer = its first assistant reply.
    Rows i % 5 == 0 (the "你好" rows) drop the marker from the question and keep only the reply's
    first clause, so that at max_seq_len 64 a few rows hold all four tags (and </s>) while the
    others are cut inside or before the tags. Rows i % 10 == 3 / 7 add a literal "<think>" /
    " 2>1" to the question, so tag pieces also occur at prompt (unmasked) positions."""
    rows = []
    for i, conv in enumerate(convs):
        c = conv["conversations"]
        q, a = c[0]["content"], c[1]["content"]
        topic = re.sub(r"（\d+）$", "", q)
        think = REASON_THINKS[i % len(REASON_THINKS)].format(topic=topic)
        if i % 5 == 0:
            q = topic
            a = re.split(r"(?<=[！。，!.,])", a, maxsplit=1)[0]
        if i % 10 == 3:
            q += "（先在<think>里想）"
        if i % 10 == 7:
            q += " 2>1"
        reply = f"<think>\n{think}\n</think>\n<answer>\n{a}\n</answer>"
        rows.append(
            {
                "conversations": [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": reply},
                ]
            }
        )
    return rows


# --------------------------------------------------------------------------------------------
# base weights (made in a subprocess with the reference checkout importable)
# --------------------------------------------------------------------------------------------
def child_make_weights(args):
    import torch

    torch.set_num_threads(1)
    out = args.out
    res = {}
    # ---- MiniMind2: built by the reference's own MiniMindLM (PyTorch default init) ----
    sys.path.insert(0, args.ref2)
    from model.LMConfig import LMConfig
    from model.model import MiniMindLM

    for name, seed, dim in [
        ("m2_dense64", SEED_M2_BASE, 64),
        ("m2_dense80_teacher", SEED_M2_TEACHER, 80),
    ]:
        torch.manual_seed(seed)
        m = MiniMindLM(LMConfig(dim=dim, n_layers=2, max_seq_len=64))
        sd = m.state_dict()  # v2 scripts torch.save(model.state_dict()) in float32
        torch.save(sd, os.path.join(out, f"{name}.pth"))
        res[name] = (
            sd,
            2,
            f"torch.manual_seed({seed}); MiniMindLM(LMConfig(dim={dim}, n_layers=2, "
            f"max_seq_len=64)).state_dict() (reference d9453ed code, PyTorch default init), "
            "float32",
        )
    for k in [k for k in sys.modules if k == "model" or k.startswith("model.")]:
        del sys.modules[k]
    sys.path.remove(args.ref2)
    # ---- minimind-3 ----
    sys.path.insert(0, args.ref3)
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM

    g = np.load(args.m3_golden)

    def from_golden(prefix, use_moe):
        m = MiniMindForCausalLM(
            MiniMindConfig(hidden_size=64, num_hidden_layers=2, use_moe=use_moe)
        )
        keys = list(m.state_dict().keys())
        # HEAD saves {k: v.half().cpu()} for every state-dict key (tied pair -> two equal tensors)
        return {k: torch.from_numpy(g[f"{prefix}/{k}"]).half() for k in keys}

    sd = from_golden("dense/after_pretrain", False)
    torch.save(sd, os.path.join(out, "m3_dense64.pth"))
    res["m3_dense64"] = (
        sd,
        3,
        "float16(minimind3_golden.npz dense/after_pretrain/*), saved as HEAD saves "
        "weights ({k: v.half()}); loaded by the scripts into float32",
    )
    sd = from_golden("moe/init", True)
    torch.save(sd, os.path.join(out, "m3_moe64.pth"))
    res["m3_moe64"] = (
        sd,
        3,
        "float16(minimind3_golden.npz moe/init/*) (hidden 64, 2 layers, MoE 4 experts top-1)",
    )
    torch.manual_seed(SEED_M3_TEACHER)
    m = MiniMindForCausalLM(MiniMindConfig(hidden_size=96, num_hidden_layers=2, use_moe=False))
    sd = {k: v.half().cpu() for k, v in m.state_dict().items()}
    torch.save(sd, os.path.join(out, "m3_dense96_teacher.pth"))
    res["m3_dense96_teacher"] = (
        sd,
        3,
        f"torch.manual_seed({SEED_M3_TEACHER}); MiniMindForCausalLM(MiniMindConfig("
        "hidden_size=96, num_hidden_layers=2)) (HEAD init N(0,0.02)), float16",
    )
    for name, (sd, gen, how) in res.items():
        dup, src = TIED_DUP[gen], TIED_SRC[gen]
        assert torch.equal(sd[dup].float(), sd[src].float())
        arrs = {k: v.numpy() for k, v in sd.items() if k != dup}
        arrs["meta/key_order"] = np.array(list(sd.keys()))
        arrs["meta/tied"] = np.array([f"{dup} == {src} (omitted here; present in the .pth)"])
        arrs["meta/how"] = np.array([how])
        arrs["meta/dtype_in_reference_file"] = np.array([str(next(iter(sd.values())).dtype)])
        np.savez_compressed(os.path.join(out, f"weights_{name}.npz"), **arrs)
        print(
            f"weights {name}: {len(sd)} tensors, "
            f"{sum(v.numel() for k, v in sd.items() if k != dup)} values"
        )


# --------------------------------------------------------------------------------------------
# one case, run inside a fresh subprocess
# --------------------------------------------------------------------------------------------
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
    """exact Python float of a 0-d tensor (float32 value, widened), or None"""
    import torch

    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return float(t.detach().double().item())
    return float(t)


def child_run_case(args):
    import torch

    torch.set_num_threads(1)
    cfg = CASES[args.case]
    gen = cfg["gen"]
    src = args.ref2 if gen == 2 else args.ref3
    work = tempfile.mkdtemp(prefix=f"golden_{args.case}_")
    root = os.path.join(work, "repo")
    shutil.copytree(src, root)
    os.makedirs(os.path.join(root, "out"), exist_ok=True)
    os.makedirs(os.path.join(root, "dataset"), exist_ok=True)
    if gen == 2:
        # train_lora.py saves to f'{save_dir}/lora/...' but never creates that folder
        os.makedirs(os.path.join(root, "out", "lora"), exist_ok=True)
    for wname in [cfg["base"]] + ([cfg["teacher"]] if "teacher" in cfg else []):
        for rel in WEIGHT_FILES[wname]:
            shutil.copyfile(os.path.join(args.out, f"{wname}.pth"), os.path.join(root, rel))
    for fn in ["lora_sft.jsonl", "dpo_pairs.jsonl", "reason_sft.jsonl"]:
        shutil.copyfile(os.path.join(args.out, fn), os.path.join(root, "dataset", fn))

    script = os.path.join(root, cfg["script"])
    cwd = os.path.join(root, cfg["cwd"]) if cfg["cwd"] else root
    os.chdir(cwd)
    sys.path.insert(0, root)
    sys.argv = [os.path.basename(script)] + cfg["argv"]

    # ---------------- wrappers (no reference file is edited) ----------------
    rec = dict(loss=[], lr=[], epoch=[], step=[], clip_norm=[], clip_after_micro=[])
    extra = {}  # name -> list of per-micro-step values
    trace_rec = []  # per call of the script's loss function: dict of locals
    state = {"optimizer": None, "first": None}

    def push(name, v):
        extra.setdefault(name, []).append(v)

    orig_backward = torch.Tensor.backward

    def backward(self, *a, **k):
        fr = sys._getframe(1)
        L, G = fr.f_locals, fr.f_globals
        rec["loss"].append(_f(self))
        opt = G.get("optimizer")
        rec["lr"].append(float(opt.param_groups[-1]["lr"]) if opt is not None else float("nan"))
        rec["epoch"].append(int(L.get("epoch", -1)))
        rec["step"].append(int(L.get("step", -1)))
        if state["first"] is None:  # weights as the script holds them before any update
            model = G["model"]
            state["first"] = {n: p.detach().clone().numpy() for n, p in model.named_parameters()}
            state["first_trainable"] = sorted(
                n for n, p in model.named_parameters() if p.requires_grad
            )
        kind = cfg["kind"]
        if gen == 2:
            if kind in ("lora", "distill"):
                push("batch_X", L["X"].numpy().copy())
                push("batch_Y", L["Y"].numpy().copy())
                push("batch_loss_mask", L["loss_mask"].numpy().copy())
            if kind == "reason":
                # batch_loss_mask (the dataset's mask) was taken at the script's torch.isin call,
                # before `loss_mask[sp_ids] = 10` overwrote it in place (see isin below)
                push("batch_X", L["X"].numpy().copy())
                push("batch_Y", L["Y"].numpy().copy())
                push("weighted_loss_mask", L["loss_mask"].numpy().copy())
                push("loss_mask_sum", int(L["loss_mask_sum"]))
                push("sp_ids", L["sp_ids"].numpy().copy())
                push("aux_loss", _f(L["res"].aux_loss))
                ids = (
                    L["start_of_think_ids"]
                    + L["end_of_think_ids"]
                    + L["start_of_answer_ids"]
                    + L["end_of_answer_ids"]
                )
                state.setdefault("special_ids", ids)
                assert state["special_ids"] == ids
                state.setdefault(
                    "special_ids_split",
                    [
                        len(L[n])
                        for n in (
                            "start_of_think_ids",
                            "end_of_think_ids",
                            "start_of_answer_ids",
                            "end_of_answer_ids",
                        )
                    ],
                )
                state.setdefault("aux_loss_type", type(L["res"].aux_loss).__name__)
            if kind == "dpo":
                push("batch_x", L["x"].numpy().copy())
                push("batch_y", L["y"].numpy().copy())
                push("batch_mask", L["mask"].numpy().copy())
            if kind == "distill":
                push("ce_loss", _f(L["ce_loss"]))
                push("distill_loss", _f(L["distill_loss"]))
        else:
            if kind in ("lora", "distill"):
                push("batch_input_ids", L["input_ids"].numpy().copy())
                push("batch_labels", L["labels"].numpy().copy())
            if kind == "lora":
                push("ce_loss", _f(L["res"].loss))
                push("aux_loss", _f(L["res"].aux_loss))
            if kind == "dpo":
                push("batch_x", L["x"].numpy().copy())
                push("batch_y", L["y"].numpy().copy())
                push("batch_mask", L["mask"].numpy().copy())
                push("dpo_loss", _f(L["dpo_loss_val"]))
                push("aux_loss", _f(L["outputs"].aux_loss))
            if kind == "distill":
                push("ce_loss_raw", _f(L["ce_loss_raw"]))
                push("ce_loss", _f(L["ce_loss"]))
                push("distill_loss", _f(L["distill_loss"]))
                push("aux_loss", _f(L["res"].aux_loss))
        return orig_backward(self, *a, **k)

    torch.Tensor.backward = backward

    orig_clip = torch.nn.utils.clip_grad_norm_

    def clip(*a, **k):
        n = orig_clip(*a, **k)
        rec["clip_norm"].append(_f(n))
        rec["clip_after_micro"].append(len(rec["loss"]))
        return n

    torch.nn.utils.clip_grad_norm_ = clip

    orig_isin = torch.isin

    def isin(*a, **k):
        fr = sys._getframe(1)
        if fr.f_code.co_name == "train_epoch" and fr.f_code.co_filename == script:
            # train_distill_reason.py: sp_ids = torch.isin(Y.view(-1), torch.tensor(ids)); the
            # frame's loss_mask is still the dataset's mask here
            push("batch_loss_mask", fr.f_locals["loss_mask"].numpy().copy())
            push("isin_test_elements", a[1].numpy().copy())
        return orig_isin(*a, **k)

    if cfg["kind"] == "reason":
        torch.isin = isin

    target_names = {"dpo_loss", "distillation_loss", "distillation_loss_fn"}

    def local_tracer(frame, event, arg):
        if event == "return":
            d = {}
            for k, v in frame.f_locals.items():
                if isinstance(v, torch.Tensor):
                    d[k] = v.detach().double().numpy().copy()
                elif isinstance(v, (int, float)):
                    d[k] = v
            d["__return__"] = _f(arg) if isinstance(arg, torch.Tensor) else None
            trace_rec.append(d)
        return local_tracer

    def global_tracer(frame, event, arg):
        if (
            event == "call"
            and frame.f_code.co_name in target_names
            and frame.f_code.co_filename == script
        ):
            return local_tracer
        return None

    if gen == 2 and "config_map" in cfg:
        import model.LMConfig as lmc

        Orig = lmc.LMConfig
        cmap = cfg["config_map"]

        class TinyLMConfig(Orig):
            def __init__(self, dim=512, n_layers=8, max_seq_len=8192, **kw):
                key = f"{dim}/{n_layers}"
                if key in cmap:
                    dim, n_layers, max_seq_len = cmap[key]
                super().__init__(dim=dim, n_layers=n_layers, max_seq_len=max_seq_len, **kw)

        lmc.LMConfig = TinyLMConfig

    tee = Tee(sys.__stdout__)
    import runpy

    old_stdout = sys.stdout
    sys.stdout = tee
    sys.settrace(global_tracer)
    try:
        g = runpy.run_path(script, run_name="__main__")
    finally:
        sys.settrace(None)
        sys.stdout = old_stdout
        torch.Tensor.backward = orig_backward
        torch.nn.utils.clip_grad_norm_ = orig_clip
        torch.isin = orig_isin

    # ---------------- collect ----------------
    out = {}
    out["meta/case"] = np.array([args.case])
    out["meta/reference_commit"] = np.array([REF2_COMMIT if gen == 2 else REF3_COMMIT])
    out["meta/script"] = np.array([cfg["script"]])
    out["meta/command"] = np.array(
        [
            "cd "
            + (cfg["cwd"] or ".")
            + " && python "
            + os.path.basename(script)
            + " "
            + " ".join(cfg["argv"])
        ]
    )
    out["meta/argv"] = np.array(sys.argv)
    out["meta/base_weights_file"] = np.array([f"weights_{cfg['base']}.npz"])
    if "teacher" in cfg:
        out["meta/teacher_weights_file"] = np.array([f"weights_{cfg['teacher']}.npz"])
    out["meta/seeds"] = np.array(
        [
            "reference: v2 torch.manual_seed(1337) at start; HEAD setup_seed(42) at start and "
            "setup_seed(42+epoch) "
            "before each epoch's torch.randperm",
            f"maker: base weights m2_dense64 seed {SEED_M2_BASE}, "
            f"m2_dense80_teacher seed {SEED_M2_TEACHER}, "
            f"m3_dense96_teacher seed {SEED_M3_TEACHER}; "
            "m3_dense64/m3_moe64 from minimind3_golden.npz",
        ]
    )
    out["meta/wrapping"] = np.array(
        [
            "torch.Tensor.backward wrapped (records value + caller frame locals)",
            "torch.nn.utils.clip_grad_norm_ wrapped (records returned total norm)",
            "sys.settrace on the script's dpo_loss/distillation_loss[_fn] "
            "(records locals at return)",
            "stdout tee",
        ]
        + (
            [
                "torch.isin wrapped (records the caller's loss_mask before the in-place "
                "weighting, and the special ids it is given)"
            ]
            if cfg["kind"] == "reason"
            else []
        )
        + (
            [
                "model.LMConfig.LMConfig replaced by a subclass mapping "
                + json.dumps(cfg["config_map"])
            ]
            if "config_map" in cfg
            else []
        )
    )
    import datasets  # noqa
    import transformers

    out["meta/versions"] = np.array(
        [
            f"python {sys.version.split()[0]}",
            f"torch {torch.__version__}",
            f"transformers {transformers.__version__}",
            f"datasets {datasets.__version__}",
            f"numpy {np.__version__}",
        ]
    )
    out["log_lines"] = np.array("".join(tee.buf).splitlines())
    out["loss_backward"] = np.array(rec["loss"], dtype=np.float64)
    out["lr"] = np.array(rec["lr"], dtype=np.float64)
    out["epoch"] = np.array(rec["epoch"], dtype=np.int64)
    out["step"] = np.array(rec["step"], dtype=np.int64)
    out["clip_total_norm"] = np.array(rec["clip_norm"], dtype=np.float64)
    out["clip_after_micro"] = np.array(rec["clip_after_micro"], dtype=np.int64)
    for k, v in extra.items():
        out[k] = np.stack(v) if isinstance(v[0], np.ndarray) else np.array(v, dtype=np.float64)
    if cfg["kind"] == "reason":
        out["loss_mask_sum"] = np.array(extra["loss_mask_sum"], dtype=np.int64)
        # the ids passed to torch.isin are the same every step: keep one copy
        te = out.pop("isin_test_elements")
        assert (te == te[0]).all() and te[0].tolist() == state["special_ids"]
        out["special_ids"] = np.array(state["special_ids"], dtype=np.int64)
        out["special_ids_split"] = np.array(state["special_ids_split"], dtype=np.int64)
        tok = g["tokenizer"]
        out["special_ids_pieces"] = np.array([tok.decode([i]) for i in state["special_ids"]])
        out["meta/aux_loss_type"] = np.array([state["aux_loss_type"]])
        out["check/scaler_enabled"] = np.array(bool(g["scaler"].is_enabled()))
        out["check/ctx"] = np.array([type(g["ctx"]).__name__])

    model = g["model"]
    base_npz = np.load(os.path.join(args.out, f"weights_{cfg['base']}.npz"))
    # check: what the script trained from == the base weights (as float32)
    first = state["first"]
    md = 0.0
    for n, v in first.items():
        if "lora" in n:
            continue
        bn = n if n in base_npz.files else TIED_SRC[gen]
        md = max(md, float(np.abs(v - base_npz[bn].astype(np.float32)).max()))
    out["check/start_vs_base_maxabs"] = np.array(md)
    out["trainable_params"] = np.array(state["first_trainable"])

    if cfg["kind"] == "lora":
        for n, v in first.items():
            if "lora" in n:
                out[f"lora_init/{n}"] = v
        for n, p in model.named_parameters():
            if "lora" in n:
                out[f"lora_final/{n}"] = p.detach().numpy().copy()
        # the reference's own saved adapter file
        if gen == 2:
            saved = os.path.join(root, "out", "lora", "lora_golden_64.pth")
        else:  # minimind-3 names MoE files with a _moe suffix
            moe = "_moe" if "--use_moe 1" in " ".join(cfg["argv"]) else ""
            saved = os.path.join(root, "out", f"lora_golden_64{moe}.pth")
        sd = torch.load(saved, map_location="cpu")
        for k, v in sd.items():
            out[f"lora_saved/{k}"] = v.numpy().copy()
        out["meta/lora_saved_dtype"] = np.array([str(next(iter(sd.values())).dtype)])
        shutil.copyfile(saved, os.path.join(args.out, f"{args.case}_saved_adapter.pth"))
    else:
        dup = TIED_DUP[gen]
        emb = TIED_SRC[gen]
        for n, p in model.state_dict().items():
            if n == dup:
                continue
            a = p.detach().numpy()
            if n == emb:  # large: keep statistics and a few rows only
                out[f"final_stats/{n}"] = np.array(
                    [a.astype(np.float64).sum(), (a.astype(np.float64) ** 2).sum()]
                )
                out[f"final_rows/{n}"] = a[[0, 1, 2, 234, 1000, 6399]].copy()
            else:
                out[f"final/{n}"] = a.copy()
        out["final_rows_index"] = np.array([0, 1, 2, 234, 1000, 6399])
        if cfg["kind"] == "reason":
            # the script's own checkpoint, written after the last update of the last epoch
            sd = torch.load(os.path.join(root, "out", "reason_64.pth"), map_location="cpu")
            fin = model.state_dict()
            assert list(sd) == list(fin)
            out["check/saved_vs_final_maxabs"] = np.array(
                max(float((sd[k] - fin[k]).abs().max()) for k in sd)
            )

    if trace_rec:
        keys = sorted(set.intersection(*[set(d) for d in trace_rec]))
        for k in keys:
            if k == "__return__":
                out["lossfn/return"] = np.array([d[k] for d in trace_rec], dtype=np.float64)
                continue
            vals = [d[k] for d in trace_rec]
            if isinstance(vals[0], np.ndarray):
                if vals[0].ndim <= 1 and all(v.shape == vals[0].shape for v in vals):
                    out[f"lossfn/{k}"] = np.stack(vals)
                # large per-token tensors (logits, per-token log-probs) are not stored
            else:
                out[f"lossfn/{k}"] = np.array(vals, dtype=np.float64)

    if cfg["kind"] == "dpo":
        # DERIVED by this maker (float64) from the reference's own per-sequence aggregates;
        # the reference itself never computes rewards.
        if gen == 2:
            names = ("chosen_probs", "chosen_ref_probs", "reject_probs", "reject_ref_probs")
        else:
            names = (
                "chosen_policy_log_probs",
                "chosen_ref_log_probs",
                "reject_policy_log_probs",
                "reject_ref_log_probs",
            )
        cp, cr, rp, rr = (out[f"lossfn/{n}"] for n in names)
        beta = out["lossfn/beta"][:, None]
        out["derived/chosen_rewards"] = beta * (cp - cr)
        out["derived/rejected_rewards"] = beta * (rp - rr)
        out["derived/reward_margin"] = (
            out["derived/chosen_rewards"] - out["derived/rejected_rewards"]
        )
        out["derived/reward_accuracy"] = (
            out["derived/chosen_rewards"] > out["derived/rejected_rewards"]
        ).mean(1)

    written = []
    for dp, _dirs, fns in os.walk(work):
        for fn in fns:
            if fn.endswith(".pth"):
                p = os.path.join(dp, fn)
                written.append(os.path.relpath(p, root))
    out["meta/pth_files_in_layout_after_run"] = np.array(sorted(written))
    path = os.path.join(args.out, f"{args.case}.npz")
    np.savez_compressed(path, **out)
    print(
        f"[maker] wrote {path} ({os.path.getsize(path)} bytes), {len(rec['loss'])} micro-steps, "
        f"{len(rec['clip_norm'])} updates"
    )
    os.chdir("/")
    shutil.rmtree(work)


# --------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref2", required=True, help="checkout of jingyaogong/minimind at d9453ed")
    ap.add_argument(
        "--ref3", required=True, help="checkout of jingyaogong/minimind at d65ef2c (HEAD)"
    )
    ap.add_argument("--out", required=True)
    ap.add_argument("--sft", default=DEFAULT_SFT)
    ap.add_argument("--m3-golden", default=DEFAULT_M3_GOLDEN)
    ap.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter for the reference runs "
        "(needs torch, transformers 4.x, datasets, scikit-learn)",
    )
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--_child", default=None)
    ap.add_argument("--case", default=None)
    args = ap.parse_args()
    args.out = os.path.abspath(args.out)
    args.ref2 = os.path.abspath(args.ref2)
    args.ref3 = os.path.abspath(args.ref3)
    if args._child == "weights":
        return child_make_weights(args)
    if args._child == "case":
        return child_run_case(args)

    os.makedirs(args.out, exist_ok=True)
    make_inputs(args.sft, args.out)
    hf_home = tempfile.mkdtemp(prefix="golden_hf_home_")
    env = dict(
        os.environ,
        HF_HOME=hf_home,
        PYTHONHASHSEED="0",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        CUDA_VISIBLE_DEVICES="",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        WANDB_MODE="disabled",
    )
    common = [
        args.python,
        os.path.abspath(__file__),
        "--ref2",
        args.ref2,
        "--ref3",
        args.ref3,
        "--out",
        args.out,
        "--sft",
        args.sft,
        "--m3-golden",
        args.m3_golden,
    ]
    subprocess.run(common + ["--_child", "weights"], check=True, env=env)
    for case in args.cases.split(","):
        print(f"===== {case} =====", flush=True)
        subprocess.run(common + ["--_child", "case", "--case", case], check=True, env=env)
    shutil.rmtree(hf_home, ignore_errors=True)
    # the .pth base weights were only needed to build the layouts; the npz copies are kept
    for name in WEIGHT_FILES:
        p = os.path.join(args.out, f"{name}.pth")
        if os.path.exists(p):
            os.remove(p)


if __name__ == "__main__":
    main()
