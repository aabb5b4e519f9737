"""LoRA golden parity through the CLI: `lora` reproduces the references' own train_lora.py
runs (tests/fixtures/post/m2_lora.npz, m3_lora.npz; docs/post_training_spec.md 1) from their
base weights and their LoRA A init (`--lora_init_from`).

Both goldens: 40 conversations, batch 4 (10 batches per epoch), 2 epochs, accumulation 3,
lr 5e-3. MiniMind2 counts windows per epoch and carries the leftover micro-batch into the next
epoch's first window (updates after micro-steps 3, 6, 9, 13, 16, 19); minimind-3 flushes each
epoch's partial window (3, 6, 9, 10, 13, 16, 19, 20). fp32 on CPU, matmul precision "highest".
"""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimind_jax import cli
from minimind_jax.model import lora, run_checkpoint
from minimind_jax.model.config import ModelConfig, arch_defaults
from tests.helpers import (
    FIXTURES,
    MINIMIND3_TOKENIZER_DIR,
    TOKENIZER_DIR,
    assert_within,
    max_abs_diff,
    max_rel_diff,
    metrics,
)

POST = FIXTURES / "post"
CASES = {
    "m2_lora": dict(weights="weights_m2_dense64.npz", tokenizer=TOKENIZER_DIR,
                    flags=["--recipe", "minimind2", "--n_heads", "8"],
                    config=ModelConfig(dim=64, n_layers=2, n_heads=8, max_seq_len=64)),
    "m3_lora": dict(weights="weights_m3_dense64.npz", tokenizer=MINIMIND3_TOKENIZER_DIR,
                    flags=["--arch", "minimind3", "--recipe", "minimind3"],
                    config=arch_defaults("minimind3").replace(dim=64, n_layers=2,
                                                              max_seq_len=64)),
    # minimind-3's MoE model: the router and experts frozen too, the aux loss in the loss
    "m3_lora_moe": dict(weights="weights_m3_moe64.npz", tokenizer=MINIMIND3_TOKENIZER_DIR,
                        flags=["--arch", "minimind3", "--recipe", "minimind3", "--use_moe"],
                        config=arch_defaults("minimind3").replace(dim=64, n_layers=2,
                                                                  max_seq_len=64, use_moe=True)),
}
# About 3x the differences measured on the CPU (float32): per-step loss, pre-clip grad norm
# (relative), final adapters.
BOUNDS = {"m2_lora": dict(loss=1.4e-5, grad_norm=2.5e-5, adapters=1.1e-6),
          "m3_lora": dict(loss=5.8e-6, grad_norm=1.4e-5, adapters=5.4e-6),
          "m3_lora_moe": dict(loss=9.3e-6, grad_norm=1.6e-5, adapters=1.2e-6)}
FLAGS = ["--dim", "64", "--n_layers", "2", "--max_seq_len", "64", "--dtype", "float32",
         "--batch_size", "4", "--accumulation_steps", "3", "--learning_rate", "5e-3",
         "--epochs", "2", "--grad_clip", "1.0", "--log_interval", "1", "--lora_name",
         "lora_golden"]


def _prefixed(npz, prefix: str) -> dict:
    return {k.removeprefix(prefix): npz[k] for k in npz.files if k.startswith(prefix)}


