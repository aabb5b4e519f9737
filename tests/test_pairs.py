"""DPO pairs (data.pairs) against the batches the reference scripts built (the post-training
goldens' batch_x/y/mask: rows 0-3 chosen, 4-7 rejected), and the errors for bad pairs."""

import json

import numpy as np
import pytest

from minimind_jax.data.batches import Loader
from minimind_jax.data.pairs import PairSource
from minimind_jax.data.tokenizer import load_tokenizer
from minimind_jax.errors import UserError
from tests.helpers import FIXTURES, MINIMIND3_TOKENIZER_DIR, TOKENIZER_DIR

POST = FIXTURES / "post"


@pytest.mark.parametrize("case", ["m2_dpo", "m3_dpo"])
def test_batches_equal_the_references(case):
    golden = np.load(POST / f"{case}.npz")
    minimind3 = case.startswith("m3")
    tokenizer = load_tokenizer(MINIMIND3_TOKENIZER_DIR if minimind3 else TOKENIZER_DIR)
    seed = 42 if minimind3 else 1337
    source = PairSource(POST / "dpo_pairs.jsonl", tokenizer, 64,
                        rules="minimind3" if minimind3 else "minimind2", seed=seed)
    loader = Loader(source, 4, shuffle=minimind3, seed=seed,
                    permutation="torch" if minimind3 else "numpy", prefetch=0)
    batches = [b for epoch in range(2) for b in loader.epoch(epoch)]
    assert len(batches) == len(golden["batch_x"]) == 12
    for i, batch in enumerate(batches):
        for ours, theirs in (("input_ids", "batch_x"), ("labels", "batch_y"),
                             ("loss_mask", "batch_mask")):
            rows = np.concatenate([batch[ours][:, 0], batch[ours][:, 1]])
            np.testing.assert_array_equal(rows, golden[theirs][i], err_msg=f"{i} {ours}")
    if minimind3:  # the sides of a pair draw their think stripping independently
        draws = source.draws(0, loader.order(0))
        assert (draws[:, 0] != draws[:, 1]).any()


GOOD = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}


@pytest.mark.parametrize("bad, message", [
    ({"chosen": GOOD["chosen"]}, "missing field 'rejected'"),
    ({"chosen": "hi", "rejected": GOOD["rejected"]}, "'chosen' must be a list of messages"),
    ({"chosen": [], "rejected": GOOD["rejected"]}, "'chosen' is empty"),
    ({"chosen": GOOD["chosen"], "rejected": [{"role": "user", "content": "q"}]},
     "'rejected' has no assistant reply"),
    ({"chosen": [{"role": "user"}], "rejected": GOOD["rejected"]},
     "chosen[0] is missing field 'content'"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_pairs_name_file_and_line(tmp_path, bad, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(UserError) as err:
        PairSource(path, load_tokenizer(TOKENIZER_DIR), 32)
    assert f"{path}:2: " in str(err.value) and message in str(err.value), str(err.value)
    source = PairSource(path, load_tokenizer(TOKENIZER_DIR), 32, skip_bad_lines=True,
                        log=lambda _: None)
    assert len(source) == 1


def test_post_training_help_explains_their_flags(capsys):
    from minimind_jax import cli

    for command, flags in (("dpo", ("--beta", "--init_from", "--data_path", "--recipe",
                                    "--resume", "--batch_size")),
                           ("distill", ("--teacher", "--alpha", "--temperature",
                                        "--teacher_n_heads", "--from_teacher_weight",
                                        "--student_hidden_size", "--init_from"))):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = capsys.readouterr().out
        for flag in flags:
            assert flag in text, (command, flag)
