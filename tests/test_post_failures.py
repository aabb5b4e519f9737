"""What goes wrong before a dpo / distill run starts is one `error:` line, exit 2, and no run
folder left behind."""

import json

import pytest

from minimind_jax import cli
from tests.helpers import FIXTURES, TOKENIZER_DIR
from tests.test_dpo_golden import reference_weights

POST = FIXTURES / "post"
TINY = ["--tokenizer", str(TOKENIZER_DIR), "--dim", "64", "--n_layers", "2", "--max_seq_len",
        "64", "--dtype", "float32", "--batch_size", "2"]


@pytest.fixture
def weights(tmp_path):
    reference_weights("weights_m2_dense64.npz", tmp_path / "student.npz")
    reference_weights("weights_m3_dense64.npz", tmp_path / "m3.npz")
    bad = tmp_path / "bad.jsonl"
    lines = (POST / "dpo_pairs.jsonl").read_text().splitlines()[:2]
    bad.write_text("\n".join([*lines, json.dumps({"chosen": []})]) + "\n")
    return tmp_path


@pytest.mark.parametrize("argv, message", [
    (["dpo", "--data_path", str(POST / "dpo_pairs.jsonl")],
     "dpo starts from the full_sft weights, but neither"),
    (["dpo", "--data_path", "{tmp}/bad.jsonl", "--init_from", "{tmp}/student.npz"],
     "bad.jsonl:3: field 'chosen' is empty"),
    (["distill", "--data_path", str(POST / "lora_sft.jsonl"), "--init_from",
      "{tmp}/student.npz"], "the teacher is full_sft_768 (no --teacher), but neither"),
    (["distill", "--data_path", str(POST / "lora_sft.jsonl"), "--init_from",
      "{tmp}/student.npz", "--teacher", "{tmp}/m3.npz"], "both must be of one family"),
    (["distill", "--data_path", str(POST / "lora_sft.jsonl"), "--init_from",
      "{tmp}/student.npz", "--teacher", "{tmp}/student.npz", "--alpha", "2"],
     "--alpha must be in [0, 1]"),
])
def test_one_error_line(weights, capsys, argv, message):
    out = weights / "out"
    argv = [a.format(tmp=weights) for a in argv]
    assert cli.main([*argv, "--out_dir", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not out.exists() or not any(out.iterdir()), list(out.rglob("*"))
