"""GRPO speed and memory side by side: minimind-3's own `trainer/train_grpo.py` (run unmodified
from a checkout) against `minimind-jax grpo`, same data, model shape, B, G and max_gen_len, on
this machine's CPU.

    PYTHONPATH=. python benchmarks/rl_bench.py --ref3 /tmp/rl_ref3 \
        --ref_python /tmp/rs_refenv/bin/python --hidden_size 64 --num_hidden_layers 2 \
        --max_gen_len 64 --steps 4 --data fixture --out /tmp/rl_bench_small
    # the scripts' defaults (hidden 768, 8 layers, B 2, G 6, max_gen_len 1024), two steps:
    PYTHONPATH=. python benchmarks/rl_bench.py --ref3 /tmp/rl_ref3 \
        --ref_python /tmp/rs_refenv/bin/python --steps 2 --data uniform
    # ours alone (no checkout needed): --skip_reference

Layout (as tests/golden_makers/make_rl_goldens.py builds it, one copy per side): the checkout's
dataset/ model/ trainer/, `out/full_sft_{h}.pth` (random weights: HEAD's own
`MiniMindForCausalLM` init, seed 0, saved float16; our own init where there is no checkout),
`dataset/rlaif.jsonl` (B x steps prompts) and the stub reward model
(tests/fixtures/rl/stub_reward_model). Both sides get the same command line from `trainer/`
(`--device cpu --dtype float32 --num_workers 0`, i.e. the script's effective CPU settings:
its autocast is off on CPU; ours adds `--recipe minimind3`) and run one after the other, each
in a fresh child process, with all of this CPU's threads.

`--data fixture`: the first B x steps rows of tests/fixtures/rl/rlaif.jsonl (prompt widths
differ per batch, so rows are left-padded; our sampler pads prompts to a power of two and the
rows to width buckets, so a new width compiles again only when it leaves its bucket).
`--data uniform`: B x steps prompts of one token width (a system message, so no system prompt
is injected, and all open thinking), so every step has the same shapes: our steady state
without recompiles, and the reference's attention takes its
scaled_dot_product_attention path (no padding).

Measured in each child (hooks installed before the run; nothing in either trainer is edited):
- reference: `TorchRolloutEngine.rollout` (generate + the old log-probs forward + decode),
  `MiniMindForCausalLM.generate`, `loss.backward()`, and the update (clip_grad_norm_ to the
  scheduler's step) in `grpo_train_epoch`;
- ours: `SamplingEngine.rollout` (sampling + decode), its jitted `_sample`, the old log-probs
  program, the stage's batch producer and the train step (each waited for: the rollout needs the
  previous step's params anyway, so this costs no overlap), plus JAX's compile time per section
  (jax.monitoring's /jax/core/compile/* events; a fresh, empty persistent compilation cache).

Definitions (the same for both sides):
- generated tokens of a step = N x R, N = B x G rows, R = the completion width = the decode
  steps taken (both samplers fill a finished row with EOS and stop when every row is done);
- rollout tokens/s = generated tokens / rollout seconds, the rollout being what the reference's
  engine does (sampling + old log-probs + decode); `sample tok/s` counts the sampling alone;
- whole step = rollout start -> the optimizer update done (rewards, advantages, policy and
  reference forward, loss, backward, clip, AdamW, LR step; not logging or saving);
- first step: step 1 (our compilation included), steady: the mean over steps 2..S;
- peak RSS: the child's ru_maxrss (os.wait4), i.e. the whole process, setup included; also
  per phase (VmHWM restarted at each step's start through /proc/self/clear_refs): the setup
  (process start -> first rollout), the first step and the steady steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
RL_FIXTURES = os.path.join(FIXTURES, "rl")
TOKENIZER_DIR = os.path.join(FIXTURES, "minimind3_tokenizer")
REFERENCE_COMMIT = "d65ef2c"


# ---------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------
def script_argv(args) -> list[str]:
    """train_grpo.py's flags for this benchmark (both sides)."""
    return ["--save_dir", "../out", "--save_weight", "grpo", "--epochs", "1",
            "--batch_size", str(args.batch_size), "--device", "cpu", "--dtype", "float32",
            "--num_workers", "0", "--hidden_size", str(args.hidden_size),
            "--num_hidden_layers", str(args.num_hidden_layers),
            "--max_seq_len", str(args.max_seq_len), "--max_gen_len", str(args.max_gen_len),
            "--num_generations", str(args.num_generations),
            "--data_path", "../dataset/rlaif.jsonl", "--from_weight", "full_sft",
            "--reward_model_path", "../stub_reward_model", "--rollout_engine", "torch",
            "--loss_type", args.loss_type]


