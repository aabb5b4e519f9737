"""Validation loss: training's `eval_loss` and `minimind-jax eval` against a per-sample loop."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from minimind_jax import cli
from minimind_jax.model.transformer import MiniMind
from minimind_jax.model.weights import load_weights
from tests.helpers import (
    MINIMIND3_TOKENIZER_DIR,
    PRETRAIN_JSONL,
    SFT_JSONL,
    TINY_FLAGS,
    TINY_MINIMIND3_FLAGS,
    TOKENIZER_DIR,
    subprocess_env,
)
from tests.spec_samples import (
    SpecTokenizer,
    minimind2_pretrain_sample,
    minimind2_sft_sample,
    minimind3_pretrain_sample,
    minimind3_sft_sample,
)

TINY = [*TINY_FLAGS, "--tokenizer", str(TOKENIZER_DIR)]


def per_sample_masked_mean(params, config, samples) -> float:
    """sum of token CE / number of supervised tokens, one unpadded sample at a time, with the
    log-softmax in float64 numpy (independent of the batched eval step and its reductions)."""
    model = MiniMind(config)
    total, count = 0.0, 0
    for x, y, mask in samples:
        logits, _ = model.apply({"params": params}, np.asarray(x, np.int32)[None])
        logits = np.asarray(logits[0], np.float64)
        log_probs = logits - logits.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        ce = -log_probs[np.arange(len(y)), y]
        total += float((ce * mask).sum())
        count += int(mask.sum())
    return total / count


def eval_figure(text: str) -> float:
    return float(re.search(r"eval_loss:([0-9.]+)", text).group(1))


@pytest.mark.slow
def test_eval_loss_matches_a_per_sample_computation(tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    common = ["--out_dir", str(out), "--cache_dir", str(cache), *TINY]
    assert cli.main(["pretrain", "--data_path", str(PRETRAIN_JSONL), "--batch_size", "8",
                     "--accumulation_steps", "1", "--learning_rate", "2e-3", "--max_steps", "4",
                     "--eval_data", str(PRETRAIN_JSONL), "--eval_interval", "2",
                     "--log_interval", "1", *common]) == 0
    text = capsys.readouterr().out
    run_dir = out / "pretrain_64"
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "eval_loss" in line]
    assert [r["step"] for r in evals] == [2, 4]  # every 2 micro-steps; the end is step 4
    assert "step 4: eval_loss:" in text
    assert evals[1]["eval_ppl"] == pytest.approx(np.exp(evals[1]["eval_loss"]))

    params, config, _ = load_weights(run_dir)
    tokenizer = SpecTokenizer(TOKENIZER_DIR)  # the samples as the specs build them
    texts = [json.loads(line)["text"] for line in PRETRAIN_JSONL.read_text().splitlines()]
    samples = [minimind2_pretrain_sample(tokenizer, t, 64) for t in texts]
    expected = per_sample_masked_mean(params, config, samples)
    assert evals[1]["eval_tokens"] == sum(int(mask.sum()) for _, _, mask in samples)
    assert abs(evals[1]["eval_loss"] - expected) < 2e-5

    # The eval command, at another batch size, on the same weights; and on SFT data.
    for batch_size in ("3", "32"):
        assert cli.main(["eval", "--ckpt", str(run_dir), "--data_path", str(PRETRAIN_JSONL),
                         "--stage", "pretrain", "--batch_size", batch_size,
                         "--cache_dir", str(cache)]) == 0
        assert abs(eval_figure(capsys.readouterr().out) - expected) < 2e-5
    # Two devices, an odd batch (zero-mask padding rows on one device): the same figure.
    proc = subprocess.run([sys.executable, "-m", "minimind_jax.cli", "eval", "--ckpt",
                           str(run_dir), "--data_path", str(PRETRAIN_JSONL), "--stage",
                           "pretrain", "--batch_size", "3", "--cache_dir", str(cache)],
                          env=subprocess_env(n_devices=2), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert abs(eval_figure(proc.stdout) - expected) < 2e-5
    assert cli.main(["eval", "--ckpt", str(run_dir), "--data_path", str(SFT_JSONL),
                     "--stage", "sft", "--batch_size", "7", "--cache_dir", str(cache)]) == 0
    conversations = [json.loads(line)["conversations"]
                     for line in SFT_JSONL.read_text().splitlines()]
    expected_sft = per_sample_masked_mean(
        params, config, [minimind2_sft_sample(tokenizer, c, 64) for c in conversations])
    assert abs(eval_figure(capsys.readouterr().out) - expected_sft) < 2e-5


@pytest.mark.slow
def test_eval_of_a_minimind3_model_uses_heads_sample_rules(tmp_path, capsys):
    """A minimind-3 model is evaluated on minimind-3's rows (pretrain: bos + text + eos; SFT: its
    chat template and supervised spans, its random variants drawn as a run's validation draws
    them), not MiniMind2's."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert cli.main(["pretrain", "--data_path", str(PRETRAIN_JSONL), "--out_dir", str(out),
                     "--cache_dir", str(cache), "--tokenizer", str(MINIMIND3_TOKENIZER_DIR),
                     *TINY_MINIMIND3_FLAGS, "--batch_size", "8", "--max_steps", "2"]) == 0
    run_dir = out / "pretrain_64"
    params, config, _ = load_weights(run_dir)
    tokenizer = SpecTokenizer(MINIMIND3_TOKENIZER_DIR)

    def minimind3_rows(rows):  # minimind-3's (input_ids, labels) -> next-token triplets
        return [(ids[:-1], ids[1:], (labels[1:] != -100).astype(np.int64))
                for ids, labels in rows]

    texts = [json.loads(line)["text"] for line in PRETRAIN_JSONL.read_text().splitlines()]
    records = [json.loads(line) for line in SFT_JSONL.read_text().splitlines()]
    expected = {
        "pretrain": per_sample_masked_mean(params, config, minimind3_rows(
            minimind3_pretrain_sample(tokenizer, t, 64) for t in texts)),
        "sft": per_sample_masked_mean(params, config, minimind3_rows(
            minimind3_sft_sample(tokenizer, r, 64) for r in records)),  # no variants drawn
    }
    for stage, data, extra in (("pretrain", PRETRAIN_JSONL, []),
                               ("sft", SFT_JSONL, ["--no_sft_random"])):
        assert cli.main(["eval", "--ckpt", str(run_dir), "--data_path", str(data), "--stage",
                         stage, "--batch_size", "5", "--cache_dir", str(cache), *extra]) == 0
        got = eval_figure(capsys.readouterr().out)
        assert abs(got - expected[stage]) < 2e-5, (stage, got, expected[stage])

    # With its variants drawn (default --seed 42, the recipe's): an SFT run's own validation.
    assert cli.main(["sft", "--data_path", str(SFT_JSONL), "--out_dir", str(out), "--cache_dir",
                     str(cache), "--tokenizer", str(MINIMIND3_TOKENIZER_DIR), *TINY_MINIMIND3_FLAGS,
                     "--batch_size", "4", "--max_steps", "1", "--eval_data", str(SFT_JSONL),
                     "--tracker", "none"]) == 0
    capsys.readouterr()
    sft_dir = out / "full_sft_64"
    validation = [json.loads(line) for line in (sft_dir / "metrics.jsonl").read_text()
                  .splitlines() if "eval_loss" in line][-1]["eval_loss"]
    assert cli.main(["eval", "--ckpt", str(sft_dir), "--data_path", str(SFT_JSONL), "--stage",
                     "sft", "--batch_size", "5", "--cache_dir", str(cache)]) == 0
    assert abs(eval_figure(capsys.readouterr().out) - validation) < 2e-5
