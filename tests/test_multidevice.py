"""Data parallelism: 4 host CPU devices train exactly like 1 device, odd batch sizes included.

Batch 6 on 4 devices is padded to 8 rows (2 rows without targets) and the epoch's last batch
(80 = 13 * 6 + 2 samples) to 4 rows; the loss is the masked mean over all real tokens, so the
padding must change nothing. The MoE aux loss is that of the whole batch too.
"""

import json
import subprocess

import numpy as np
import pytest

from minimind_jax import cli
from minimind_jax.model.weights import load_weights
from tests.helpers import (
    REPO_ROOT,
    assert_same_run,
    assert_within,
    child_argv,
    max_abs_diff,
    max_tree_diff,
    metrics,
    subprocess_env,
    tiny_run_argv,
)


def argv(out_dir, cache_dir, extra):
    return tiny_run_argv("pretrain", out_dir, cache_dir, "--accumulation_steps", "2",
                         "--learning_rate", "1e-3", "--log_interval", "1", "--seed", "3", *extra)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--batch_size", "6", "--epochs", "1"],
                                   ["--batch_size", "5", "--pack", "--max_steps", "6"]],
                         ids=["batch6", "packed-batch5"])
@pytest.mark.timeout(900)  # above its child's own 600 s limit, which says more
def test_four_devices_match_one_device(tmp_path, extra):
    cache = tmp_path / "cache"
    assert cli.main(argv(tmp_path / "one", cache, extra)) == 0
    child = subprocess.run(child_argv("cli_main", *argv(tmp_path / "four", cache, extra)),
                           env=subprocess_env(4), cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    assert "4 device(s)" in child.stdout

    one, four = (metrics(tmp_path / name / "pretrain_64") for name in ("one", "four"))
    assert len(one) >= 6
    assert_same_run("4 devices vs 1", one, four, 5.7e-6, 2.9e-7)  # ~3x the figures measured

    params_one, _, _ = load_weights(tmp_path / "one" / "pretrain_64")
    params_four, _, _ = load_weights(tmp_path / "four" / "pretrain_64")
    # Weights get relatively more room than losses: Adam's first updates are ~lr * g/|g|
    # whatever |g| is, so an embedding row whose gradient is near eps (1e-8) turns reassociation
    # noise of 1e-10 in g into ~1e-5 of weight (measured here 2.1e-6 / 4.2e-6 without the CLI's
    # XLA:CPU flags; 1.8e-5 was seen with the YNNPACK dot fusions on). A per-device-mean loss
    # is off by 2.25 at step 0 (6.77 vs 9.02).
    assert_within("4 devices vs 1: final weights", max_tree_diff(params_one, params_four),
                  1.3e-5)


@pytest.mark.slow
@pytest.mark.timeout(900)  # above its child's own 600 s limit, which says more
def test_moe_batch_aux_loss_is_that_of_the_whole_batch_on_four_devices():
    # minimind-3's aux is not a mean over rows: a per-device aux averaged over 4 devices would
    # be 0.2038 instead of 0.2003 at step 0 here (as the shard_map step of a120bfa computed).
    child = subprocess.run(child_argv("moe_aux_devices"), env=subprocess_env(4),
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    runs = json.loads(child.stdout.split("MOE ", 1)[1].splitlines()[0])
    four, one = np.array(runs["4"]), np.array(runs["1"])
    assert one[0, 1] > 0.1  # the aux matters
    assert_within("moe loss and aux, 4 devices vs 1", max_abs_diff(four, one), 2.9e-6)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [[], ["--fsdp"]], ids=["replicated", "fsdp"])
@pytest.mark.timeout(900)  # above its child's own 600 s limit, which says more
def test_lora_on_four_devices_matches_one_device(tmp_path, layout):
    """The lora stage (frozen base, adapters trained) on 4 devices, replicated or FSDP, equals
    1 device: the same losses, gradient norms and final adapters."""
    cache = tmp_path / "cache"
    assert cli.main(argv(tmp_path / "base", cache, ["--batch_size", "8", "--max_steps", "2"])) == 0

    def lora(out):
        return tiny_run_argv("lora", out, cache, "--init_from",
                             str(tmp_path / "base" / "pretrain_64"), "--batch_size", "8",
                             "--accumulation_steps", "2", "--learning_rate", "1e-2",
                             "--max_steps", "6", "--log_interval", "1")

    assert cli.main(lora(tmp_path / "one")) == 0
    child = subprocess.run(child_argv("cli_main", *lora(tmp_path / "four"), *layout),
                           env=subprocess_env(4), cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    assert "4 device(s)" in child.stdout
    one, four = (metrics(tmp_path / name / "lora_identity_64") for name in ("one", "four"))
    assert [r["step"] for r in one] == list(range(6))
    assert_same_run(f"lora {layout or 'replicated'} 4 devices vs 1", one, four, 8.6e-6, 4.7e-7)
    params_one, config, _ = load_weights(tmp_path / "one" / "lora_identity_64")
    params_four, _, _ = load_weights(tmp_path / "four" / "lora_identity_64")
    assert config.lora_rank == 16
    assert_within(f"lora {layout or 'replicated'} 4 devices vs 1: final weights",
                  max_tree_diff(params_one, params_four), 3.3e-5)
