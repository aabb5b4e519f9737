"""The XLA:CPU defaults respect the user's flags, unmeasured jaxlib versions and accelerators,
and importing the package changes no environment variable."""

import os
import subprocess

from minimind_jax.runtime import xla_flags
from minimind_jax.runtime.xla_flags import CPU_FLAGS, cpu_backend_expected, with_cpu_defaults
from tests.helpers import child_argv, subprocess_env


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
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    xla_flags.apply_cpu_defaults()
    assert "XLA_FLAGS" not in os.environ
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    xla_flags.apply_cpu_defaults()
    assert os.environ["XLA_FLAGS"].split() == list(CPU_FLAGS)


def test_importing_every_module_leaves_the_environment_alone():
    result = subprocess.run(child_argv("import_every_module"), env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