def run_lora(tmp_path, case: str, extra=()):
    """Our CLI from the golden's base weights and LoRA init: (run folder, records, golden)."""
    spec = CASES[case]
    golden = np.load(POST / f"{case}.npz")
    base_golden = np.load(POST / spec["weights"])
    base = tmp_path / "base.npz"
    np.savez(base, **{k: np.asarray(base_golden[k], np.float32) for k in base_golden.files
                      if not k.startswith("meta/")})
    init = tmp_path / "lora_init.npz"
    np.savez(init, **_prefixed(golden, "lora_init/"))
    argv = ["lora", "--data_path", str(POST / "lora_sft.jsonl"), "--out_dir",
            str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--tokenizer",
            str(spec["tokenizer"]), "--init_from", str(base), "--lora_init_from", str(init),
            *spec["flags"], *FLAGS, *extra]
    assert cli.main(argv) == 0
    run_dir = tmp_path / "out" / ("lora_golden_" + spec["config"].replace(lora_rank=16).tag)
    return run_dir, metrics(run_dir), golden


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_lora_matches_reference(tmp_path, capsys, case):
    """The golden run's losses, LRs, grad norms, adapters and files; then its merge for
    export (check_merge_for_export, on the same run)."""
    run_dir, records, golden = run_lora(tmp_path, case)
    config = CASES[case]["config"].replace(lora_rank=16)
    assert [r["step"] for r in records] == list(range(20))
    expected = golden["loss_backward"] * 3  # the script back-propagates loss / accumulation
    bound = BOUNDS[case]
    assert_within(f"{case} loss", max_abs_diff([r["loss"] for r in records], expected),
                  bound["loss"])
    np.testing.assert_allclose([r["lr"] for r in records], golden["lr"], rtol=1e-6, atol=0)
    # updates made by a step (minimind-3's end-of-epoch flushes, after micro-steps 10 and 20,
    # are not a step's and have no record)
    in_step = [(u, n) for u, n in zip(golden["clip_after_micro"], golden["clip_total_norm"],
                                      strict=True) if case == "m2_lora" or u % 10]
    updates = [r["step"] + 1 for r in records if "grad_norm" in r]
    assert updates == [u for u, _ in in_step], updates
    norms = np.array([r["grad_norm"] for r in records if "grad_norm" in r])
    theirs = np.array([n for _, n in in_step])
    assert_within(f"{case} pre-clip grad norm (relative)",
                  max_rel_diff(norms, theirs), bound["grad_norm"])

    # the final adapters, from the checkpoint and from the adapter file written at the end
    params, saved_config, _ = run_checkpoint.restore_params(run_dir)
    assert saved_config.lora_rank == 16
    ours = lora.adapter_state_dict(params, config)
    final = _prefixed(golden, "lora_final/")
    assert set(ours) == set(final)
    assert_within(f"{case} final adapters",
                  max(max_abs_diff(ours[k], final[k]) for k in final), bound["adapters"])
    # the frozen base is unchanged
    from minimind_jax.model import weights

    base_golden = np.load(POST / CASES[case]["weights"])

    base_sd = weights.state_dict_from_params(lora.split(params)[1], config.replace(lora_rank=0))
    assert set(base_golden.files) - {"meta/" + k.split("meta/")[-1]
                                     for k in base_golden.files
                                     if k.startswith("meta/")} <= set(base_sd)
    for k in (k for k in base_golden.files if not k.startswith("meta/")):
        v = base_sd[k]
        np.testing.assert_array_equal(v, np.asarray(base_golden[k], np.float32), err_msg=k)

    files = sorted(run_dir.glob(f"lora_golden_{config.tag}.*"))
    assert len(files) == 1, files
    back = lora.load_adapters(files[0], config)
    again = lora.adapter_state_dict(back, config)
    fp16 = case.startswith("m3_")
    for k in final:
        want = ours[k].astype(np.float16).astype(np.float32) if fp16 else ours[k]
        np.testing.assert_array_equal(again[k], want, err_msg=k)
    if files[0].suffix == ".pth" and importlib.util.find_spec("torch"):  # torch is optional
        import torch

        mine = torch.load(files[0], map_location="cpu")
        theirs = torch.load(POST / f"{case}_saved_adapter.pth", map_location="cpu")
        assert list(mine) == list(theirs) or set(mine) == set(theirs)
        for k in theirs:
            assert mine[k].shape == theirs[k].shape and mine[k].dtype == theirs[k].dtype, k
    train_args = json.loads((run_dir / "train_args.json").read_text())
    assert train_args["run_prefix"] == "lora_golden"
    check_merge_for_export(tmp_path, capsys, case, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("case,save_at", [("m2_lora", 11), ("m3_lora", 7)])
def test_lora_resume_mid_window(tmp_path, case, save_at):
    """Killed after checkpoint `save_at` (inside an accumulation window: MiniMind2's step 11
    is in the window that carries epoch 1's leftover), `--resume` continues to the same
    losses, LRs and adapters as the uninterrupted run, without --init_from."""
    import shutil

    run_dir, records, _ = run_lora(tmp_path, case, ["--save_interval", str(save_at)])
    final, _, _ = run_checkpoint.restore_params(run_dir)
    for step_dir in (run_dir / run_checkpoint.CHECKPOINT_DIR).iterdir():
        if step_dir.name != str(save_at):
            shutil.rmtree(step_dir)
    spec = CASES[case]
    argv = ["lora", "--data_path", str(POST / "lora_sft.jsonl"), "--out_dir",
            str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--tokenizer",
            str(spec["tokenizer"]), "--resume", *spec["flags"], *FLAGS,
            "--save_interval", str(save_at)]
    assert cli.main(argv) == 0
    resumed = metrics(run_dir)
    keys = ("step", "epoch", "batch", "update", "loss", "lr")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in records]
    again, _, _ = run_checkpoint.restore_params(run_dir)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)


