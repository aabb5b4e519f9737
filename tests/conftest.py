"""Shared test setup: exact float32 matmuls on CPU and paths to the reference fixtures."""

import os
import pathlib

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")
# Implicit rank promotion hides shape bugs (as nanodo): every broadcast in the package is explicit.
jax.config.update("jax_numpy_rank_promotion", "raise")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
GOLDEN_PATH = FIXTURES / "minimind2_golden.npz"
TOKENIZER_DIR = FIXTURES / "minimind_tokenizer"
GOLDEN3_PATH = FIXTURES / "minimind3_golden.npz"
TOKENIZER3_DIR = FIXTURES / "minimind3_tokenizer"
PRETRAIN_JSONL = FIXTURES / "pretrain.jsonl"
SFT_JSONL = FIXTURES / "sft.jsonl"
REPO_ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="session")
def golden():
    with np.load(GOLDEN_PATH) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def golden3():
    """minimind-3 (upstream HEAD) goldens, SPEC3 section 6."""
    with np.load(GOLDEN3_PATH) as data:
        return {k: data[k] for k in data.files}


def golden_state_dict(golden: dict, prefix: str) -> dict:
    """The reference state dict stored under `prefix` (e.g. "dense/init/"), tied key restored
    (MiniMind2's `output.weight` or minimind-3's `lm_head.weight`)."""
    sd = {k[len(prefix):]: v for k, v in golden.items() if k.startswith(prefix)}
    if "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    else:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return sd


def subprocess_env(n_devices: int | None = None) -> dict:
    """Environment for a child process, optionally with N host CPU devices."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if n_devices:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={n_devices}").strip()
    return env


def run_cli_from_init(tmp_path, command: str, data, init_sd: dict, args: list[str]):
    """Run `command` through the CLI from the weights `init_sd` (saved as .npz for --init_from);
    (run folder, metrics.jsonl records), the records checked to be one per micro-step."""
    import json

    from minimind_jax import cli

    init = tmp_path / "init.npz"
    np.savez(init, **init_sd)
    argv = [command, "--data_path", str(data), "--out_dir", str(tmp_path / "out"),
            "--cache_dir", str(tmp_path / "cache"), "--init_from", str(init), *args]
    assert cli.main(argv) == 0
    run_dir = tmp_path / "out" / (("pretrain" if command == "pretrain" else "full_sft")
                                  + ("_64_moe" if "--use_moe" in args else "_64"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(len(records)))
    return run_dir, records
