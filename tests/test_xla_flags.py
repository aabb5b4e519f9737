"""The XLA:CPU defaults respect the user's flags, unmeasured jaxlib versions and accelerators,
and importing the package changes no environment variable."""

import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimind_jax.infer import generate
from minimind_jax.model.transformer import init_cache
from minimind_jax.runtime import xla_flags
from minimind_jax.runtime.xla_flags import (
    CPU_FLAGS,
    DECODE_OPTIONS,
    DecodingJit,
    cpu_backend_expected,
    decode_compiler_options,
    jit_for_decoding,
    with_cpu_defaults,
)
from minimind_jax.serve import engine
from tests.helpers import child_argv, subprocess_env
from tests.serve_fixtures import TINY, tiny_model


def test_defaults_added_for_measured_jaxlib():
    assert with_cpu_defaults("", "0.10.2").split() == list(CPU_FLAGS)


def test_user_flag_wins_and_other_flags_kept():
    user = "--xla_force_host_platform_device_count=4 --xla_cpu_experimental_ynn_fusion_type=dot"
    flags = with_cpu_defaults(user, "0.10.2").split()
    assert flags[:2] == user.split()  # the user's own value of a default's flag stays
    assert [f for f in flags if f.startswith("--xla_cpu_experimental_ynn")] == user.split()[1:]
    assert flags[2:] == [f for f in CPU_FLAGS if not f.startswith("--xla_cpu_experimental_ynn")]


def test_nothing_added_for_other_jaxlib_versions():
    assert with_cpu_defaults("--a=1", "0.11.2") == "--a=1"
    assert with_cpu_defaults("", None) == ""


def test_cpu_expected_from_jax_platforms_or_missing_plugins():
    assert cpu_backend_expected({"JAX_PLATFORMS": "cpu"}, ["xla_cuda12"])
    assert not cpu_backend_expected({"JAX_PLATFORMS": "cuda,cpu"}, [])
    assert not cpu_backend_expected({"JAX_PLATFORM_NAME": "tpu"}, [])
    assert cpu_backend_expected({}, [])
    assert not cpu_backend_expected({}, ["xla_cuda12"])
    assert not cpu_backend_expected({}, ["libtpu"])


def test_apply_cpu_defaults_only_for_the_cpu(monkeypatch):
    monkeypatch.setattr(xla_flags.metadata, "version", lambda _: "0.10.2")
    monkeypatch.setenv("XLA_FLAGS", "")  # (delenv of an unset name would not undo our set)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    xla_flags.apply_cpu_defaults()
    assert os.environ["XLA_FLAGS"] == ""
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    xla_flags.apply_cpu_defaults()
    assert os.environ["XLA_FLAGS"].split() == list(CPU_FLAGS)


def test_importing_every_module_leaves_the_environment_alone():
    result = subprocess.run(child_argv("import_every_module"), env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_decode_options_only_on_the_cpu_with_a_measured_jaxlib_unless_the_user_chose():
    assert decode_compiler_options({}, "0.10.2", "cpu") == DECODE_OPTIONS
    assert decode_compiler_options({}, "0.10.2", "gpu") == {}
    assert decode_compiler_options({}, "0.11.0", "cpu") == {}
    assert decode_compiler_options({}, None, "cpu") == {}
    assert decode_compiler_options({"MINIMIND_JAX_XLA_DEFAULTS": "0"}, "0.10.2", "cpu") == {}
    user = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
    assert decode_compiler_options(user, "0.10.2", "cpu") == {}
    # what apply_cpu_defaults wrote is ours, not the user's (before, it turned the options off)
    ours = {"XLA_FLAGS": with_cpu_defaults("--xla_force_host_platform_device_count=2", "0.10.2")}
    assert decode_compiler_options(ours, "0.10.2", "cpu") == DECODE_OPTIONS


def skip_unless_decode_options_apply():
    """Skip, saying why, where this process compiles no decode options: another backend, or a
    jaxlib the options were not measured on (then they go untested until MEASURED_JAXLIB
    names it: the reason carries both versions, for the -ra summary)."""
    installed, backend = xla_flags.installed_jaxlib_version(), jax.default_backend()
    if decode_compiler_options({}, installed, backend):
        return
    measured = ", ".join(v + "*" for v in xla_flags.MEASURED_JAXLIB)
    if backend != "cpu":
        pytest.skip(f"decode options apply to the CPU only (backend: {backend})")
    pytest.skip(f"jaxlib {installed} is not a measured version (measured: {measured}): "
                "decode options untested")


def test_a_decode_program_compiles_its_dots_without_ynnpack_and_others_keep_it():
    """What the option changes: this jaxlib's default puts a dot in a YNNPACK fusion; a decode
    program's dot is XLA's own (the server's decode step and `generate` are such programs)."""
    skip_unless_decode_options_apply()

    def matmul(a, b):
        return a @ b

    x_BD, w_DD = jnp.ones((8, 64)), jnp.ones((64, 64))
    default = jax.jit(matmul).lower(x_BD, w_DD).compile().as_text()
    decoding = jit_for_decoding()(matmul).jitted.lower(x_BD, w_DD).compile().as_text()
    assert "__ynn_fusion" in default and "__ynn_fusion" not in decoding
    assert isinstance(generate._generate_padded, DecodingJit)
    params, B = tiny_model(), 2
    slots = engine.SlotTable(B)
    step = engine._decode_step.jitted.lower(
        params, init_cache(TINY, B, 64, per_row_index=True), jnp.zeros((B, TINY.vocab_size), bool),
        slots.last_token, slots.seed, np.zeros(B, np.int32), slots.rows(slice(0, B)),
        config=TINY, rows=B, kv_len=64).compile().as_text()
    assert "__ynn_fusion" not in step and " dot(" in step


def test_decode_programs_lose_ynnpack_in_a_process_that_applied_the_defaults():
    """The CLI applies the defaults before anything else; their YNNPACK flag in XLA_FLAGS must
    not count as the user's choice (it did: decode programs kept the fusions in every command
    until this test)."""
    skip_unless_decode_options_apply()
    env = subprocess_env()
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(child_argv("decode_fusions"), env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {"default": True, "decoding": False}
