"""Whole-run epoch time of `train.py pretrain` on short documents: padded rows, `--pack` with
next fit (`--pack_window 0`, the old packing) and with best fit (the default), and, with
`--reference_dir`, the reference's own `train_pretrain.py` on the same file in the same run.

Writes a corpus of short documents (5..max_chars characters of the fixture poems; at the
default 150, about 110 tokens on average) to a temp folder, prepares the token cache once,
then times one full epoch of the real CLI for each mode (cache + background prefetch in all)
and prints wall time, training-loop time, steady-state epoch time (compilation excluded) and
the rows' fill fraction. The reference runs in a subprocess in a scratch folder laid out as its
checkout (see below) with torch and transformers imported before its clock starts, as
ours runs in this already-started process; its epoch is its DataLoader (on-the-fly
tokenization, one worker, its defaults), float32 on CPU and fp16 autocast on CUDA, with the
same model shape (its LMConfig: 8 heads, 2 KV heads), batch, max_seq_len and accumulation 1.
With `--rerun`, best fit also runs as two whole CLI processes sharing a fresh persistent
compilation cache and token cache (a user's first run and rerun), timed like the reference's
whole process, with peak RSS; with the reference, the first is pretrain's row of the table below.

    python benchmarks/epoch_bench.py [--n_docs 1000 --dim 64 --n_layers 2 --batch_size 8]
    python benchmarks/epoch_bench.py --n_docs 480 --dim 512 --n_layers 8 \
        --reference_dir /tmp/minimind_d9453ed --modes next_fit,best_fit

`--stage sft,lora,dpo,distill` (any of them, comma-separated; `pretrain` is the run above): per
stage, one epoch of the reference's own script (train_full_sft.py, train_lora.py, train_dpo.py,
train_distillation.py) and of ours (`python -m minimind_jax.cli STAGE --recipe minimind2`), both
as whole processes on the same JSONL, model shape, batch, max_seq_len and learning rate, float32,
from the same start weights (our random init written as the reference's .pth: its
`out/pretrain_{dim}.pth` for sft, `rlhf_{dim}.pth` for lora, `full_sft_{dim}.pth` for dpo and
distill; ours gets the same file through `--init_from`; lora's adapters start as the reference
draws them, written by its own apply_lora after torch.manual_seed(1337) as its script does, for
our `--lora_init_from`). distill's teacher is a larger random model (`--teacher_dim` x
`--teacher_layers`, by default upstream's 768 x 16) given to both sides (its
`out/full_sft_{teacher_dim}.pth`, our `--teacher`). Reported per stage: the whole process's wall
time (imports, tokenization, compilation and our final checkpoint included), the reference's epoch
without its imports, our training loop, the peak RSS of each process (`wait4`'s ru_maxrss: the
largest single process of its tree, the DataLoader worker included), our rows' fill padded and
after `--length_buckets` (our console's `rows:` line) and the largest difference between the two
sides' per-step losses (the reference logs every step, rounded to its printed 3 or 4 decimals).

The data has a length distribution modelled on upstream's SFT data (sft_mini_512.jsonl: chat
samples kept under 512 tokens, most of them short answers): per conversation a target length
drawn log-normally, median 0.3 x max_seq_len tokens, sigma 0.75, plus the chat template's ~38
(at 512: templated median 170-200 tokens, 1 in 10 over 400, 5-8% longer than max_seq_len and
truncated, as the reference truncates), over 1-3 turns (70/25/5%) of fixture poem text; dpo's
pairs (upstream's dpo.jsonl) share the user turn and draw their chosen and rejected replies from
the same distribution. The distribution is modelled, not measured from upstream's files (not in
this checkout); the bench prints the token lengths it produced.

The reference runs in a scratch folder whose `model` links to the checkout's model/ (its scripts
open ./model/minimind_tokenizer and ./out/*.pth relative to the working folder), so nothing is
written into the checkout. train_distillation.py hard-codes its student (512 x 8) and teacher
(768 x 16) and max_seq_len 512: at other shapes the driver maps those two LMConfig shapes and
max_seq_len to the bench's (printed as "shape shim"); at 512 x 8 / 768 x 16 / 512 it runs
untouched.

    python benchmarks/epoch_bench.py --stage sft,lora,dpo,distill --n_rows 48 --dim 512 \
        --n_layers 8 --batch_size 4 --reference_dir /tmp/minimind_d9453ed
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.loader_bench import TOKENIZER, write_corpora  # noqa: E402
from minimind_jax.cli import main as cli_main  # noqa: E402
from minimind_jax.data.packing import DEFAULT_WINDOW  # noqa: E402
from minimind_jax.data.tokenizer import load_tokenizer  # noqa: E402
from minimind_jax.train.log_lines import parse_reference_log  # noqa: E402

# mode -> extra `pretrain` flags
MODES = {"padded": [], "next_fit": ["--pack", "--pack_window", "0"], "best_fit": ["--pack"]}

# Runs a reference script as `python SCRIPT ARGS` would, in the working folder, and prints the
# seconds from its first line to its last (imports of torch/transformers excluded). With
# EPOCH_BENCH_SHAPES="dim,layers,teacher_dim,teacher_layers,max_seq_len", LMConfig's two
# hard-coded shapes of train_distillation.py (512 x 8 student, 768 x 16 teacher) and its
# max_seq_len become those (the "shape shim"; only at shapes other than those).
REFERENCE_DRIVER = """
import os, runpy, sys, time
import torch, transformers, pandas  # noqa: F401  (imported before the clock, as ours are)
if os.environ.get("EPOCH_BENCH_SHAPES"):
    import model.LMConfig as lm
    dim, layers, t_dim, t_layers, seq = map(int, os.environ["EPOCH_BENCH_SHAPES"].split(","))
    init = lm.LMConfig.__init__
    def shim(self, dim_=512, n_layers=8, **kw):
        dim_, n_layers = {(512, 8): (dim, layers), (768, 16): (t_dim, t_layers)}.get(
            (kw.pop("dim", dim_), n_layers), (dim_, n_layers))
        if "max_seq_len" in kw:
            kw["max_seq_len"] = seq
        init(self, dim=dim_, n_layers=n_layers, **kw)
    lm.LMConfig.__init__ = shim
