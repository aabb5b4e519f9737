"""DPO golden parity through the CLI: `minimind-jax dpo` reproduces the references' own
train_dpo.py runs (tests/fixtures/post/m2_dpo, m3_dpo, m3_dpo_moe; commands in their
meta/command) from the same base weights: per-step loss (the reference's loss_backward x
accumulation) within 1e-4, the LR exactly, and the DPO terms the script computed.

fp32 on CPU, matmul precision "highest" (conftest).
"""

import re

import numpy as np
import pytest

from minimind_jax import cli
from minimind_jax.model import weights
from tests.helpers import FIXTURES, MINIMIND3_TOKENIZER_DIR, TOKENIZER_DIR, metrics

POST = FIXTURES / "post"
COMMON = ["--dim", "64", "--n_layers", "2", "--max_seq_len", "64", "--dtype", "float32",
          "--batch_size", "4", "--learning_rate", "1e-4", "--epochs", "2", "--grad_clip", "1.0",
          "--log_interval", "1", "--save_interval", "1000"]
CASES = {
    "m2_dpo": (["--recipe", "minimind2", "--tokenizer", str(TOKENIZER_DIR),
                "--accumulation_steps", "1"], "rlhf_64"),
    "m3_dpo": (["--arch", "minimind3", "--recipe", "minimind3", "--tokenizer",
                str(MINIMIND3_TOKENIZER_DIR), "--accumulation_steps", "1", "--use_moe", "0",
                "--beta", "0.15"], "dpo_64"),
    "m3_dpo_moe": (["--arch", "minimind3", "--recipe", "minimind3", "--tokenizer",
                    str(MINIMIND3_TOKENIZER_DIR), "--accumulation_steps", "2", "--use_moe", "1",
                    "--beta", "0.15"], "dpo_64_moe"),
}


NUMBER = re.compile(r"\d+\.\d+")


def _without_time(line: str) -> str:
    return re.sub(r"epoch_[Tt]ime: ?[-\d.]+min:?$", "", line)


def assert_reference_lines(stdout: str, golden) -> None:
    """Our console's `Epoch:` lines are the reference's, but for the time estimate; a printed
    number may differ by one unit of its last digit (a float32 value on a rounding edge)."""
    ours = [_without_time(x) for x in stdout.splitlines() if x.startswith("Epoch:")]
    theirs = [_without_time(str(x)) for x in golden["log_lines"] if str(x).startswith("Epoch:")]
    assert [NUMBER.sub("#", x) for x in ours] == [NUMBER.sub("#", x) for x in theirs]
    for a, b in zip(ours, theirs, strict=True):
        for x, y in zip(NUMBER.findall(a), NUMBER.findall(b), strict=True):
            unit = 10.0 ** -len(y.split(".")[1])
            assert abs(float(x) - float(y)) <= unit * 1.01, (a, b)


def assert_final_weights(run_dir, golden, atol: float) -> float:
    """The run's final weights against the reference's (`final/*`, and the embedding rows in
    `final_rows/*`); returns the largest difference."""
    params, config, _ = weights.load_weights(run_dir)
    got = weights.state_dict_from_params(params, config)
    worst = 0.0
    for key in golden.files:
        if key.startswith("final/"):
            worst = max(worst, float(np.abs(got[key[6:]] - golden[key]).max()))
        elif key.startswith("final_rows/"):
            rows = got[key[11:]][golden["final_rows_index"]]
            worst = max(worst, float(np.abs(rows - golden[key]).max()))
    assert worst <= atol, worst
    return worst


def reference_weights(name: str, path) -> None:
    """A base-weights file of the goldens as a state dict for --init_from (tied key restored)."""
    base_golden = np.load(POST / name)
    sd = {k: np.asarray(base_golden[k], np.float32) for k in base_golden.files
          if not k.startswith("meta/")}
    for embedding, head in (("tok_embeddings.weight", "output.weight"),
                            ("model.embed_tokens.weight", "lm_head.weight")):
        if embedding in sd:
            sd[head] = sd[embedding]
    np.savez(path, **sd)


@pytest.mark.parametrize("case", list(CASES))
def test_dpo_matches_reference(tmp_path, capsys, case):
    golden = np.load(POST / f"{case}.npz")
    extra, run_name = CASES[case]
    init = tmp_path / "init.npz"
    reference_weights(str(golden["meta/base_weights_file"][0]), init)
    argv = ["dpo", "--data_path", str(POST / "dpo_pairs.jsonl"), "--out_dir",
            str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--init_from",
            str(init), *COMMON, *extra]
    assert cli.main(argv) == 0
    assert_reference_lines(capsys.readouterr().out, golden)
    run_dir = tmp_path / "out" / run_name
    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(12))
    acc = int(extra[extra.index("--accumulation_steps") + 1])
    expected = golden["loss_backward"] * acc
    losses = np.array([r["loss"] for r in records])
    diff = np.abs(losses - expected).max()
    print(f"{case}: max |loss - reference| = {diff:.3g}")
    assert diff <= 1e-4, diff
    np.testing.assert_array_equal([r["lr"] for r in records], golden["lr"])
    np.testing.assert_allclose([r["dpo_loss"] for r in records], golden["lossfn/return"],
                               rtol=0, atol=1e-4)
    if case.startswith("m3"):
        np.testing.assert_allclose([r["aux"] for r in records], golden["aux_loss"],
                                   rtol=0, atol=1e-6)
    for ours, theirs in (("chosen_reward", "chosen_rewards"),
                         ("rejected_reward", "rejected_rewards"),
                         ("reward_margin", "reward_margin")):
        np.testing.assert_allclose([r[ours] for r in records],
                                   golden[f"derived/{theirs}"].mean(axis=1), rtol=0, atol=1e-5)
    np.testing.assert_allclose([r["reward_accuracy"] for r in records],
                               golden["derived/reward_accuracy"], rtol=0, atol=1e-6)
    print(f"{case}: max |final weights - reference| = "
          f"{assert_final_weights(run_dir, golden, 1e-4):.3g}")