def test_lora_command_defaults(tmp_path):
    """The references' train_lora.py defaults per arch, the base they load, the run name."""
    from minimind_jax.cli.parser import build_parser
    from minimind_jax.errors import UserError
    from minimind_jax.train import flags
    from minimind_jax.train.stages import STAGES, lora, stage

    def config(*argv):
        args = build_parser().parse_args(["lora", "--out_dir", str(tmp_path), *argv])
        return flags.config_from_args(args, STAGES["lora"])

    v2, v3 = config(), config("--arch", "minimind3")
    got = [(c.optim.epochs, c.data.batch_size, c.optim.learning_rate,
            c.optim.accumulation_steps, c.model.max_seq_len, c.model.lora_rank,
            c.run.run_prefix, c.optim.weight_decay, c.optim.grad_clip) for c in (v2, v3)]
    assert got == [(50, 16, 5e-5, 1, 512, 16, "lora_identity", 0.01, 1.0),
                   (10, 32, 1e-4, 1, 340, 16, "lora_medical", 0.01, 1.0)]
    assert config("--lora_name", "x", "--lora_rank", "8").run.run_prefix == "x"
    assert STAGES["lora"].samples == "sft"
    with pytest.raises(UserError, match="rlhf_512"):
        stage.init_source(v2, STAGES["lora"], v2.model)
    (tmp_path / "full_sft_768.pth").write_bytes(b"")
    assert stage.init_source(v3, STAGES["lora"], v3.model).name == "full_sft_768.pth"
    assert lora.adapter_file(tmp_path, "n", v3.model.replace(use_moe=True)).name \
        == "n_768_moe.pth"
    assert lora.adapter_file(tmp_path, "n", v2.model.replace(use_moe=True)).name \
        == "n_512.pth"


