"""MiniMind2's DPO divides each reply's log-prob sum by its mask size: a pair whose chosen reply
lies wholly beyond --max_seq_len gives 0/0 = NaN there. Here the existing non-finite guard
skips that micro-step (weights and optimizer state unchanged) and counts it; minimind-3's sums
give 0 and train on."""

import json

import numpy as np

from minimind_jax import cli
from tests.helpers import FIXTURES, TOKENIZER_DIR, metrics
from tests.test_dpo_golden import reference_weights

POST = FIXTURES / "post"


def test_empty_reply_mask_is_skipped(tmp_path):
    good = json.loads((POST / "dpo_pairs.jsonl").read_text().splitlines()[1])
    cut = {side: [{"role": "user", "content": "很长的问题。" * 80}, *good[side][1:]]
           for side in ("chosen", "rejected")}
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in (good, cut, good)))
    init = tmp_path / "init.npz"
    reference_weights("weights_m2_dense64.npz", init)
    argv = ["dpo", "--data_path", str(data), "--out_dir", str(tmp_path / "out"), "--init_from",
            str(init), "--tokenizer", str(TOKENIZER_DIR), "--recipe", "minimind2", "--dim",
            "64", "--n_layers", "2", "--max_seq_len", "64", "--dtype", "float32",
            "--batch_size", "1", "--learning_rate", "1e-3", "--epochs", "1", "--log_interval",
            "1"]
    assert cli.main(argv) == 0
    records = metrics(tmp_path / "out" / "rlhf_64")
    assert np.isfinite(records[0]["loss"]) and np.isnan(records[1]["loss"])
    assert [r.get("skipped", 0) for r in records] == [0, 1, 1]
    assert [r["update"] for r in records] == [1, 1, 2]
