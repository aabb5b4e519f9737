"""benchmarks/rl_bench.py without the reference: its inputs and table (fast), and ours alone
through the real CLI with the timing hooks (`--skip_reference`, tiny shape; slow)."""

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "rl_bench.py"


def _bench():
    spec = importlib.util.spec_from_file_location("rl_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_uniform_prompts_have_one_width_and_the_table_compares_both_sides():
    bench = _bench()
    rows = [json.loads(r) for r in bench.uniform_rows(8)]
    assert len({r["conversations"][1]["content"] for r in rows}) == 8
    assert all(r["conversations"][0]["role"] == "system" for r in rows)  # no injection draw
    steps = [dict(P=40, R=64, N=12, tokens=768, rollout_s=r, sample_s=r / 2, step_s=2 * r,
                  step_cpu_s=2 * r, update_s=r, compile_s=c)
             for r, c in ((10.0, 5.0), (1.0, 0.0), (3.0, 0.0))]
    ours = bench.summarise({"steps": steps, "setup_s": 1.0, "setup_mem_kib": {}})
    assert ours["rollout_tok_s"] == pytest.approx(2 * 768 / 4.0)
    assert ours["step_s"] == pytest.approx(4.0) and ours["first_step_s"] == 20.0
    ref = dict(ours, rollout_tok_s=ours["rollout_tok_s"] / 4, sample_tok_s=10.0, step_s=8.0,
               first_step_s=20.0)
    for s in (ours, ref):
        s["peak_rss_mib"] = 1000.0
    text = bench.table("tiny", ref, ours)
    assert "| tiny | ours vs ref | | x4.00 |" in text and "x2.00 faster" in text


@pytest.mark.slow
def test_ours_alone_runs_and_reports_every_step(tmp_path):
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--skip_reference", "--hidden_size", "64",
         "--num_hidden_layers", "2", "--num_generations", "2", "--max_gen_len", "8",
         "--max_seq_len", "64", "--steps", "2", "--data", "uniform", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    steps = result["ours"]["raw"]["steps"]
    assert len(steps) == 2
    for step in steps:
        assert step["N"] == 4 and 1 <= step["R"] <= 8 and step["tokens"] == 4 * step["R"]
        assert 0 < step["sample_s"] <= step["rollout_s"] < step["step_s"]
    assert steps[0]["compiles"] > 0 and steps[1]["P"] == steps[0]["P"]
    assert result["ours"]["peak_rss_mib"] > 0
    assert "| minimind-jax |" in done.stdout