script = sys.argv[1]
sys.argv = [os.path.basename(script)] + sys.argv[2:]
start = time.perf_counter()
runpy.run_path(script, run_name="__main__")
print("REFERENCE_EPOCH_S", time.perf_counter() - start)
"""


# The reference's initial LoRA adapters as train_lora.py draws them (torch.manual_seed(1337), its
# model built, then apply_lora), saved for our --lora_init_from: both sides start the same.
REFERENCE_LORA_INIT = """
import sys, torch
from model.LMConfig import LMConfig
from model.model import MiniMindLM
from model.model_lora import apply_lora, save_lora
path, dim, n_layers, max_seq_len = sys.argv[1], *map(int, sys.argv[2:])
torch.manual_seed(1337)
model = MiniMindLM(LMConfig(dim=dim, n_layers=n_layers, max_seq_len=max_seq_len))
apply_lora(model)
save_lora(model, path)
"""


@dataclasses.dataclass(frozen=True)
class Stage:
    script: str  # the reference's script
    data: str  # the JSONL format: "pretrain", "sft" or "dpo"
    learning_rate: float  # the reference script's default, given to both sides
    start: str | None  # the reference's start weights: ./out/{start}_{dim}.pth
    shape_flags: bool = True  # the script takes --dim/--n_layers/--max_seq_len


STAGES = {
    "pretrain": Stage("train_pretrain.py", "pretrain", 5e-4, None),
    "sft": Stage("train_full_sft.py", "sft", 5e-5, "pretrain"),
    "lora": Stage("train_lora.py", "sft", 5e-5, "rlhf"),
    "dpo": Stage("train_dpo.py", "dpo", 1e-8, "full_sft"),
    "distill": Stage("train_distillation.py", "sft", 5e-6, "full_sft", shape_flags=False),
}


def run_measured(command: list[str], cwd, env: dict, log: pathlib.Path) -> dict:
    """Run `command` to its end with its output in `log`: wall seconds, peak RSS (MiB, wait4's
    ru_maxrss: the largest single process of its tree), exit code and output."""
    with log.open("w") as out:
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    return {"process_wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024,
            "returncode": child.returncode, "output": log.read_text(errors="replace"),
            "load": os.getloadavg()[0]}


def reference_command(stage: str, data: pathlib.Path, work: pathlib.Path, args) -> list[str]:
    """The reference's own command line for `stage` (run in `work`)."""
    spec = STAGES[stage]
    argv = ["--data_path", str(data), "--out_dir", str(work / "run"), "--epochs", "1",
            "--batch_size", str(args.batch_size), "--learning_rate", str(spec.learning_rate),
            "--dtype", "float32", "--accumulation_steps", "1", "--log_interval", "1",
            "--save_interval", "1000000000"]
    if spec.shape_flags:
        argv += ["--dim", str(args.dim), "--n_layers", str(args.n_layers),
                 "--max_seq_len", str(args.max_seq_len)]
    return [str(args.reference_dir / spec.script), *argv]


