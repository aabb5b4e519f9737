"""benchmarks/device_suite.sh --dry_run: the GPU suite's every step, on CPU with a tiny model,
so the script is known to work before device time is spent on it."""

import json
import shutil
import subprocess

import pytest

from tests.helpers import REPO_ROOT, subprocess_env

pytest.importorskip("torch")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils timeout")
@pytest.mark.timeout(900)  # above its child's own 600 s limit, which says more
def test_dry_run_runs_every_step_and_writes_the_table(tmp_path):
    env = subprocess_env() | {"OUT": str(tmp_path)}
    env.pop("REFERENCE_DIR", None)
    done = subprocess.run(["bash", str(REPO_ROOT / "benchmarks/device_suite.sh"), "--dry_run"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    suite = json.loads((tmp_path / "suite.json").read_text())
    statuses = {name: step["status"] for name, step in suite["steps"].items()}
    for cudnn in ("bench_tiny_cudnn", "bench_tiny_packed_cudnn"):
        assert statuses.pop(cudnn) == "n/a"  # no GPU here
    assert set(statuses.values()) == {"ok"}, statuses
    assert suite["golden"]["tests"] > 0 and suite["golden"]["failures"] == 0
    measured = {row["name"] for row in suite["bench"] if row.get("tokens_per_s", 0) > 0}
    assert measured == {"tiny_xla", "tiny_chunked", "tiny_packed_xla", "tiny-moe_ragged",
                        "tiny-moe_blocked", "tiny-moe_dense"}
    assert "device time per step" in (tmp_path / "profile_tiny.txt").read_text() or \
        "no device events" in (tmp_path / "profile_tiny.txt").read_text()
    assert suite["epoch"]["best_fit"]["fill"] > 0.9
    table = (tmp_path / "suite.md").read_text()
    assert "| tiny_chunked | chunked |" in table and "## Whole epoch" in table


def test_unknown_argument_is_a_usage_error(tmp_path):
    done = subprocess.run(["bash", str(REPO_ROOT / "benchmarks/device_suite.sh"), "--bogus"],
                          cwd=REPO_ROOT, env=subprocess_env() | {"OUT": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "error: unknown argument --bogus" in done.stderr