def fixture_rows(n: int) -> list[str]:
    with open(os.path.join(RL_FIXTURES, "rlaif.jsonl"), encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    if n > len(lines):
        raise SystemExit(f"--data fixture holds {len(lines)} prompts; B x steps = {n}")
    return lines[:n]


def uniform_rows(n: int) -> list[str]:
    """n prompts of one token width: a system message, then `第{i}个问题：...` (i one digit-like
    token run each; checked with the tokenizer)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(TOKENIZER_DIR, "tokenizer.json"))
    rows, widths = [], set()
    for i in range(n):
        user = f"第{i + 1}个问题：请用三句话介绍一下你自己，以及你能做什么。"
        widths.add(len(tok.encode(user, add_special_tokens=False).ids))
        rows.append(json.dumps({"conversations": [
            {"role": "system", "content": "You are a careful assistant."},
            {"role": "user", "content": user},
            {"role": "assistant", "content": "无"}]}, ensure_ascii=False))
    if len(widths) != 1:
        raise SystemExit(f"uniform prompts differ in width: {sorted(widths)}")
    return rows


def make_layout(root: str, ref3: str | None, rows: list[str]) -> None:
    os.makedirs(root)
    if ref3:
        for d in ("dataset", "model", "trainer"):
            shutil.copytree(os.path.join(ref3, d), os.path.join(root, d))
    else:  # ours needs only the tokenizer (model/), the data and the run folder's parent
        os.makedirs(os.path.join(root, "trainer"))
        os.makedirs(os.path.join(root, "dataset"))
        shutil.copytree(TOKENIZER_DIR, os.path.join(root, "model"))
    os.makedirs(os.path.join(root, "out"))
    with open(os.path.join(root, "dataset", "rlaif.jsonl"), "w", encoding="utf-8") as f:
        f.write("\n".join(rows) + "\n")
    shutil.copytree(os.path.join(RL_FIXTURES, "stub_reward_model"),
                    os.path.join(root, "stub_reward_model"))


def child_env(work: str, side: str) -> dict:
    env = dict(os.environ, HF_HOME=os.path.join(work, f"hf_home_{side}"), PYTHONHASHSEED="0",
               TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    if side == "ours":  # a first run's compilations: an empty persistent cache
        env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(work, "jax_cache")
        env["JAX_PLATFORMS"] = "cpu"
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def cpu_busy_seconds() -> float:
    """Seconds all CPUs spent busy since boot (/proc/stat; 0 where unreadable)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_child(cmd: list[str], env: dict, cwd: str, log_path: str) -> dict:
    """Run one side; its wall time, CPU time, peak RSS and the CPU time of everything else."""
    busy0, t0 = cpu_busy_seconds(), time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall, busy = time.perf_counter() - t0, cpu_busy_seconds() - busy0
    code = os.waitstatus_to_exitcode(status)
    own_cpu = usage.ru_utime + usage.ru_stime
    if code != 0:
        with open(log_path) as f:
            tail = f.read()[-4000:]
        raise SystemExit(f"{cmd[:3]}... exited with {code}; the end of {log_path}:\n{tail}")
    return {"wall_s": wall, "cpu_s": own_cpu, "peak_rss_mib": usage.ru_maxrss / 1024,
            "other_cpu_cores": max(busy - own_cpu, 0.0) / wall if busy else None,
            "loadavg_after": os.getloadavg()[0]}


def summarise(result: dict) -> dict:
    steps = result["steps"]
    steady = steps[1:] or steps

    def mean(key, rows):
        vals = [s[key] for s in rows if s.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    tokens = [s["tokens"] for s in steady]
    return {
        "P": [s["P"] for s in steps], "R": [s["R"] for s in steps], "N": steps[0]["N"],
        "rollout_tok_s": sum(tokens) / sum(s["rollout_s"] for s in steady),
        "sample_tok_s": sum(tokens) / sum(s["sample_s"] for s in steady),
        "step_s": mean("step_s", steady), "first_step_s": steps[0]["step_s"],
        "first_rollout_s": steps[0]["rollout_s"], "rollout_s": mean("rollout_s", steady),
        "sample_s": mean("sample_s", steady), "old_logps_s": mean("old_logps_s", steady),
        "update_s": mean("update_s", steady), "backward_s": mean("backward_s", steady),
        "step_cpu_s": mean("step_cpu_s", steady), "first_step_cpu_s": steps[0]["step_cpu_s"],
        "compile_first_s": steps[0].get("compile_s"), "compile_steady_s": mean("compile_s",
                                                                               steady),
        "setup_s": result["setup_s"], "steady_steps": len(steady),
        "setup_peak_mib": result["setup_mem_kib"].get("VmHWM", 0) / 1024,
        "first_step_peak_mib": steps[0].get("vmhwm", 0) / 1024,
        "steady_step_peak_mib": max(s.get("vmhwm", 0) for s in steady) / 1024,
    }


def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def table(shape: str, ref: dict | None, ours: dict) -> str:
    head = ("| shape | side | P / R per step | rollout tok/s | sample tok/s | step s (steady) "
            "| first step s | compile s (first / steady) | peak RSS MiB |")
    lines = [head, "|" + "---|" * 9]
    for side, s in (("reference", ref), ("minimind-jax", ours)):
        if s is None:
            continue
        pr = ", ".join(f"{p}/{r}" for p, r in zip(s["P"], s["R"], strict=True))
        lines.append(f"| {shape} | {side} | {pr} | {fmt(s['rollout_tok_s'], 1)} | "
                     f"{fmt(s['sample_tok_s'], 1)} | {fmt(s['step_s'])} | "
                     f"{fmt(s['first_step_s'])} | {fmt(s['compile_first_s'])} / "
                     f"{fmt(s['compile_steady_s'])} | {fmt(s['peak_rss_mib'], 0)} |")
    if ref is not None:
        lines.append(f"| {shape} | ours vs ref | | "
                     f"x{ours['rollout_tok_s'] / ref['rollout_tok_s']:.2f} | "
                     f"x{ours['sample_tok_s'] / ref['sample_tok_s']:.2f} | "
                     f"x{ref['step_s'] / ours['step_s']:.2f} faster | "
                     f"x{ref['first_step_s'] / ours['first_step_s']:.2f} faster | | "
                     f"{ours['peak_rss_mib'] / ref['peak_rss_mib']:.2f} of ref |")
    return "\n".join(lines)


def breakdown(side: str, s: dict) -> str:
    parts = [f"rollout {fmt(s['rollout_s'])} s (sampling {fmt(s['sample_s'])}"]
    if s.get("old_logps_s") is not None:
        parts[-1] += f", old log-probs {fmt(s['old_logps_s'])}"
    parts[-1] += ")"
    if s.get("backward_s") is not None:
        parts.append(f"backward {fmt(s['backward_s'])} s")
    parts.append(f"{'update' if side == 'reference' else 'train step (fwd+bwd+AdamW)'} "
                 f"{fmt(s['update_s'])} s")
    return (f"  {side}: steady step {fmt(s['step_s'])} s ({fmt(s['step_cpu_s'])} CPU s) = "
            + ", ".join(parts) +
            f"; setup {fmt(s['setup_s'])} s; peak RSS MiB: setup {fmt(s['setup_peak_mib'], 0)}, "
            f"first step {fmt(s['first_step_peak_mib'], 0)}, steady steps "
            f"{fmt(s['steady_step_peak_mib'], 0)}; child wall {fmt(s['wall_s'])} s, CPU "
            f"{fmt(s['cpu_s'])} s; other processes {fmt(s['other_cpu_cores'])} cores")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref3", default="/tmp/rl_ref3",
                    help=f"checkout of jingyaogong/minimind at {REFERENCE_COMMIT}")
    ap.add_argument("--ref_python", default="/tmp/rs_refenv/bin/python",
                    help="interpreter with torch, transformers 4.x and datasets")
    ap.add_argument("--skip_reference", action="store_true", help="run ours alone")
    ap.add_argument("--hidden_size", type=int, default=768)
    ap.add_argument("--num_hidden_layers", type=int, default=8)
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--num_generations", type=int, default=6)
    ap.add_argument("--max_gen_len", type=int, default=1024)
    ap.add_argument("--max_seq_len", type=int, default=768)
    ap.add_argument("--loss_type", default="cispo", choices=("cispo", "grpo"))
    ap.add_argument("--steps", type=int, default=2, help="steps per side (B x steps prompts)")
    ap.add_argument("--data", choices=("fixture", "uniform"), default="uniform")
    ap.add_argument("--out", default=None, help="folder for results.json and the child logs")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--ours_flags", default="",
                    help="extra flags for minimind-jax grpo only, e.g. '--remat'")
    ap.add_argument("--xla_memory", action="store_true",
                    help="ours: also record XLA's memory analysis of the compiled train step "
                         "(temp / argument / output bytes; one more lowering)")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args._child == "weights":
        return child_weights(args)
    if args._child == "ref":
        return child_ref(args, rest)
    if args._child == "ours":
        return child_ours(args, rest)

    work = tempfile.mkdtemp(prefix="rl_bench_")
    out = args.out or work
    os.makedirs(out, exist_ok=True)
    n = args.batch_size * args.steps
    rows = fixture_rows(n) if args.data == "fixture" else uniform_rows(n)
    shape = (f"h{args.hidden_size} L{args.num_hidden_layers} B{args.batch_size} "
             f"G{args.num_generations} gen{args.max_gen_len} {args.data}")
    sides = ["ours"] if args.skip_reference else ["ref", "ours"]
    weights = os.path.join(work, f"full_sft_{args.hidden_size}.pth")
    have_ref = os.path.exists(args.ref_python) and os.path.isdir(args.ref3 or "")
    if args.skip_reference and not have_ref:
        ours_weights(args, weights)
    else:
        subprocess.run([args.ref_python, os.path.abspath(__file__), "--_child", "weights",
                        "--root", args.ref3, "--result", weights,
                        "--hidden_size", str(args.hidden_size),
                        "--num_hidden_layers", str(args.num_hidden_layers)],
                       check=True, env=child_env(work, "ref"))
    argv = script_argv(args)
    print(f"[rl_bench] {shape}: {args.steps} steps per side; argv: {' '.join(argv)}",
          flush=True)
    summary = {}
    for side in sides:
        root = os.path.join(work, side)
        make_layout(root, args.ref3 if have_ref else None, rows)
        shutil.copyfile(weights, os.path.join(root, "out", os.path.basename(weights)))
        result_path = os.path.join(work, f"{side}.json")
        python = args.ref_python if side == "ref" else sys.executable
        cmd = [python, os.path.abspath(__file__), "--_child", side, "--root", root,
               "--result", result_path] + (["--xla_memory"] if args.xla_memory else []) + [
            "--"] + argv + (args.ours_flags.split() if side == "ours" else [])
        print(f"[rl_bench] {side}: loadavg {os.getloadavg()[0]:.2f} before", flush=True)
        proc = run_child(cmd, child_env(work, side), os.path.join(root, "trainer"),
                         os.path.join(out, f"{side}.log"))
        with open(result_path) as f:
            result = json.load(f)
        summary[side] = {**summarise(result), **proc, "raw": result}
        print(f"[rl_bench] {side}: done in {proc['wall_s']:.1f} s, peak RSS "
              f"{proc['peak_rss_mib']:.0f} MiB", flush=True)
    ref = summary.get("ref")
    text = table(shape, ref, summary["ours"])
    print("\n" + text)
    for side in sides:
        print(breakdown("reference" if side == "ref" else "minimind-jax", summary[side]))
    meta = {"shape": shape, "argv": argv, "ours_flags": args.ours_flags, "steps": args.steps,
            "cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "reference_commit": REFERENCE_COMMIT}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "table": text, **summary}, f, indent=1)
    print(f"[rl_bench] results: {os.path.join(out, 'results.json')}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def ours_weights(args, path: str) -> None:
    """Our own minimind-3 init, written as the script's float16 state dict."""
    import numpy as np

    sys.path.insert(0, REPO)  # this checkout's package, not another installed one
    from minimind_jax.model.config import arch_defaults
    from minimind_jax.model.transformer import init_params
    from minimind_jax.model.weights import save_state_dict, state_dict_from_params

    config = arch_defaults("minimind3").replace(dim=args.hidden_size,
                                                n_layers=args.num_hidden_layers)
    sd = state_dict_from_params(init_params(config, 0), config)
    save_state_dict({k: v.astype(np.float16) for k, v in sd.items()}, path)


# ---------------------------------------------------------------------------------------------
# children
# ---------------------------------------------------------------------------------------------
def _memory_kib() -> dict:
    """VmRSS and VmHWM of this process (KiB)."""
    found = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    found[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        pass
    return found


def _reset_peak() -> None:
    """Restart VmHWM from the current RSS (Linux: 5 > /proc/self/clear_refs), so that the
    VmHWM read at a step's end is that step's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _write(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f)


def child_weights(args) -> None:
    """Random weights of the benchmarked shape from HEAD's model file, saved float16."""
    import torch

    sys.path.insert(0, args.root)
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM

    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=args.hidden_size,
                                               num_hidden_layers=args.num_hidden_layers))
    torch.save({k: v.half() for k, v in model.state_dict().items()}, args.result)


def child_ref(args, argv: list[str]) -> None:
    """train_grpo.py via runpy from trainer/, with timing hooks."""
    t_start = time.perf_counter()
    import runpy

    import torch

    root = args.root
    script = os.path.join(root, "trainer", "train_grpo.py")
    sys.path.insert(0, root)
    sys.argv = ["train_grpo.py"] + [a for a in argv if a != "--"]
    import model.model_minimind as model_mod
    import trainer.rollout_engine as rollout_mod

    steps, cur = [], {}

    def caller_is_epoch(depth=2):
        return sys._getframe(depth).f_code.co_name == "grpo_train_epoch"

    orig_rollout = rollout_mod.TorchRolloutEngine.rollout
    orig_generate = model_mod.MiniMindForCausalLM.generate
    orig_backward = torch.Tensor.backward
    orig_clip = torch.nn.utils.clip_grad_norm_
    orig_sched_step = torch.optim.lr_scheduler.LRScheduler.step

    def rollout(self, prompt_ids, attention_mask, num_generations, max_new_tokens,
                temperature=0.8):
        cur.clear()
        cur["step_start_rss_kib"] = _memory_kib().get("VmRSS")
        _reset_peak()
        cur["t0"], cur["t_cpu0"] = time.perf_counter(), time.process_time()
        res = orig_rollout(self, prompt_ids, attention_mask, num_generations, max_new_tokens,
                           temperature)
        cur["rollout_s"] = time.perf_counter() - cur["t0"]
        N, R = res.completion_ids.shape
        is_eos = res.completion_ids == self.tokenizer.eos_token_id
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full((N,), R - 1))
        cur.update(N=int(N), R=int(R), P=int(prompt_ids.shape[1]), tokens=int(N * R),
                   tokens_to_eos=int((first + 1).sum()))
        return res

    def generate(self, *a, **k):
        t0 = time.perf_counter()
        out = orig_generate(self, *a, **k)
        cur["sample_s"] = cur.get("sample_s", 0.0) + time.perf_counter() - t0
        return out

    def backward(self, *a, **k):
        t0 = time.perf_counter()
        out = orig_backward(self, *a, **k)
        if caller_is_epoch():
            cur["backward_s"] = time.perf_counter() - t0
            cur["t_backward_end"] = time.perf_counter()
        return out

    def clip(*a, **k):
        if caller_is_epoch():
            cur["t_update0"] = time.perf_counter()
        return orig_clip(*a, **k)

    def sched_step(self, *a, **k):
        out = orig_sched_step(self, *a, **k)
        if caller_is_epoch() and "t0" in cur:
            t = time.perf_counter()
            cur["update_s"] = t - cur.get("t_update0", cur["t_backward_end"])
            cur["step_s"] = t - cur.pop("t0")
            cur["step_cpu_s"] = time.process_time() - cur["t_cpu0"]
            cur.update({k.lower(): v for k, v in _memory_kib().items()})
            steps.append({k: v for k, v in cur.items() if not k.startswith("t_")})
        return out

    rollout_mod.TorchRolloutEngine.rollout = rollout
    model_mod.MiniMindForCausalLM.generate = generate
    torch.Tensor.backward = backward
    torch.nn.utils.clip_grad_norm_ = clip
    torch.optim.lr_scheduler.LRScheduler.step = sched_step
    first = {}
    orig_rollout_first = rollout

    def rollout_first(self, *a, **k):  # setup = process start -> the first rollout
        first.setdefault("setup_s", time.perf_counter() - t_start)
        first.setdefault("setup_mem", _memory_kib())  # VmHWM: the setup's peak
        return orig_rollout_first(self, *a, **k)

    rollout_mod.TorchRolloutEngine.rollout = rollout_first
    runpy.run_path(script, run_name="__main__")
    _write(args.result, {"steps": steps, "setup_s": first["setup_s"],
                         "setup_mem_kib": first["setup_mem"], "end_mem_kib": _memory_kib(),
                         "threads": torch.get_num_threads(), "torch": torch.__version__})


