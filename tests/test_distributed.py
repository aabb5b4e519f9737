"""Multi-process data parallel (jax.distributed over gloo) and --fsdp, against one device.

Every run trains the same tiny model for 10 micro-steps of global batch 8 through the CLI; the
baseline is one process on one device with replicated params. Children are spawned (device
counts and the distributed runtime are per process); the pair talks through a coordinator on
127.0.0.1 and gloo CPU collectives. The children are tests/children/distributed_run.py (a CLI run
and its multi-process restore) and fsdp_run.py (the --fsdp run, its resume and its layout).
"""

import json
import shutil
import socket
import subprocess

import jax
import numpy as np
import pytest

from minimind_jax import cli
from minimind_jax.model.weights import load_weights
from minimind_jax.runtime import distributed
from minimind_jax.runtime.distributed import DistributedConfig
from minimind_jax.train import train_step
from tests.helpers import (
    REPO_ROOT,
    assert_same_run,
    assert_within,
    child_argv,
    max_tree_diff,
    metrics,
    subprocess_env,
    tiny_run_argv,
)

STEPS = 10


def argv(out_dir, cache_dir, *extra):
    return tiny_run_argv("pretrain", out_dir, cache_dir, "--batch_size", "8",
                         "--accumulation_steps", "2", "--learning_rate", "1e-3",
                         "--log_interval", "1", "--seed", "3", "--max_steps", STEPS,
                         "--save_interval", "3", *extra)