def run_reference_epoch(stage: str, data: pathlib.Path, work: pathlib.Path, args) -> dict:
    """One epoch of the reference's own script for `stage` on `data`, as a whole process in the
    scratch folder `work` (which holds out/ with its start weights)."""
    (work / "model").symlink_to(args.reference_dir.resolve() / "model")
    env = dict(os.environ, PYTHONPATH=str(work))
    shapes = (args.dim, args.n_layers, args.teacher_dim, args.teacher_layers, args.max_seq_len)
    if stage == "distill" and shapes != (512, 8, 768, 16, 512):
        env["EPOCH_BENCH_SHAPES"] = ",".join(map(str, shapes))
    command = reference_command(stage, data, work, args)
    r = run_measured([reference_python(args), "-c", REFERENCE_DRIVER, *command], work, env,
                     work / "console.log")
    r["command"] = " ".join(command)
    r["shape_shim"] = "EPOCH_BENCH_SHAPES" in env
    if r["returncode"] != 0:
        sys.exit(f"reference {STAGES[stage].script} failed (cwd {work}, its requirements.txt "
                 f"installed? it imports pandas and scikit-learn):\n{r['output'][-3000:]}")
    r["wall_s"] = float(r["output"].rsplit("REFERENCE_EPOCH_S", 1)[1])
    r["losses"] = dict(parse_reference_log(r.pop("output").splitlines()))
    r["steps"] = len(r["losses"])
    return r


def pretrain_argv(data: pathlib.Path, out: pathlib.Path, args, mode: str) -> list[str]:
    return ["pretrain", "--data_path", str(data), "--tokenizer", str(TOKENIZER),
            "--out_dir", str(out), "--dim", str(args.dim), "--n_layers", str(args.n_layers),
            "--n_heads", "8", "--n_kv_heads", "2", "--max_seq_len", str(args.max_seq_len),
            "--batch_size", str(args.batch_size), "--accumulation_steps", "1", "--epochs", "1",
            "--log_interval", "1", "--save_interval", "1000000", "--dtype", args.dtype,
            *MODES[mode]]


def ours_command(stage: str, data: pathlib.Path, work: pathlib.Path, args) -> list[str]:
    """Our CLI's command line for `stage`, the same run as `reference_command`'s."""
    spec = STAGES[stage]
    argv = [stage, "--recipe", "minimind2", "--data_path", str(data), "--tokenizer",
            str(TOKENIZER), "--out_dir", str(work / "run"), "--cache_dir", str(work / "cache"),
            "--dim", str(args.dim), "--n_layers", str(args.n_layers), "--n_heads", "8",
            "--n_kv_heads", "2", "--max_seq_len", str(args.max_seq_len),
            "--batch_size", str(args.batch_size), "--learning_rate", str(spec.learning_rate),
            "--accumulation_steps", "1", "--epochs", "1", "--log_interval", "1",
            "--save_interval", "1000000", "--dtype", args.dtype, *args.ours_flags.split()]
    if spec.start is not None:
        argv += ["--init_from", str(start_weights(work.parent, stage, args.dim))]
    if stage == "distill":
        argv += ["--teacher", str(start_weights(work.parent, stage, args.teacher_dim))]
    if (adapters := work.parent / "weights" / "lora_init.pth").exists():
        argv += ["--lora_init_from", str(adapters)]
    return [sys.executable, "-m", "minimind_jax.cli", *argv]


