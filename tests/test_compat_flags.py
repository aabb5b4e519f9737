"""The reference training scripts' command lines run unchanged (script name replaced)."""

import json

import pytest

from minimind_jax import cli
from minimind_jax.train import compat_flags
from tests.helpers import MINIMIND3_TOKENIZER_DIR, PRETRAIN_JSONL, SFT_JSONL, TOKENIZER_DIR

TINY = ["--max_seq_len", "64", "--n_heads", "4", "--n_kv_heads", "2",
        "--tokenizer", str(TOKENIZER_DIR)]


def parse(argv):
    return cli.build_parser().parse_args(argv)


def test_use_moe_takes_each_references_value_spelling():
    assert parse(["pretrain"]).use_moe is None
    assert parse(["pretrain", "--use_moe"]).use_moe is True  # ours
    assert parse(["pretrain", "--use_moe", "1"]).use_moe is True  # minimind-3
    assert parse(["pretrain", "--use_moe", "0"]).use_moe is False
    assert parse(["pretrain", "--use_moe", "True"]).use_moe is True  # MiniMind2
    assert parse(["pretrain", "--use_moe", "False"]).use_moe is False
    with pytest.raises(SystemExit):
        parse(["pretrain", "--use_moe", "maybe"])


def test_minimind3_flags_map_onto_ours(tmp_path):
    (tmp_path / "pretrain_64").mkdir()  # a folder without a checkpoint is not weights
    (tmp_path / "pretrain_64.pth").write_bytes(b"")
    args = parse(["sft", "--save_dir", str(tmp_path), "--save_weight", "my_sft",
                  "--hidden_size", "64", "--num_hidden_layers", "2", "--from_weight", "pretrain",
                  "--from_resume", "1", "--use_compile", "1", "--num_workers", "8",
                  "--device", "cuda:0"])
    notes = compat_flags.apply(args)
    assert (args.out_dir, args.dim, args.n_layers, args.run_prefix, args.resume) == \
        (str(tmp_path), 64, 2, "my_sft", True)
    assert args.init_from == str(tmp_path / "pretrain_64.pth")
    assert args.arch == "minimind3"  # flags only minimind-3's scripts have
    assert len(notes) == 10  # one line per flag given, and the arch they imply
    assert any(n.startswith("--use_compile 1: ignored") for n in notes)
    none = parse(["sft", "--from_weight", "none"])
    compat_flags.apply(none)
    assert none.init_from == "none"
    explicit = parse(["pretrain", "--arch", "minimind2", "--hidden_size", "64"])
    compat_flags.apply(explicit)
    assert (explicit.arch, explicit.dim) == ("minimind2", 64)
    with pytest.raises(compat_flags.UserError, match="disagree"):
        compat_flags.apply(parse(["pretrain", "--hidden_size", "64", "--dim", "128"]))
    with pytest.raises(compat_flags.UserError, match="neither"):
        compat_flags.apply(parse(["sft", "--save_dir", str(tmp_path), "--from_weight", "x"]))


def test_help_groups_the_reference_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--help"])
    text = capsys.readouterr().out
    section = text.split(compat_flags.GROUP_TITLE + ":")[1]
    for flag in ("--hidden_size", "--num_hidden_layers", "--save_dir", "--save_weight",
                 "--from_weight", "--from_resume", "--device", "--num_workers", "--ddp",
                 "--local_rank", "--use_compile"):
        assert flag in section, flag


@pytest.mark.slow
def test_reference_command_lines_run(tmp_path, capsys):
    """MiniMind2's train_pretrain.py flags, then minimind-3's train_full_sft.py flags."""
    out = tmp_path / "out"
    minimind2 = ["pretrain", "--out_dir", str(out), "--epochs", "1", "--batch_size", "8",
                 "--learning_rate", "5e-4", "--device", "cpu", "--dtype", "float32",
                 "--wandb_project", "MiniMind-Pretrain", "--num_workers", "1", "--ddp",
                 "--accumulation_steps", "1", "--grad_clip", "1.0", "--warmup_iters", "0",
                 "--log_interval", "1", "--save_interval", "100", "--local_rank", "-1",
                 "--dim", "64", "--n_layers", "2", "--use_moe", "False",
                 "--data_path", str(PRETRAIN_JSONL), "--max_steps", "2",
                 "--cache_dir", str(tmp_path / "cache"), *TINY]
    assert cli.main(minimind2) == 0
    text = capsys.readouterr().out
    assert "--ddp: nothing to switch on" in text and "--device cpu: running on the CPU" in text
    assert (out / "pretrain_64" / "checkpoints" / "2").is_dir()

    shared = ["--max_seq_len", "64", "--tokenizer", str(MINIMIND3_TOKENIZER_DIR),
            "--cache_dir", str(tmp_path / "cache"), "--max_steps", "2"]
    out = tmp_path / "out3"  # minimind-3's lines, in a folder of their own (same run names)
    minimind3_pretrain = ["pretrain", "--save_dir", str(out), "--save_weight", "pretrain",
                          "--epochs", "1", "--batch_size", "4", "--learning_rate", "5e-4",
                          "--device", "cpu", "--dtype", "float32", "--num_workers", "8",
                          "--accumulation_steps", "2", "--grad_clip", "1.0", "--log_interval",
                          "1", "--save_interval", "1000", "--hidden_size", "64",
                          "--num_hidden_layers", "2", "--use_moe", "0", "--data_path",
                          str(PRETRAIN_JSONL), "--from_weight", "none", "--from_resume", "0",
                          "--use_compile", "0", *shared]
    assert cli.main(minimind3_pretrain) == 0
    assert "so --arch minimind3" in capsys.readouterr().out

    minimind3 = ["sft", "--save_dir", str(out), "--save_weight", "full_sft", "--epochs", "1",
                 "--batch_size", "4", "--learning_rate", "1e-5", "--device", "cpu",
                 "--dtype", "bfloat16", "--num_workers", "8", "--accumulation_steps", "1",
                 "--grad_clip", "1.0", "--log_interval", "1", "--save_interval", "1000",
                 "--hidden_size", "64", "--num_hidden_layers", "2", "--use_moe", "0",
                 "--data_path", str(SFT_JSONL), "--from_weight", "pretrain", "--from_resume", "0",
                 "--use_compile", "0", *shared]
    assert cli.main(minimind3) == 0
    text = capsys.readouterr().out
    assert f"initial weights: {out / 'pretrain_64'}" in text
    assert "--hidden_size 64: used as --dim 64" in text
    args = json.loads((out / "full_sft_64" / "train_args.json").read_text())
    assert args["dim"] == 64 and args["dtype"] == "bfloat16" and args["arch"] == "minimind3"
