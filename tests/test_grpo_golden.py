"""GRPO / CISPO golden parity: `minimind-jax grpo` replays the rollouts of minimind-3's own
train_grpo.py runs (tests/fixtures/rl/*.npz, made by tests/golden_makers/make_rl_goldens.py
from the unmodified script; commands in meta/command) and computes everything else itself:
the prompts (the replay refuses a step whose recorded prompts differ from ours), rewards (the
rules and the stub reward model, loaded through transformers on both sides), advantages, old
and reference log-probs, the loss, the LR, the updates. Compared per micro-step: the loss the
script back-propagated (x accumulation), its logged reward mean, KL, advantage mean and std,
response length; its console lines; the LR; the pre-clip grad norms; the final weights.

The reference's own command line, plus `--recipe minimind3 --replay FILE` (and the golden's
`--old_logp_offset`), in the layout its script expects (out/full_sft_64[_moe].pth, dataset/,
model/, the stub reward model; run from trainer/). fp32 on CPU.
"""

import pathlib
import shutil

import numpy as np
import pytest

from minimind_jax.model import weights
from tests.helpers import (
    FIXTURES,
    MINIMIND3_TOKENIZER_DIR,
    assert_within,
    max_abs_diff,
    max_rel_diff,
    metrics,
    run_command,
)
from tests.test_dpo_golden import assert_reference_lines

RL = FIXTURES / "rl"
POST = FIXTURES / "post"
CASES = ["m3_cispo", "m3_grpo_acc2", "m3_cispo_g6", "m3_cispo_offset", "m3_grpo_offset",
         "m3_cispo_moe", "m3_cispo_script"]
LOGGED = {"reward": "log/avg_reward_val", "kl_ref": "log/kl_ref_val",
          "advantages_mean": "log/advantages_mean_val", "advantages_std": "log/advantages_std_val",
          "avg_response_len": "log/avg_len_val"}
# About 3x the largest figure measured over the cases (CPU, float32): the loss 1.9e-6
# (m3_cispo_offset), the logged values 9.5e-7 (g6), the grad norm 9.7e-5 relative
# (grpo_offset), the weights' sums of squares 8.0e-7 relative (moe); the float16 weights
# differ by at most one float16 step (a value on a rounding edge), as the spec allows.
BOUND = dict(loss=5.7e-6, logged=2.9e-6, grad_norm=2.9e-4, weights=2.4e-6, ulps=1.0)


def _layout(root, golden):
    """The script's layout under `root` -> its working directory (trainer/)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    for folder in ("out", "dataset", "trainer"):
        (root / folder).mkdir()
    shutil.copy(RL / "rlaif.jsonl", root / "dataset" / "rlaif.jsonl")
    shutil.copytree(RL / "stub_reward_model", root / "stub_reward_model")
    shutil.copytree(MINIMIND3_TOKENIZER_DIR, root / "model")
    base = np.load(POST / pathlib.Path(str(golden["meta/base_weights_file"][0])).name)
    sd = {k: base[k] for k in base.files if not k.startswith("meta/")}
    weights.save_state_dict(sd, root / str(golden["meta/base_weights_in_layout"][0]))
    return root / "trainer"


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_grpo_replays_the_reference(tmp_path, monkeypatch, case):
    golden = np.load(RL / f"{case}.npz")
    monkeypatch.chdir(_layout(tmp_path, golden))
    argv = ["grpo", *map(str, golden["meta/argv"][1:]), "--recipe", "minimind3", "--replay",
            RL / f"{case}.npz", "--old_logp_offset", float(golden["meta/old_logp_offset"]),
            # the stage's default at its real row lengths (rows this short go without)
            *(["--remat"] if case in ("m3_cispo_g6", "m3_cispo_moe") else [])]
    assert_reference_lines(run_command(argv), golden)
    run_dir = tmp_path / str(golden["meta/saved_file"][0]).removesuffix(".pth")
    records = metrics(run_dir)
    steps = int(golden["n_micro"])
    assert [r["step"] for r in records] == list(range(steps))
    acc = int(golden["meta/argv"][list(golden["meta/argv"]).index("--accumulation_steps") + 1])
    assert_within(f"{case} loss", max_abs_diff([r["loss"] for r in records],
                                               golden["loss_backward"] * acc), BOUND["loss"])
    assert_within(f"{case} logged reward, KL, advantages, length", max(
        max_abs_diff([r[ours] for r in records], golden[theirs])
        for ours, theirs in LOGGED.items()), BOUND["logged"])
    np.testing.assert_allclose([r["lr"] for r in records], golden["lr"], rtol=1e-12)
    updates = [r["step"] + 1 for r in records if "grad_norm" in r]
    assert updates == golden["clip_after_micro"].tolist()[:len(updates)]
    assert_within(f"{case} pre-clip grad norm (relative)", max_rel_diff(
        [r["grad_norm"] for r in records if "grad_norm" in r],
        golden["clip_total_norm"][:len(updates)]), BOUND["grad_norm"])
    params, config, _ = weights.load_weights(run_dir)
    ours = weights.state_dict_from_params(params, config)
    assert_within(f"{case} final weights' sums of squares (relative)", max(
        max_rel_diff(np.square(np.asarray(ours[key.removeprefix("final_fp32_stats/")],
                                          np.float64)).sum(), golden[key][1])
        for key in golden.files if key.startswith("final_fp32_stats/")), BOUND["weights"])
    if bool(golden["check/saved_vs_inmemory_fp16_equal"]):  # the file has every update
        assert_within(f"{case} final weights as float16, in float16 ulps",
                      float16_ulps(ours, golden), BOUND["ulps"])


def float16_ulps(ours: dict, golden) -> float:
    """The largest difference between our final weights rounded to float16 and the script's
    saved float16 file (final/*, final_rows/*), in units of the float16 spacing there."""
    worst = 0.0
    for key in golden.files:
        name = key.partition("/")[2]
        if key.startswith("final/"):
            got = ours[name]
        elif key.startswith("final_rows/"):
            rows = (golden["final_rows_index/embedding"] if name == "model.embed_tokens.weight"
                    else [0, len(ours[name]) // 2, len(ours[name]) - 1])
            got = ours[name][rows]
        else:
            continue
        theirs = np.asarray(golden[key], np.float16)
        diff = np.abs(np.asarray(got, np.float16).astype(np.float32) - theirs.astype(np.float32))
        worst = max(worst, float(np.max(diff / np.spacing(np.abs(theirs)).astype(np.float32))))
    return worst