def ours_env(xdg_cache: pathlib.Path) -> dict:
    """The environment of one of our CLI processes: this checkout's sources, the CLI's
    persistent compilation cache under `xdg_cache` (runtime/compile_cache.py), no other."""
    env = dict(os.environ, XDG_CACHE_HOME=str(xdg_cache), PYTHONPATH=str(REPO))
    for name in ("JAX_COMPILATION_CACHE_DIR", "MINIMIND_JAX_COMPILE_CACHE"):
        env.pop(name, None)
    return env


def rows_fill(output: str) -> float | None:
    """The rows' fill our console's `rows:` line reports."""
    fill = re.search(r"filled ([\d.]+)%", output)
    return float(fill[1]) / 100 if fill else None


def run_ours_process(stage: str, data: pathlib.Path, work: pathlib.Path, args) -> dict:
    """One epoch of our CLI for `stage` as a whole process (an empty compilation cache)."""
    work.mkdir()
    command = ours_command(stage, data, work, args)
    r = run_measured(command, REPO, ours_env(work / "xdg"), work / "console.log")
    r["command"] = " ".join(command[1:])
    if r["returncode"] != 0:
        sys.exit(f"ours ({r['command']}) failed:\n{r['output'][-3000:]}")
    output = r.pop("output")
    cut = re.search(r"(?:cut to widths (\S+) per batch|each batch packed into (\S+) rows of "
                    r"\d+): about ([\d.]+)%", output)
    r["fill"] = rows_fill(output)
    r["widths"], r["cut_fill"] = ((cut[1] or f"{cut[2]} rows", float(cut[3]) / 100) if cut
                                  else (None, None))
    metrics = next((work / "run").rglob("metrics.jsonl"))
    records = [json.loads(line) for line in metrics.open() if '"loss"' in line]
    r["losses"] = {rec["step"]: rec["loss"] for rec in records}
    r["steps"], r["loop_s"] = len(records), records[-1]["elapsed_s"]
    r["step_elapsed_s"] = [rec["elapsed_s"] for rec in records]  # compiles show as jumps
    return r


def start_weights(tmp: pathlib.Path, stage: str, dim: int) -> pathlib.Path:
    """Where the stage's start weights (or, at the teacher's dim, the teacher's) lie."""
    return tmp / "weights" / f"{STAGES[stage].start}_{dim}.pth"


def write_start_weights(tmp: pathlib.Path, stage: str, args) -> list[pathlib.Path]:
    """Our random init (seed 1337; the teacher's 7) as the reference's state dict .pth files."""
    from minimind_jax.model.config import ModelConfig
    from minimind_jax.model.transformer import init_params
    from minimind_jax.model.weights import save_state_dict, state_dict_from_params

    shapes = [(args.dim, args.n_layers, 1337)]
    if stage == "distill":
        shapes.append((args.teacher_dim, args.teacher_layers, 7))
    paths = []
    for dim, n_layers, seed in shapes:
        path = start_weights(tmp, stage, dim)
        if not path.exists():
            config = ModelConfig(dim=dim, n_layers=n_layers, max_seq_len=args.max_seq_len)
            save_state_dict(state_dict_from_params(init_params(config, seed), config), path)
        paths.append(path)
    if stage == "lora" and args.reference_dir is not None:
        path = tmp / "weights" / "lora_init.pth"
        subprocess.run([reference_python(args), "-c", REFERENCE_LORA_INIT, str(path),
                        str(args.dim), str(args.n_layers), str(args.max_seq_len)],
                       env=dict(os.environ, PYTHONPATH=str(args.reference_dir.resolve())),
                       check=True)
        paths.append(path)
    return paths


def reference_python(args) -> str:
    return sys.executable if args.reference_python is None else str(args.reference_python)