def child_ours(args, argv: list[str]) -> None:
    """`minimind-jax grpo` through the CLI's real entry (huge pages re-exec, XLA:CPU defaults,
    compile cache), with timing hooks."""
    t_start = time.perf_counter()
    import jax
    import numpy as np

    from minimind_jax.cli import parser
    from minimind_jax.infer import rollout as rollout_mod
    from minimind_jax.train import train_step
    from minimind_jax.train.stages import grpo as grpo_mod
    from minimind_jax.train.stages import rl as rl_mod

    compile_s = [0.0, 0]  # seconds, backend compiles

    def on_event(name, seconds, **_):
        if name.startswith("/jax/core/compile/"):
            compile_s[0] += seconds
            compile_s[1] += name.endswith("backend_compile_duration")

    jax.monitoring.register_event_duration_secs_listener(on_event)
    steps, cur, first = [], {}, {}

    orig_sample = rollout_mod._sample
    orig_engine_rollout = rollout_mod.SamplingEngine.rollout
    orig_old_logps_fn = rl_mod.old_logps_fn
    orig_make_producer = grpo_mod.make_producer
    orig_make_train_step = train_step.make_train_step

    def sample(*a, **k):
        t0 = time.perf_counter()
        out = jax.block_until_ready(orig_sample(*a, **k))
        cur["sample_s"] = cur.get("sample_s", 0.0) + time.perf_counter() - t0
        return out

    def engine_rollout(self, params, prompt_ids, mask, num_generations, max_new_tokens, step):
        t0 = time.perf_counter()
        res = orig_engine_rollout(self, params, prompt_ids, mask, num_generations,
                                  max_new_tokens, step)
        cur["engine_s"] = time.perf_counter() - t0
        N, width = res.output_ids.shape
        R = width - res.prompt_len
        done = grpo_mod.completion_mask(res.completion_ids, self.tokenizer.eos_id)
        cur.update(N=int(N), R=int(R), P=int(res.prompt_len), tokens=int(N * R),
                   tokens_to_eos=int(done.sum()))
        return res

    def old_logps_fn(config):
        fn = orig_old_logps_fn(config)

        def timed(*a):
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(*a))
            cur["old_logps_s"] = time.perf_counter() - t0
            return out

        return timed

    def make_producer(*a, **k):
        produce = orig_make_producer(*a, **k)

        def timed(state, batch, info):
            first.setdefault("setup_s", time.perf_counter() - t_start)
            first.setdefault("setup_mem", _memory_kib())  # VmHWM: the setup's peak
            cur.clear()
            cur["step_start_rss_kib"] = _memory_kib().get("VmRSS")
            _reset_peak()
            cur["t0"], cur["cpu0"] = time.perf_counter(), time.process_time()
            cur["c0"] = list(compile_s)
            out = produce(state, batch, info)
            cur["produce_s"] = time.perf_counter() - cur["t0"]
            return out

        return timed

    def make_train_step(*a, **k):
        step_fn = orig_make_train_step(*a, **k)

        def timed(state, batch):
            if args.xla_memory and "xla_memory" not in first:
                first["xla_memory"] = _xla_memory(step_fn, state, batch)
            t0 = time.perf_counter()
            out = jax.block_until_ready(step_fn(state, batch))
            t = time.perf_counter()
            if "t0" in cur:
                cur["update_s"] = t - t0
                cur["step_s"] = t - cur.pop("t0")
                cur["step_cpu_s"] = time.process_time() - cur.pop("cpu0")
                c0 = cur.pop("c0")
                cur["compile_s"], cur["compiles"] = compile_s[0] - c0[0], compile_s[1] - c0[1]
                cur["rollout_s"] = cur["engine_s"] + cur.get("old_logps_s", 0.0)
                cur.update({k.lower(): v for k, v in _memory_kib().items()})
                steps.append(dict(cur))
            return out

        return timed

    rollout_mod._sample = sample
    rollout_mod.SamplingEngine.rollout = engine_rollout
    rl_mod.old_logps_fn = old_logps_fn
    grpo_mod.make_producer = make_producer
    train_step.make_train_step = make_train_step
    sys.argv = ["minimind-jax", "grpo"] + [a for a in argv if a != "--"] + [
        "--recipe", "minimind3"]
    code = parser.main()
    if code:
        raise SystemExit(code)
    _write(args.result, {"steps": steps, "setup_s": first["setup_s"],
                         "setup_mem_kib": first["setup_mem"], "end_mem_kib": _memory_kib(),
                         "jax": jax.__version__, "numpy": np.__version__,
                         "compile_total_s": compile_s[0], "compiles_total": compile_s[1],
                         "xla_memory": first.get("xla_memory")})


def _xla_memory(step_fn, state, batch) -> dict:
    """XLA's memory analysis of the train step for this batch (train_step.make_train_step
    returns a lambda over the jitted step and the frozen reference params)."""
    cells = [c.cell_contents for c in step_fn.__closure__ or ()]
    jitted = next(c for c in cells if hasattr(c, "lower"))
    frozen = next((c for c in cells if isinstance(c, dict)), None)
    m = jitted.lower(state, batch, frozen).compile().memory_analysis()
    names = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
             "alias_size_in_bytes", "generated_code_size_in_bytes")
    return {n: getattr(m, n, None) for n in names} if m is not None else {}


if __name__ == "__main__":
    main()
