"""The references' own post-training command lines (the goldens' meta/argv, script name
dropped) run as they are in the layout the scripts expect (out/full_sft_*.pth, dataset/,
the tokenizer folder; minimind-3 from trainer/), plus only `--recipe`: the default start
weights, teacher, run folder name, beta and alpha/temperature come from the reference's flags
and give the reference's losses."""

import shutil

import numpy as np
import pytest

from minimind_jax import cli
from minimind_jax.model import weights
from tests.helpers import (
    FIXTURES,
    MINIMIND3_TOKENIZER_DIR,
    TOKENIZER_DIR,
    assert_within,
    max_abs_diff,
    metrics,
)

POST = FIXTURES / "post"
pytest.importorskip("torch")  # the references' layout holds .pth weights


def _layout(root, golden, minimind3: bool):
    """out/ with the base (and teacher) weights as .pth, dataset/, the tokenizer; -> the
    script's working directory."""
    (root / "out").mkdir()
    (root / "dataset").mkdir()
    for name in ("dpo_pairs.jsonl", "lora_sft.jsonl"):
        shutil.copy(POST / name, root / "dataset" / name)
    shutil.copytree(MINIMIND3_TOKENIZER_DIR if minimind3 else TOKENIZER_DIR,
                    root / "model" if minimind3 else root / "model" / "minimind_tokenizer")
    for key, target in (("meta/base_weights_file", "full_sft_64"),
                        ("meta/teacher_weights_file", "full_sft_64_moe")):
        if key in golden.files:
            base_golden = np.load(POST / str(golden[key][0]))
            sd = {k: base_golden[k] for k in base_golden.files if not k.startswith("meta/")}
            weights.save_state_dict(sd, root / "out" / f"{target}.pth")
    if minimind3:
        (root / "trainer").mkdir()
        return root / "trainer"
    return root


# about 3x the per-step loss differences measured on the CPU (float32)
@pytest.mark.parametrize("case, run_name, bound", [
    ("m2_dpo", "rlhf_64", 5.4e-7), ("m3_dpo", "dpo_64", 7.4e-6),
    ("m3_distill_moe_teacher", "full_dist_64", 2.9e-6)],
    ids=["m2_dpo", "m3_dpo", "m3_distill_moe_teacher"])
def test_reference_command_line(tmp_path, monkeypatch, case, run_name, bound):
    golden = np.load(POST / f"{case}.npz")
    minimind3 = case.startswith("m3")
    monkeypatch.chdir(_layout(tmp_path, golden, minimind3))
    command = "dpo" if "dpo" in case else "distill"
    argv = [command, *map(str, golden["meta/argv"][1:]),
            "--recipe", "minimind3" if minimind3 else "minimind2"]
    assert cli.main(argv) == 0
    records = metrics(tmp_path / "out" / run_name)
    print(" ".join(argv))
    assert_within(f"{case} loss", max_abs_diff([r["loss"] for r in records],
                                               golden["loss_backward"]),  # accumulation 1
                  bound)