def check_merge_for_export(tmp_path, capsys, case, run_dir):
    """`lora.merge_for_export` (`convert`'s merge) folds a LoRA run's adapters, or an adapter
    file's, into the kernels: MiniMind2 within 1e-6 of W + B A; minimind-3 in float16 as its
    merge_lora (exactly, from its float16 adapter file). `convert BASE OUT --merge_lora
    ADAPTER` and `convert RUN OUT` write those merged weights."""
    from minimind_jax.model import weights

    spec = CASES[case]
    config = spec["config"].replace(lora_rank=16)
    params, saved, _ = run_checkpoint.restore_params(run_dir)
    adapters = lora.adapter_state_dict(params, config)
    base_params = lora.split(params)[1]
    base = weights.state_dict_from_params(base_params, config.replace(lora_rank=0))
    merged_run, c1 = lora.merge_for_export(params, saved)
    adapter = next(run_dir.glob(f"lora_golden_{config.tag}.*"))
    merged_file, c2 = lora.merge_for_export(base_params, config.replace(lora_rank=0), adapter)
    assert c1.lora_rank == c2.lora_rank == 0
    got_run = weights.state_dict_from_params(merged_run, c1)
    got_file = weights.state_dict_from_params(merged_file, c2)
    assert not lora.split(merged_run)[0] and not lora.split(merged_file)[0]
    # what generate/chat/eval/serve load from the run folder is the adapted model, and
    # `attach_adapter_file` (their --lora_weight) gives the same from the adapter file
    from minimind_jax.model.config import ModelConfig
    from minimind_jax.model.transformer import MiniMind

    loaded, loaded_config = weights.load_weights(run_dir, ModelConfig())[:2]
    assert loaded_config.lora_rank == 16
    attached, attached_config = lora.attach_adapter_file(base_params, c2, adapter)
    ids = np.asarray(np.load(POST / f"{case}.npz")[
        "batch_X" if case == "m2_lora" else "batch_input_ids"][0])
    def run(cfg, p):
        p = jax.tree.map(jnp.asarray, p)  # the MoE experts' scan indexes device arrays
        return np.asarray(MiniMind(cfg).apply({"params": p}, ids)[0])

    plain = loaded_config.replace(lora_rank=0)
    for cfg, p in ((loaded_config, loaded), (attached_config, attached)):
        np.testing.assert_allclose(run(cfg, p), run(plain, lora.merged(p, cfg)), atol=2e-5)
    if case == "m2_lora":  # a float32 file: the same adapters
        for a, b in zip(jax.tree.leaves(lora.split(loaded)[0]),
                        jax.tree.leaves(lora.split(attached)[0]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the command: base weights + adapter file, and the LoRA run folder itself
    base_file, from_file, from_run = (tmp_path / n
                                      for n in ("merge_base.npz", "file.npz", "run.npz"))
    weights.save_state_dict(base, base_file)
    arch = ["--arch", "minimind3"] if case.startswith("m3_") else ["--n_heads", "8"]
    assert cli.main(["convert", str(base_file), str(from_file), "--merge_lora", str(adapter),
                     *arch]) == 0
    assert cli.main(["convert", str(run_dir), str(from_run), *arch]) == 0
    for written, expected in ((from_file, got_file), (from_run, got_run)):
        sd = weights.load_state_dict(written)
        assert set(sd) == set(expected)
        for k in expected:
            np.testing.assert_array_equal(sd[k], expected[k], err_msg=k)
    # eval with --lora_weight on the base weights is eval of the lora run itself
    data = str(POST / "lora_sft.jsonl")
    lines = []
    for ckpt in (["--ckpt", str(base_file), "--lora_weight", str(adapter)],
                 ["--ckpt", str(run_dir)]):
        assert cli.main(["eval", *ckpt, "--data_path", data, "--stage", "sft",
                         "--tokenizer", str(spec["tokenizer"]), "--max_seq_len", "64",
                         "--dtype", "float32", "--cache_dir", str(tmp_path / "cache"),
                         *arch]) == 0
        line = capsys.readouterr().out.strip().splitlines()[-1]
        lines.append(float(line.split("eval_loss:")[1].split()[0]))
    assert abs(lines[0] - lines[1]) <= 1e-5, lines  # minimind-3's adapter file is float16
    for k in adapters:
        if not k.endswith("lora.A.weight"):
            continue
        linear = k.removesuffix(".lora.A.weight")
        a, b = adapters[k], adapters[f"{linear}.lora.B.weight"]
        w = base[f"{linear}.weight"]
        if case.startswith("m3_"):
            a16, b16 = (np.asarray(x, np.float16).astype(np.float32) for x in (a, b))
            want_file = (w.astype(np.float16) + (b16 @ a16).astype(np.float16)).astype(
                np.float32)
            np.testing.assert_array_equal(got_file[f"{linear}.weight"], want_file)
            want_run = (w.astype(np.float16) + (b @ a).astype(np.float16)).astype(np.float32)
            np.testing.assert_allclose(got_run[f"{linear}.weight"], want_run, rtol=1e-3,
                                       atol=1e-4)
        else:
            np.testing.assert_allclose(got_run[f"{linear}.weight"], w + b @ a, atol=1e-6)
            np.testing.assert_allclose(got_file[f"{linear}.weight"], w + b @ a, atol=1e-6)
    for k in base:
        if f"{k.removesuffix('.weight')}.lora.A.weight" not in adapters:
            np.testing.assert_array_equal(got_run[k], base[k])
