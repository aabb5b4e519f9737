"""The XLA:CPU defaults respect the user's flags and unmeasured jaxlib versions."""

from minimind_jax.xla_flags import CPU_FLAGS, with_cpu_defaults


def test_defaults_added_for_measured_jaxlib():
    assert with_cpu_defaults("", "0.10.2").split() == list(CPU_FLAGS)


def test_user_flag_wins_and_other_flags_kept():
    user = "--xla_force_host_platform_device_count=4 --xla_cpu_experimental_ynn_fusion_type=dot"
    assert with_cpu_defaults(user, "0.10.2") == user


def test_nothing_added_for_other_jaxlib_versions():
    assert with_cpu_defaults("--a=1", "0.11.2") == "--a=1"
    assert with_cpu_defaults("", None) == ""
