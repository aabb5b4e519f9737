"""Resume after a real `kill -9`: the resumed run's metrics equal an uninterrupted run's.

The run shuffles, accumulates over 3 micro-steps (so checkpoints fall inside accumulation
windows) and spans several epochs, so params, optimizer state, the MultiSteps accumulator, the
data position and the schedule must all come back exactly; for every training stage (pretrain,
and lora, dpo and distill from a pretrain run's weights).
"""

import contextlib
import json
import os
import signal
import subprocess

import pytest

from minimind_jax import cli
from tests.helpers import (
    FIXTURES,
    assert_within,
    child_argv,
    subprocess_env,
    tiny_run_argv,
    wait_until,
)

STEPS, KILL_AFTER = 40, 20
COMPARED = ("step", "epoch", "batch", "update", "loss", "aux", "lr", "grad_norm", "skipped")

# The child is the CLI itself (tests/children/slow_cli.py); each batch is slowed down on the host
# by this many seconds so the parent can land its SIGKILL mid-run.
BATCH_DELAY_S = 0.15


# stage -> (its run folder, its data: None for the stage's fixture default)
STAGE_RUNS = {"pretrain": ("pretrain_64", None), "lora": ("lora_identity_64", None),
              "dpo": ("rlhf_64", FIXTURES / "post" / "dpo_pairs.jsonl"),
              "distill": ("full_dist_64", None)}


def argv(out_dir, cache_dir, command="pretrain", *extra):
    return tiny_run_argv(command, out_dir, cache_dir, "--batch_size", "8",
                         "--accumulation_steps", "3", "--learning_rate", "1e-3", "--epochs", "20",
                         "--max_steps", STEPS, "--save_interval", "7", "--log_interval", "1",
                         "--seed", "7", *extra, data=STAGE_RUNS[command][1])


def read_records(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            out.append(json.loads(line))
    return out


def complete_checkpoints(run_dir):
    root = run_dir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("command", list(STAGE_RUNS))
def test_kill_9_then_resume_gives_identical_metrics(tmp_path, capsys, command):
    cache = tmp_path / "cache"
    extra = []
    if command != "pretrain":  # the post-training stages start from a pretrain run's weights
        assert cli.main(tiny_run_argv("pretrain", tmp_path / "base", cache, "--max_steps",
                                      "2")) == 0
        extra = ["--init_from", str(tmp_path / "base" / "pretrain_64")]
        if command == "distill":
            extra += ["--teacher", str(tmp_path / "base" / "pretrain_64")]
    assert cli.main(argv(tmp_path / "straight", cache, command, *extra)) == 0
    run_name = STAGE_RUNS[command][0]
    straight = read_records(tmp_path / "straight" / run_name)
    assert [r["step"] for r in straight] == list(range(STEPS))

    run_dir = tmp_path / "killed" / run_name
    killed = argv(tmp_path / "killed", cache, command, *extra)
    child = subprocess.Popen(child_argv("slow_cli", BATCH_DELAY_S, *killed),
                             env=subprocess_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)

    def killable():
        records = read_records(run_dir)
        return child.poll() is not None or (
            records and records[-1]["step"] >= KILL_AFTER
            and [s for s in complete_checkpoints(run_dir) if s >= KILL_AFTER - 6])

    wait_until(killable, 300, f"step {KILL_AFTER} and a checkpoint of the child run",
               poll_s=0.01)
    assert child.poll() is None, "the child ended before it could be killed: " + (
        child.stderr.read().decode()[-2000:])
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stderr.close()
    killed_at = read_records(run_dir)[-1]["step"]
    assert KILL_AFTER <= killed_at < STEPS - 1

    capsys.readouterr()
    assert cli.main([*killed, "--resume"]) == 0
    resumed_from = int(capsys.readouterr().out.split("at step ")[1].split()[0])
    assert KILL_AFTER - 6 <= resumed_from <= killed_at + 1
    print(f"killed after step {killed_at}, resumed from checkpoint {resumed_from}")
    resumed = read_records(run_dir)
    assert [r["step"] for r in resumed] == list(range(STEPS))  # no gap, no duplicate
    worst = 0.0
    for mine, ref in zip(resumed[KILL_AFTER:], straight[KILL_AFTER:], strict=True):
        assert set(k for k in COMPARED if k in mine) == set(k for k in COMPARED if k in ref)
        worst = max([worst, *(abs(mine[k] - ref[k]) for k in COMPARED if k in ref)])
    assert_within("resumed after kill -9 vs straight: " + ", ".join(COMPARED), worst,
                  0.0)  # resuming is exact
    assert complete_checkpoints(run_dir)[-1] == STEPS
    assert len(complete_checkpoints(run_dir)) <= 3


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    code = cli.main([*argv(tmp_path / "none", tmp_path / "cache"), "--resume"])
    assert code == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_resume_with_other_row_flags_is_refused(tmp_path, capsys):
    """(epoch, batch) points into the rows the run was saved with: --pack/--pack_window must
    stay, or the resumed run would continue at another place in the data."""
    base = argv(tmp_path / "out", tmp_path / "cache")
    base[base.index("--max_steps") + 1] = "2"
    base[base.index("--accumulation_steps") + 1] = "1"
    assert cli.main([*base, "--pack", "--pack_window", "0", "--save_interval", "1"]) == 0
    capsys.readouterr()
    assert cli.main([*base, "--pack", "--resume"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --resume: ")
    assert "--pack --pack_window 0" in errors[0] and "--pack --pack_window 8192" in errors[0]
    assert "Traceback" not in err
    assert cli.main([*base, "--resume"]) == 2
    assert "one sample per row (no --pack)" in capsys.readouterr().err