@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """One process, one device, replicated: metrics and final params."""
    out = tmp_path_factory.mktemp("one")
    assert cli.main(argv(out, out / "cache")) == 0
    run_dir = out / "pretrain_64"
    return metrics(run_dir), load_weights(run_dir)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pair(args, devices_per_process=2, timeout=300, expected_code=0):
    """Both processes of a 2-process run on this host, each exiting with `expected_code`;
    (stdout, stderr) of each."""
    address = f"127.0.0.1:{free_port()}"
    children = [subprocess.Popen(
        child_argv("distributed_run", *args, "--coordinator_address", address,
                   "--num_processes", "2", "--process_id", rank),
        env=subprocess_env(devices_per_process), cwd=REPO_ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for rank in range(2)]
    try:
        outputs = [child.communicate(timeout=timeout) for child in children]
    finally:
        for child in children:  # a survivor would wait for its peer until jax's timeout
            child.kill()
    for child, (out, err) in zip(children, outputs, strict=True):
        assert child.returncode == expected_code, out[-2000:] + err[-3000:]
    return outputs


@pytest.mark.slow
def test_a_run_folder_in_use_stops_both_processes_with_one_error_line(tmp_path):
    """Process 0 cannot take the lock: both processes stop (neither waits for its peer) with
    an error line and exit status 2, and the folder keeps only the holder's lock file."""
    run_dir = tmp_path / "pair" / "pretrain_64"
    holder = subprocess.Popen(child_argv("hold_run_lock", run_dir), env=subprocess_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (_, err0), (_, err1) = run_pair(argv(tmp_path / "pair", tmp_path / "cache"),
                                        expected_code=2)
        assert [p.name for p in run_dir.iterdir()] == [".lock"]  # nothing made, nothing taken
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert err0.strip().splitlines()[-1].startswith(
        f"error: run folder {run_dir} is in use by pid {holder.pid} on {socket.gethostname()}")
    assert err1.strip().splitlines()[-1] == \
        f"error: run folder {run_dir} is in use (see process 0)"
    assert "Traceback" not in err0 + err1


@pytest.mark.slow
def test_two_processes_match_one_and_resume_from_their_checkpoint(tmp_path, one_device):
    expected, expected_params = one_device
    run_dir = tmp_path / "pair" / "pretrain_64"
    args = argv(tmp_path / "pair", tmp_path / "cache")  # own cache: process 0 builds it
    (out0, _), (out1, err1) = run_pair(args)

    assert "4 device(s) cpu in 2 process(es)" in out0
    assert sum(line.startswith("Epoch:[1/1]") for line in out0.splitlines()) == STEPS
    # Only process 0 speaks and writes metrics (once per step; process 1 would duplicate).
    assert "Epoch:" not in out1 and "model parameters" not in out1 and "prepared" not in err1
    straight = metrics(run_dir)
    # bounds: about 3x the figures measured; resuming is exact
    loss_diff = assert_same_run("2 processes vs 1", expected, straight, 8.6e-6, 3e-7)
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [6, 9, 10]

    for step in (9, 10):  # resume from step 6, written by the pair
        shutil.rmtree(run_dir / "checkpoints" / str(step))
    (out0, _), (out1, _) = run_pair([*args, "--resume"])
    assert "resuming" in out0 and "at step 6 (epoch 1, batch 6)" in out0
    resumed = metrics(run_dir)
    resume_diff = assert_same_run("2 processes resumed vs straight", straight, resumed, 0.0,
                                  0.0)  # resuming is exact
    params = load_weights(run_dir)[0]
    param_diff = assert_within("2 processes vs 1: final weights",
                               max_tree_diff(expected_params, params), 9.7e-6)

    # load_weights in each process of the pair equals it in this one.
    sums = [float(np.asarray(x, np.float64).sum()) for x in jax.tree.leaves(params)]
    for out in (out0, out1):
        restored = json.loads(out.split("RESTORED ", 1)[1].splitlines()[0])
        np.testing.assert_allclose(restored["sums"], sums, rtol=0, atol=0)
    print(f"2 processes x 2 devices vs 1 device: max |loss| {loss_diff:.2e}, final params "
          f"{param_diff:.2e}; resumed vs straight: max |loss| {resume_diff:.2e}")


@pytest.mark.slow
@pytest.mark.timeout(900)  # above its child's own 600 s limit, which says more
def test_fsdp_on_four_devices_matches_replicated_and_holds_a_quarter(tmp_path, one_device):
    expected, expected_params = one_device
    out = tmp_path / "fsdp"
    child = subprocess.run(child_argv("fsdp_run", *argv(out, tmp_path / "cache", "--fsdp")),
                           env=subprocess_env(4), cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stdout[-2000:] + child.stderr[-3000:]
    assert "fsdp: params and optimizer state sharded over 4 device(s)" in child.stdout
    assert "(25.0%)" in child.stdout

    straight = metrics(out / "straight")
    loss_diff = assert_same_run("fsdp vs 1 device", expected, straight, 5.7e-6, 3e-7)
    resume_diff = assert_same_run("fsdp resumed vs straight", straight,
                                  metrics(out / "pretrain_64"), 0.0, 0.0)
    param_diff = assert_within("fsdp vs 1 device: final weights", max_tree_diff(
        expected_params, load_weights(out / "pretrain_64")[0]), 9.7e-6)

    layout = json.loads(child.stdout.split("LAYOUT ", 1)[1].splitlines()[0])
    total = sum(4 * np.prod(shape) for shape in layout["shapes"])  # float32
    # Each device: a quarter of every sharded leaf, all of the few small replicated ones.
    expected_share = sum(4 * np.prod(shape) / (4 if "data" in spec else 1)
                         for shape, spec in zip(layout["shapes"], layout["specs"], strict=True))
    per_device = layout["params_per_device"]
    assert sorted(per_device) == ["0", "1", "2", "3"]
    assert all(v == expected_share for v in per_device.values()), (per_device, expected_share)
    share = expected_share / total
    assert 0.25 <= share < 0.251, share
    opt_share = layout["opt_state_local"] / layout["opt_state_total"]
    assert 0.25 <= opt_share < 0.251, opt_share
    print(f"fsdp 4 devices vs replicated 1 device: max |loss| {loss_diff:.2e}, final params "
          f"{param_diff:.2e}; resumed vs straight {resume_diff:.2e}; params per device "
          f"{per_device['0']:,} of {total:,} bytes ({100 * share:.2f}%), optimizer state "
          f"{100 * opt_share:.2f}%")


def test_fsdp_spec_splits_the_largest_divisible_dimension():
    assert train_step.fsdp_spec((6400, 64), 4) == jax.sharding.PartitionSpec("data", None)
    assert train_step.fsdp_spec((64, 192), 4) == jax.sharding.PartitionSpec(None, "data")
    assert train_step.fsdp_spec((64, 64), 4) == jax.sharding.PartitionSpec("data", None)
    assert train_step.fsdp_spec((6, 1000), 4) == jax.sharding.PartitionSpec(None, "data")
    assert train_step.fsdp_spec((8, 1001), 4) == jax.sharding.PartitionSpec("data", None)
    assert train_step.fsdp_spec((6, 1001), 4) == jax.sharding.PartitionSpec()  # indivisible
    assert train_step.fsdp_spec((64,), 4) == jax.sharding.PartitionSpec()  # small
    assert train_step.fsdp_spec((6400, 64), 1) == jax.sharding.PartitionSpec()


SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
              "SLURM_LOCALID")


def test_cluster_detection_follows_jax(monkeypatch):
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)
    assert distributed.detected_cluster() is None
    slurm = {"SLURM_JOB_ID": "42", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_NTASKS": "2",
             "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    assert distributed.detected_cluster() == "slurm"
    flags = DistributedConfig(num_processes=1)  # the way out: stay single-process
    assert distributed.initialize(flags) is False and not jax.distributed.is_initialized()
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task job runs single-process
    assert distributed.detected_cluster() is None


def test_incomplete_multi_process_flags_are_a_user_error(tmp_path, capsys):
    code = cli.main(argv(tmp_path, tmp_path / "cache", "--num_processes", "2",
                         "--process_id", "0"))
    assert code == 2
    assert "cannot start the multi-process run" in capsys.readouterr().err