def write_stage_data(folder: pathlib.Path, fmt: str, n_rows: int, max_seq_len: int,
                     seed: int = 0) -> pathlib.Path:
    """`n_rows` conversations (fmt "sft") or chosen/rejected pairs ("dpo") with the length
    distribution of the module docstring: a log-normal target in tokens per sample."""
    texts = [json.loads(line)["text"] for line in (REPO / "tests/fixtures/pretrain.jsonl").open()]
    source = "".join(texts).replace("\n", "")
    tokenizer = load_tokenizer(TOKENIZER)
    chars_per_token = len(source[:20000]) / len(tokenizer.encode(source[:20000]))
    rng = random.Random(seed)

    def excerpt(tokens: float) -> str:
        n = max(2, min(len(source) - 1, round(tokens * chars_per_token)))
        start = rng.randrange(len(source) - n)
        return source[start:start + n]

    def target() -> float:  # template tokens: ~5 per message
        return min(3 * max_seq_len, rng.lognormvariate(math.log(0.3 * max_seq_len), 0.75))

    def conversation(tokens: float, turns: int) -> list[dict]:
        per_turn = tokens / turns
        messages = []
        for _ in range(turns):
            messages.append({"role": "user", "content": excerpt(max(2, 0.2 * per_turn - 5))})
            messages.append({"role": "assistant", "content": excerpt(max(2, 0.8 * per_turn - 5))})
        return messages

    path = folder / f"{fmt}_rows.jsonl"
    with path.open("w") as f:
        for _ in range(n_rows):
            turns = rng.choices((1, 2, 3), weights=(70, 25, 5))[0]
            if fmt == "sft":
                row = {"conversations": conversation(target(), turns)}
            else:  # one user turn, two replies of independent lengths
                chosen, rejected = conversation(target(), 1), conversation(target(), 1)
                rejected[0] = chosen[0]
                row = {"chosen": chosen, "rejected": rejected}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def token_lengths(path: pathlib.Path, fmt: str) -> list[int]:
    """Each sample's templated token count (dpo: chosen and rejected), untruncated."""
    tokenizer = load_tokenizer(TOKENIZER)
    keys = ("conversations",) if fmt == "sft" else ("chosen", "rejected")
    return [len(tokenizer.encode(tokenizer.apply_chat_template(json.loads(line)[key])))
            for line in path.open() for key in keys]


def run_stage(stage: str, tmp: pathlib.Path, args) -> dict:
    """The reference's script and ours for one post-training stage on one JSONL (see above)."""
    spec = STAGES[stage]
    folder = tmp / stage
    folder.mkdir()
    if args.data_path is None:
        data = write_stage_data(folder, spec.data, args.n_docs, args.max_seq_len)
    else:  # the given rows, repeated
        data = folder / f"{spec.data}_rows.jsonl"
        data.write_text((args.data_path.read_text().rstrip("\n") + "\n") * args.repeat)
    lengths = np.array(token_lengths(data, spec.data))
    write_start_weights(folder, stage, args)
    result = {"data": str(data), "tokens_median": float(np.median(lengths)),
              "tokens_mean": float(lengths.mean()), "tokens_p90": float(np.quantile(lengths, .9)),
              "over_max_seq_len": float((lengths > args.max_seq_len).mean())}
    print(f"{stage}: {len(lengths) // (1 if spec.data == 'sft' else 2)} rows of {spec.data} "
          f"JSONL ({args.data_path or 'generated'}), templated tokens median "
          f"{result['tokens_median']:.0f}, mean {result['tokens_mean']:.0f}, p90 "
          f"{result['tokens_p90']:.0f}, {result['over_max_seq_len']:.0%} over max_seq_len "
          f"{args.max_seq_len}", flush=True)
    if args.reference_dir is not None:
        (folder / "reference").mkdir()
        shutil.copytree(folder / "weights", folder / "reference" / "out")
        r = result["reference"] = run_reference_epoch(stage, data, folder / "reference", args)
        print(f"  reference {spec.script}{' (shape shim)' if r['shape_shim'] else ''}: "
              f"{r['steps']} steps, process {r['process_wall_s']:.1f} s (epoch without imports "
              f"{r['wall_s']:.1f} s), peak RSS {r['peak_rss_mib']:.0f} MiB, load "
              f"{r['load']:.2f}", flush=True)
    o = result["ours"] = run_ours_process(stage, data, folder / "ours", args)
    print(f"  ours: {o['steps']} steps, process {o['process_wall_s']:.1f} s (training loop "
          f"{o['loop_s']:.1f} s), rows filled {o['fill']:.1%} padded -> {o['cut_fill'] or 0:.1%} "
          f"fed ({o['widths']}), peak RSS {o['peak_rss_mib']:.0f} MiB, load "
          f"{o['load']:.2f}", flush=True)
    if "reference" in result:
        ref = result["reference"]["losses"]
        common = sorted(set(ref) & set(o["losses"]))
        result["steps_compared"] = len(common)
        result["loss_max_diff"] = max((abs(ref[k] - o["losses"][k]) for k in common),
                                      default=float("nan"))
        result["ratio"] = ref_wall = result["reference"]["process_wall_s"] / o["process_wall_s"]
        print(f"  {ref_wall:.2f}x the reference's process; per-step losses over {len(common)} "
              f"steps: max |ours - reference| {result['loss_max_diff']:.2g} (the reference "
              f"prints 3-4 decimals)", flush=True)
    shutil.rmtree(folder / "weights")
    return result


