"""`compare`: the three run formats, alignment by global micro-step, the report, the PNG."""

import json

import numpy as np
import pytest

from minimind_jax import cli
from minimind_jax.errors import UserError
from minimind_jax.tools import compare

# The reference's log line (train_pretrain.py / train_full_sft.py at d9453ed).
REFERENCE_FORMAT = "Epoch:[{}/{}]({}/{}) loss:{:.3f} lr:{:.12f} epoch_Time:{}min:"


def reference_loss(global_step):
    return 9.0 - 0.25 * global_step


def write_reference_log(path, epochs=2, iters=5, log_interval=2):
    lines = ["LLM总参数量：25.830 百万", "some warning from torch"]
    for epoch in range(epochs):
        for step in range(iters):
            if step % log_interval == 0:
                g = epoch * iters + step
                lines.append(REFERENCE_FORMAT.format(epoch + 1, epochs, step, iters,
                                                     reference_loss(g), 5e-4, 3.0))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_metrics(path, n=10, offset=0.01):
    with open(path, "w") as f:
        for s in range(n):
            f.write(json.dumps({"step": s, "epoch": s // 5, "update": s // 2,
                                "loss": reference_loss(s) + offset * (s + 1), "aux": 0.0,
                                "lr": 5e-4, "grad_norm": 1.0, "tokens_per_sec": 1.0,
                                "elapsed_s": float(s)}) + "\n")
    return path


def test_reference_log_steps_become_global_micro_steps(tmp_path):
    curve = compare.load_curve(write_reference_log(tmp_path / "torch.log"))
    assert curve.source == "reference log"
    # log_interval 2 within epochs of 5 micro-steps: steps 0,2,4 of each epoch.
    assert curve.steps.tolist() == [0, 2, 4, 5, 7, 9]
    np.testing.assert_allclose(curve.losses, [reference_loss(s) for s in [0, 2, 4, 5, 7, 9]])


def test_alignment_summary_and_table_with_known_numbers(tmp_path):
    ours = compare.load_curve(write_metrics(tmp_path / "metrics.jsonl"), "jax")
    ref = compare.load_curve(write_reference_log(tmp_path / "torch.log"), "torch")
    summary = compare.summarize([ref, ours])
    assert summary.steps.tolist() == [0, 2, 4, 5, 7, 9]
    # ours - ref = 0.01 * (step + 1) at each aligned step.
    expected = 0.01 * (np.array([0, 2, 4, 5, 7, 9]) + 1)
    np.testing.assert_allclose(summary.losses[1] - summary.losses[0], expected, atol=1e-12)
    assert summary.mean_diff[1] == pytest.approx(expected.mean())
    assert summary.max_abs_diff[1] == pytest.approx(0.10)
    assert summary.max_abs_diff_step[1] == 9
    rows = compare.window_rows(summary.steps, summary.losses, window=5)
    assert [(r.start, r.stop, r.count) for r in rows] == [(0, 5, 3), (5, 10, 3)]
    np.testing.assert_allclose(rows[0].means[0], np.mean([9.0, 8.5, 8.0]))
    np.testing.assert_allclose(rows[1].means[1] - rows[1].means[0], np.mean([0.06, 0.08, 0.10]))
    report = compare.format_report([ref, ours], summary, window=5)
    assert "max |diff| 0.100000 at step 9" in report
    assert "final losses at common step 9: torch 6.7500, jax 6.8500" in report


def test_wandb_csv_columns_found_by_name_and_empty_cells_skipped(tmp_path):
    path = tmp_path / "export.csv"
    path.write_text("Step,myrun - loss,myrun - loss__MIN,myrun - loss__MAX,myrun - lr\n"
                    "0,9.5,9.5,9.5,0.1\n100,,,,0.1\n200,8.25,8.25,8.25,0.1\n")
    curve = compare.load_curve(path)
    assert curve.source == "csv"
    assert curve.steps.tolist() == [0, 200]
    assert curve.losses.tolist() == [9.5, 8.25]


def test_csv_with_several_loss_columns_needs_a_choice(tmp_path):
    path = tmp_path / "two.csv"
    path.write_text("step,a_loss,b_loss\n0,1,2\n")
    with pytest.raises(UserError, match="several loss columns"):
        compare.load_curve(path)
    assert compare.load_curve(path, loss_column="b_loss").losses.tolist() == [2.0]


def test_files_without_loss_lines_are_clear_errors(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello\nno losses here\n")
    with pytest.raises(UserError, match="no recognisable loss lines"):
        compare.load_curve(text)
    bad_json = tmp_path / "metrics.jsonl"
    bad_json.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": \n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not valid JSON"):
        compare.load_curve(bad_json)
    assert cli.main(["compare", str(text), str(text)]) == 2
    assert "no recognisable loss lines" in capsys.readouterr().err


def test_runs_without_common_steps_are_an_error(tmp_path):
    a = write_metrics(tmp_path / "a.jsonl", n=3)
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps({"step": 7, "loss": 1.0}) + "\n")
    with pytest.raises(UserError, match="share no logged micro-step"):
        compare.compare_files([str(a), str(b)])


def test_cli_prints_table_and_writes_png(tmp_path, capsys):
    ours = write_metrics(tmp_path / "metrics.jsonl")
    ref = write_reference_log(tmp_path / "torch.log")
    png = tmp_path / "plots" / "loss.png"
    code = cli.main(["compare", str(ref), str(ours), "--plot", str(png), "--smooth", "0.5",
                     "--window", "5"])
    out = capsys.readouterr().out
    assert code == 0
    assert "aligned: 6 common micro-steps (0..9), window 5" in out
    assert "[0, 5)" in out and "[5, 10)" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width = matplotlib.image.imread(png).shape[:2]
    assert height > 100 and width > 100


def test_a_zero_based_epoch_log_is_read_as_such():
    """MiniMind2's train_distillation.py prints `Epoch:[e/E-1]` with e from 0."""
    from minimind_jax.train.log_lines import parse_reference_log

    lines = ["Epoch:[0/1](0/3) loss:2.0000 lr:0.1 epoch_Time:0min:",
             "Epoch:[0/1](2/3) loss:1.5000 lr:0.1 epoch_Time:0min:",
             "Epoch:[1/1](1/3) loss:1.0000 lr:0.1 epoch_Time:0min:"]
    assert parse_reference_log(lines) == [(0, 2.0), (2, 1.5), (4, 1.0)]
    assert parse_reference_log(lines[2:]) == [(1, 1.0)]  # no epoch 0 seen: 1-based
