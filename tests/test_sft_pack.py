"""`--pack` for the SFT-style stages: a tiny packed sft run trains (finite losses, the packed
rows line, the resume layout check), and lora and distill take packed rows too. (That packed
conversations keep their tokens, loss masks and logits: test_loader's packed-row tests.)"""

import math

from minimind_jax import cli
from tests.helpers import MINIMIND3_TOKENIZER_DIR, metrics, run_command, tiny_run_argv

# 128 tokens: the fixture's conversations (51 to 320 tokens) share rows; at 64 few would
PACKED = ["--pack", "--max_seq_len", "128", "--batch_size", "4", "--log_interval", "1"]


def test_packed_sft_trains_and_lora_and_distill_take_packed_rows(tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    stdout = run_command(tiny_run_argv("sft", out, cache, *PACKED, "--init_from", "none",
                                       "--max_steps", "3", "--save_interval", "1"))
    assert "packed (best fit over windows of 8,192 samples), filled" in stdout
    sft_run = out / "full_sft_64"
    losses = [r["loss"] for r in metrics(sft_run)]
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)

    # The rows of (epoch, batch) are the packed ones: resuming without --pack is refused.
    assert cli.main([*tiny_run_argv("sft", out, cache, *PACKED[1:], "--max_steps", "4"),
                     "--resume"]) == 2
    assert "one sample per row (no --pack)" in capsys.readouterr().err

    for command, extra, run in (("lora", [], "lora_identity_64"),
                                ("distill", ["--teacher", sft_run], "full_dist_64")):
        run_command(tiny_run_argv(command, out, cache, *PACKED, "--init_from", sft_run,
                                  "--max_steps", "1", *extra))
        records = metrics(out / run)
        assert len(records) == 1 and math.isfinite(records[0]["loss"])


def test_packed_minimind3_sft_trains(tmp_path):
    """minimind-3's conversations, their variants drawn per epoch, packed and fed whole."""
    stdout = run_command(tiny_run_argv("sft", tmp_path / "out", tmp_path / "cache", *PACKED,
                                       "--arch", "minimind3", "--recipe", "minimind3",
                                       "--tokenizer", MINIMIND3_TOKENIZER_DIR,
                                       "--init_from", "none", "--max_steps", "2"))
    assert "packed (best fit" in stdout
    losses = [r["loss"] for r in metrics(tmp_path / "out" / "full_sft_64")]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