def _cell(text: str, values: dict | None) -> str:
    return text.format(**values) if values else "-"


def stage_table(stages: dict) -> str:
    """The markdown table of `--stage` runs."""
    lines = ["| stage | reference s | ours s | ratio | fill padded -> fed | "
             "peak RSS reference / ours | loss max diff | load ref / ours |",
             "|---|---|---|---|---|---|---|---|"]
    for stage, r in stages.items():
        o, ref = r["ours"], r.get("reference")
        values = {**ref, **r} if ref else None
        of_ref = functools.partial(_cell, values=values)
        fill = f"{o['fill']:.1%} -> {o['cut_fill'] or o['fill']:.1%}"
        lines.append(f"| {stage} | {of_ref('{process_wall_s:.1f}')} | {o['process_wall_s']:.1f} "
                     f"| {of_ref('{ratio:.2f}x')} | {fill} | {of_ref('{peak_rss_mib:.0f}')} / "
                     f"{o['peak_rss_mib']:.0f} MiB | {of_ref('{loss_max_diff:.1g}')} | "
                     f"{of_ref('{load:.1f}')} / {o['load']:.1f} |")
    return "\n".join(lines)


def run_process(data: pathlib.Path, out: pathlib.Path, args, xdg_cache: pathlib.Path) -> dict:
    """A whole `minimind-jax pretrain --pack` process (imports included), with the CLI's
    persistent compilation cache and its token cache in `xdg_cache` (runtime/compile_cache.py;
    the first run tokenizes, as the reference does every run): `run_measured`'s figures and the
    rows' fill from its console."""
    out.mkdir()
    r = run_measured([sys.executable, "-m", "minimind_jax.cli",
                      *pretrain_argv(data, out / "run", args, "best_fit"),
                      "--cache_dir", str(xdg_cache / "tokens")], REPO, ours_env(xdg_cache),
                     out / "console.log")
    if r["returncode"] != 0:
        sys.exit(f"pretrain --pack failed:\n{r['output'][-3000:]}")
    r["fill"] = rows_fill(r.pop("output"))
    shutil.rmtree(out)
    return r


