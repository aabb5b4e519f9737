"""Shared test setup: exact float32 matmuls on CPU and paths to the reference fixtures."""

import os
import pathlib

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
GOLDEN_PATH = FIXTURES / "minimind2_golden.npz"
TOKENIZER_DIR = FIXTURES / "minimind_tokenizer"
PRETRAIN_JSONL = FIXTURES / "pretrain.jsonl"
SFT_JSONL = FIXTURES / "sft.jsonl"
REPO_ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="session")
def golden():
    with np.load(GOLDEN_PATH) as data:
        return {k: data[k] for k in data.files}


def golden_state_dict(golden: dict, prefix: str) -> dict:
    """The reference state dict stored under `prefix` (e.g. "dense/init/"), tied key restored."""
    sd = {k[len(prefix):]: v for k, v in golden.items() if k.startswith(prefix)}
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
