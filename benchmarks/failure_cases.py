"""Run every failure case as a real CLI process; print case | exit | message | files.

Each case starts from a prepared folder; "files" is what the command changed in it (+ added,
- removed, ~ modified). Needs the test fixtures; the full-disk case needs root (tmpfs mount).
`--only post` runs the post-training stages' cases (lora, dpo, distill) alone.

    python benchmarks/failure_cases.py [--work /tmp/failure_cases] [--only post]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import child_argv, subprocess_env, tiny_run_argv  # noqa: E402

BATCH_DELAY_S = 0.3  # tests/children/slow_cli.py: time for a signal or a second process


def env() -> dict:
    return subprocess_env() | {"MINIMIND_JAX_HUGEPAGES": "0"}


def train_argv(command: str, out: pathlib.Path, cache: pathlib.Path, *extra: str,
               data: pathlib.Path | None = None) -> list[str]:
    return tiny_run_argv(command, out, cache, "--batch_size", "4", "--log_interval", "1", *extra,
                         data=data)


def cli(argv: list[str], *, python: list[str] | None = None, timeout: int = 300):
    started = time.time()
    p = subprocess.run([sys.executable, *(python or ["-m", "minimind_jax.cli"]), *argv],
                       env=env(), capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr, time.time() - started


def snapshot(folder: pathlib.Path) -> dict[str, str]:
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        files[rel] = ("dir" if path.is_dir()
                      else hashlib.sha1(path.read_bytes()).hexdigest())
    return files


def changes(before: dict, after: dict) -> str:
    def top(paths):  # collapse a new/removed folder's content into the folder
        paths = sorted(paths)
        kept = [p for p in paths if not any(p.startswith(q + "/") for q in paths if q != p)]
        return kept
    added = top(set(after) - set(before))
    removed = top(set(before) - set(after))
    changed = [p for p in set(before) & set(after) if before[p] != after[p]]
    def short(paths):  # at most 3 levels deep: pretrain_64/checkpoints/6
        return sorted({"/".join(p.split("/")[:3]) for p in paths})
    parts = ([f"+{p}" for p in short(added)] + [f"-{p}" for p in short(removed)]
             + [f"~{p}" for p in short(changed)])
    return ", ".join(parts) if parts else "unchanged"


def message(output: str) -> str:
    lines = [ln for ln in output.splitlines()
             if ln.startswith(("error:", "warning:", "interrupted", "starting over",
                               "resuming", "answer:", "initial weights"))]
    return " / ".join(lines) if lines else output.strip().splitlines()[-1][:200]


def core_cases(case, rows: list, work: pathlib.Path, cache: pathlib.Path,
               base: pathlib.Path) -> None:
    """The training commands' cases (issue 11): locks, restarts, damaged checkpoints, full
    disk, non-finite numbers, bad flags and files."""

    def copy(name):
        shutil.copytree(base, work / name)
        return work / name

    # 1. two processes on one run folder
    lock = work / "lock"
    first = subprocess.Popen(child_argv("slow_cli", BATCH_DELAY_S, *train_argv(
        "pretrain", lock, cache, "--max_steps", "30", "--save_interval", "5")),
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not (lock / "pretrain_64" / "metrics.jsonl").exists() and first.poll() is None:
        time.sleep(0.1)
    case("second process on a live run folder", lock, train_argv(
        "pretrain", lock, cache, "--max_steps", "30", "--overwrite"))
    first_out = first.communicate()[0]
    steps = [ln for ln in (lock / "pretrain_64" / "metrics.jsonl").read_text().splitlines()]
    rows.append(("  (the first process)", first.returncode, message(first_out),
                 f"{len(steps)} metrics records, checkpoints "
                 f"{sorted(os.listdir(lock / 'pretrain_64' / 'checkpoints'))}",
                 "Traceback" in first_out, 0.0))
    # 2. starting over where checkpoints exist
    case("rerun a finished run without --resume", copy("rerun"),
         train_argv("pretrain", work / "rerun", cache, "--max_steps", "6"))
    case("... with --overwrite", work / "rerun",
         train_argv("pretrain", work / "rerun", cache, "--max_steps", "2", "--overwrite"))
    # 3. damaged newest checkpoint
    d = copy("truncated")
    for victim in (d / "pretrain_64/checkpoints/6/params").rglob("d/*"):
        victim.write_bytes(victim.read_bytes()[:10])
    case("--resume, newest checkpoint has a truncated file", d,
         train_argv("pretrain", d, cache, "--max_steps", "8", "--save_interval", "2",
                    "--resume"))
    d = copy("deleted")
    (d / "pretrain_64/checkpoints/6/train/_METADATA").unlink()
    case("--resume, newest checkpoint lacks a file", d,
         train_argv("pretrain", d, cache, "--max_steps", "8", "--save_interval", "2",
                    "--resume"))
    d = copy("emptystep")
    shutil.rmtree(d / "pretrain_64/checkpoints/6")
    (d / "pretrain_64/checkpoints/6").mkdir()
    case("generate --ckpt, newest step folder empty", d,
         ["generate", "--ckpt", str(d / "pretrain_64"), "--prompt", "hi", "--max_new_tokens",
          "2", "--n_heads", "4"])
    case("sft --init_from that run folder", d,
         train_argv("sft", d, cache, "--max_steps", "1", "--init_from", str(d / "pretrain_64")))
    d = copy("alldamaged")
    for step in ("2", "4", "6"):
        shutil.rmtree(d / "pretrain_64/checkpoints" / step / "params")
    case("--resume, every checkpoint damaged", d,
         train_argv("pretrain", d, cache, "--max_steps", "8", "--resume"))
    # 4. full disk
    for size in ("3m", "10m"):
        mnt = work / f"disk{size}"
        mnt.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                          capture_output=True).returncode:
            rows.append((f"full disk ({size})", "-", "skipped: cannot mount tmpfs", "", False, 0))
            continue
        try:
            case(f"run folder on a {size.upper()}iB filesystem", mnt,
                 train_argv("pretrain", mnt / "out", cache, "--max_steps", "8",
                            "--save_interval", "2"))
        finally:
            subprocess.run(["umount", str(mnt)])
    # 5. non-finite
    new = work / "new"
    case("--learning_rate nan", new, train_argv("pretrain", new, cache, "--learning_rate", "nan"))
    case("updates overflow (lr 1e38, decay 1e38)", work / "overflow",
         train_argv("pretrain", work / "overflow", cache, "--learning_rate", "1e38",
                    "--weight_decay", "1e38", "--max_consecutive_skips", "3",
                    "--accumulation_steps", "1"))
    # 6. errors that used to leave orbax's thread printing after them
    case("sft without a pretrain checkpoint", new, train_argv("sft", new, cache))
    case("--resume with no checkpoint", new, train_argv("pretrain", new, cache, "--resume"))
    case("--init_from a missing file", new,
         train_argv("pretrain", new, cache, "--init_from", str(work / "nope.pth")))
    ctrl_c = work / "ctrl_c"
    child = subprocess.Popen(child_argv("slow_cli", BATCH_DELAY_S, *train_argv(
        "pretrain", ctrl_c, cache, "--max_steps", "30", "--save_interval", "1")),
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpts = ctrl_c / "pretrain_64" / "checkpoints"
    while child.poll() is None and not (ckpts.is_dir() and len(os.listdir(ckpts)) >= 2):
        time.sleep(0.02)
    child.send_signal(signal.SIGINT)
    out = child.communicate()[0]
    rows.append(("Ctrl-C during a run saving every step", child.returncode, message(out),
                 "checkpoints " + str(sorted(os.listdir(ckpts))), "Traceback" in out, 0.0))
    # 7. shapes and numbers
    for flags in (["--dim", "63"], ["--n_heads", "3"], ["--n_heads", "0"], ["--n_kv_heads", "0"],
                  ["--dim", "0"], ["--dim", "-64"], ["--n_layers", "0"],
                  ["--learning_rate=-1e-3"], ["--grad_clip", "inf"],
                  ["--weight_decay", "nan"], ["--max_steps", "0"]):
        case(" ".join(flags), new, train_argv("pretrain", new, cache, *flags))
    # 8. convert onto an existing file
    target = work / "convert"
    target.mkdir()
    (target / "exists.txt").write_text("keep me")
    case("convert --hf_llama onto an existing file", target,
         ["convert", str(base / "pretrain_64"), str(target / "exists.txt"), "--hf_llama"])
    # 9. misleading messages
    case("generate with a missing --ckpt", new,
         ["generate", "--ckpt", str(work / "missing"), "--prompt", "hi"])
    case("--data_path is a folder", new, train_argv("pretrain", new, cache, data=work))
    blank = work / "blank" / "blank.jsonl"
    blank.parent.mkdir()
    blank.write_text("\n  \n\n")
    case("--data_path of blank lines", new, train_argv("pretrain", new, cache, data=blank))
    weights = work / "weights"
    weights.mkdir()
    (weights / "random.pth").write_bytes(os.urandom(4096))
    (weights / "empty.pth").write_bytes(b"")
    (weights / "random.npz").write_bytes(os.urandom(4096))
    for name in ("random.pth", "empty.pth", "random.npz"):
        case(f"--init_from {name}", new,
             train_argv("pretrain", new, cache, "--init_from", str(weights / name)))


def post_training_cases(case, work: pathlib.Path, cache: pathlib.Path,
                        base: pathlib.Path) -> None:
    """The post-training stages: lora and its adapters (a missing base, bad flags, files that
    are no adapter, data of the wrong kind), dpo's pairs and weights, distill's teacher."""
    post = work / "post"
    case("lora without a base run (no OUT_DIR/rlhf_64, no --init_from)", post,
         train_argv("lora", post, cache))
    run = base / "pretrain_64"
    case("lora --lora_rank -1", post,
         train_argv("lora", post, cache, "--init_from", str(run), "--lora_rank", "-1"))
    base_file = work / "base64.npz"
    code, out, _ = cli(["convert", str(run), str(base_file)])
    assert code == 0, out
    case("lora --lora_init_from base weights (no adapters in it)", post,
         train_argv("lora", post, cache, "--init_from", str(run), "--lora_init_from",
                    str(base_file)))
    case("lora on pretrain JSONL (text records, not conversations)", post,
         train_argv("lora", post, cache, "--init_from", str(run),
                    data=ROOT / "tests" / "fixtures" / "pretrain.jsonl"))
    for what, adapter in (("base weights (no adapters)", base_file), ("a folder", run),
                          ("a missing file", work / "nope.pth")):
        case(f"generate --lora_weight {what}", post,
             ["generate", "--ckpt", str(run), "--lora_weight", str(adapter), "--prompt", "hi",
              "--max_new_tokens", "2"])
    case("convert --merge_lora a missing file", post,
         ["convert", str(run), str(post / "merged.pth"), "--merge_lora",
          str(work / "nope.pth")])
    case("lora --resume with nothing to resume", post,
         train_argv("lora", post, cache, "--init_from", str(run), "--resume"))
    # dpo, distill
    new = work / "post_new"
    data = work / "post_data"
    data.mkdir()
    fixtures = ROOT / "tests" / "fixtures" / "post"
    pairs = fixtures / "dpo_pairs.jsonl"
    case("dpo without SFT weights", new, train_argv("dpo", new, cache, data=pairs))
    bad_pairs = data / "bad_pairs.jsonl"
    bad_pairs.write_text(pairs.read_text().splitlines()[0] + "\n" + '{"chosen": []}\n')
    case("dpo, a pair with an empty side", new,
         train_argv("dpo", new, cache, "--init_from", str(run), data=bad_pairs))
    case("dpo from a finished run folder (2 steps)", work / "dpo",
         train_argv("dpo", work / "dpo", cache, "--init_from", str(run), "--max_steps", "2",
                    data=pairs))
    case("distill without a teacher", new,
         train_argv("distill", new, cache, "--init_from", str(run)))
    family = np.load(fixtures / "weights_m3_dense64.npz")
    np.savez(data / "m3.npz", **{k: family[k] for k in family.files
                                  if not k.startswith("meta/")})
    case("distill, a teacher of the other family", new,
         train_argv("distill", new, cache, "--init_from", str(run), "--teacher",
                    str(data / "m3.npz")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", default="/tmp/failure_cases")
    parser.add_argument("--only", choices=("all", "post"), default="all")
    args = parser.parse_args()
    work = pathlib.Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cache = work / "cache"
    logs = work / "logs"  # each case's whole output
    logs.mkdir()
    rows = []

    def case(name, folder, argv, *, python=None, expect=None):
        folder.mkdir(parents=True, exist_ok=True)
        before = snapshot(folder)
        code, out, seconds = cli(argv, python=python)
        (logs / f"{len(rows):02d}.txt").write_text(f"{argv}\n{out}")
        rows.append((name, code, message(out), changes(before, snapshot(folder)),
                     "Traceback" in out, seconds))
        print(rows[-1], flush=True)
        return code, out

    base = work / "base"  # a finished 6-step run with checkpoints 2, 4, 6
    code, out, _ = cli(train_argv("pretrain", base, cache, "--max_steps", "6",
                                  "--save_interval", "2"))
    assert code == 0, out

    if args.only == "all":
        core_cases(case, rows, work, cache, base)
    post_training_cases(case, work, cache, base)

    print("\n| case | exit | message | files changed | traceback | s |\n|---|---|---|---|---|---|")
    for name, code, msg, files, traceback, seconds in rows:
        msg = msg.replace("|", "\\|").replace(str(work) + "/", "")
        files = files.replace("|", "\\|")
        print(f"| {name} | {code} | {msg} | {files} | {'YES' if traceback else 'no'} | "
              f"{seconds:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