def run_epoch(data: pathlib.Path, out: pathlib.Path, args, mode: str) -> dict:
    argv = pretrain_argv(data, out, args, mode)
    start = time.perf_counter()
    assert cli_main(argv) == 0
    wall = time.perf_counter() - start
    run_dir = next(out.glob("pretrain_*"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    steps = records[-1]["step"] + 1
    # Steady state: from the end of step 0 (which includes compilation) to the end of the run.
    steady = (records[-1]["elapsed_s"] - records[0]["elapsed_s"]) * steps / max(steps - 1, 1)
    return {"wall_s": wall, "loop_s": records[-1]["elapsed_s"], "steady_s": steady,
            "steps": steps}


def main() -> None:
    from minimind_jax.runtime.host_memory import reexec_with_hugepages
    from minimind_jax.runtime.xla_flags import apply_cpu_defaults

    reexec_with_hugepages()  # as the CLI entry point does (runtime/host_memory.py)
    apply_cpu_defaults()  # likewise (runtime/xla_flags.py)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="pretrain",
                        help=f"comma-separated stages: {', '.join(STAGES)} (pretrain: the "
                             "padded/packed modes above; the others: the reference's script "
                             "and ours as whole processes, a table at the end)")
    parser.add_argument("--n_docs", "--n_rows", type=int, default=1000,
                        help="documents (pretrain) or rows (the other stages) in the JSONL")
    parser.add_argument("--max_chars", type=int, default=150,
                        help="documents are 5..max_chars characters (150: ~110 tokens average)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--n_layers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--dtype", default="float32",
                        help="our compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)")
    parser.add_argument("--modes", default=",".join(reversed(MODES)),
                        help=f"which of ours to run, comma-separated: {', '.join(MODES)}")
    parser.add_argument("--reference_dir", type=pathlib.Path, default=None,
                        help="a jingyaogong/minimind checkout (d9453ed): also time its "
                             "train_pretrain.py on the same documents")
    parser.add_argument("--reference_python", type=pathlib.Path, default=None,
                        help="the interpreter with torch and transformers for the reference "
                             "(default: this one)")
    parser.add_argument("--teacher_dim", type=int, default=768,
                        help="distill: the random teacher's dim (upstream's teacher: 768)")
    parser.add_argument("--teacher_layers", type=int, default=16,
                        help="distill: the teacher's layers (upstream's: 16)")
    parser.add_argument("--rerun", action="store_true",
                        help="also time best fit as two whole `minimind-jax pretrain` processes "
                             "(imports included, as the reference's process time is) sharing a "
                             "fresh compilation cache: the first fills it, the rerun loads the "
                             "compiled programs from it")
    parser.add_argument("--data_path", type=pathlib.Path, default=None,
                        help="the other stages: this JSONL (conversations, or dpo's pairs) "
                             "instead of generated rows, e.g. tests/fixtures/post/dpo_pairs.jsonl")
    parser.add_argument("--repeat", type=int, default=1,
                        help="with --data_path: its rows this many times over")
    parser.add_argument("--ours_flags", default="",
                        help="the other stages: more flags for our command, e.g. "
                             "--no-batch_packing")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    modes, stages = args.modes.split(","), args.stage.split(",")
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown --modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    if unknown := set(stages) - set(STAGES):
        parser.error(f"unknown --stage {sorted(unknown)}; choose from {', '.join(STAGES)}")
    from minimind_jax.data.rows import open_source

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        results = {}
        if "pretrain" in stages:
            results = run_pretrain(tmp, args, modes)
        post = [stage for stage in stages if stage != "pretrain"]
        if post:
            print(f"model dim {args.dim} x {args.n_layers} layers (8/2 heads), batch "
                  f"{args.batch_size}, max_seq_len {args.max_seq_len}, our dtype {args.dtype}, "
                  f"distill's teacher {args.teacher_dim} x {args.teacher_layers}; "
                  f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
        stage_results = results.setdefault("stages", {})
        if "process_first_run" in results and "reference" in results:  # pretrain's row
            padded = open_source(data_of(tmp), TOKENIZER, "pretrain", args.max_seq_len,
                                 progress=False, log=lambda message: None)
            ours = dict(results["process_first_run"], cut_fill=results["process_first_run"]["fill"],
                        fill=1.0 - padded.padding_fraction)
            stage_results["pretrain (best fit: fill padded -> packed)"] = {
                "reference": results["reference"], "ours": ours, "loss_max_diff": float("nan"),
                "ratio": results["reference"]["process_wall_s"] / ours["process_wall_s"]}
        for stage in post:
            stage_results[stage] = run_stage(stage, tmp, args)
            if args.json:
                pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
        if stage_results:
            print(stage_table(stage_results))
            if args.json:
                pathlib.Path(args.json).write_text(json.dumps(results, indent=2))


def data_of(tmp: pathlib.Path) -> pathlib.Path:
    return tmp / "short_docs.jsonl"  # write_corpora's pretrain file


def run_pretrain(tmp: pathlib.Path, args, modes: list[str]) -> dict:
    """Pretrain's modes (padded, next fit, best fit) in this process, the reference's
    train_pretrain.py as a whole process, and with --rerun best fit as whole processes."""
    from minimind_jax.data.rows import open_source

    data, _ = write_corpora(tmp, args.n_docs, max_chars=args.max_chars)
    start = time.perf_counter()
    cached = open_source(data, TOKENIZER, "pretrain", args.max_seq_len, progress=False,
                         log=lambda message: None)  # the token cache, reused by every run
    prepare_s = time.perf_counter() - start
    lengths = cached.cache.lengths
    print(f"{args.n_docs} documents, {lengths.mean():.1f} tokens on average "
          f"(with <s> </s>), max_seq_len {args.max_seq_len}, batch {args.batch_size}, "
          f"model dim {args.dim} x {args.n_layers} layers (8/2 heads), dtype {args.dtype}; "
          f"token cache built in {prepare_s:.1f} s (not in the epochs below); "
          f"load average {os.getloadavg()[0]:.2f}")
    results = {"n_docs": args.n_docs, "mean_tokens": float(lengths.mean()),
               "prepare_s": prepare_s, "args": {k: str(v) for k, v in vars(args).items()}}

    def save():  # after every run: a time limit that cuts the bench keeps what it measured
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(results, indent=2))

    if args.reference_dir is not None:  # first: the figure the others are compared with
        (tmp / "reference").mkdir()
        r = results["reference"] = run_reference_epoch("pretrain", data, tmp / "reference",
                                                       args)
        print(f"  reference: train_pretrain.py, {r['steps']:4d} steps of padded rows, epoch "
              f"{r['wall_s']:7.1f} s ({r['process_wall_s']:.1f} s with its imports), peak RSS "
              f"{r['peak_rss_mib']:.0f} MiB",
              flush=True)
        save()
    for mode in modes:
        source = open_source(data, TOKENIZER, "pretrain", args.max_seq_len,
                             pack=mode != "padded", pack_window=0 if mode == "next_fit"
                             else DEFAULT_WINDOW, progress=False, log=lambda message: None)
        out = tmp / mode
        r = run_epoch(data, out, args, mode)
        shutil.rmtree(out)
        r["rows"], r["fill"] = len(source), 1.0 - source.padding_fraction
        results[mode] = r
        print(f"  {mode:9s}: {r['rows']:5d} rows filled {r['fill']:6.1%}, {r['steps']:4d} "
              f"steps, epoch wall {r['wall_s']:7.1f} s, training loop {r['loop_s']:7.1f} s, "
              f"steady-state epoch {r['steady_s']:7.1f} s", flush=True)
        save()
    if args.rerun:
        detail = [run_process(data, tmp / "process", args, tmp / "xdg") for _ in range(2)]
        runs = [r["process_wall_s"] for r in detail]
        results["process_first"], results["process_rerun"] = runs
        results["process_first_run"], results["process_rerun_run"] = detail
        print(f"  best_fit as whole processes (imports included): first {runs[0]:.1f} s, "
              f"rerun with the compilation cache {runs[1]:.1f} s; peak RSS "
              f"{detail[0]['peak_rss_mib']:.0f} MiB", flush=True)
        if "reference" in results:
            for name, wall in zip(("first", "rerun"), runs, strict=True):
                ratio = results["reference"]["process_wall_s"] / wall
                results[f"reference_process/{name}"] = ratio
                print(f"  process speed-up {name} vs the reference's process: {ratio:.2f}x")
        save()
    for base in ("padded", "reference"):
        for mode in ("next_fit", "best_fit"):
            if base in results and mode in results:
                ratio = results[base]["wall_s"] / results[mode]["wall_s"]
                results[f"{base}/{mode}"] = ratio
                print(f"  epoch speed-up {mode} vs {base}: {ratio:.2f}x wall", end="")
                if base == "padded":
                    steady = results[base]["steady_s"] / results[mode]["steady_s"]
                    print(f", {steady:.2f}x steady state", end="")
                print()
    print(f"  load average now {os.getloadavg()[0]:.2f}")
    save()
    return results


if __name__ == "__main__":
    main()
