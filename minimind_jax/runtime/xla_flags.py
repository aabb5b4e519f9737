"""XLA:CPU defaults that make the train step faster, applied before JAX creates its backend.

XLA reads XLA_FLAGS once, when the first backend is created. Importing minimind_jax changes no
environment variable: the CLI entry point calls `apply_cpu_defaults()` before any JAX work, and a
library user who wants the same speed calls it first thing too. Flags the user already set win.
The flags are experimental XLA options and an unknown flag aborts XLA, so they are added only for
the jaxlib versions they were measured on, and only when JAX will run on the CPU; set
MINIMIND_JAX_XLA_DEFAULTS=0 to add none.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pkgutil
from collections.abc import Iterable, Mapping
from importlib import metadata

# Let XNNPACK/YNNPACK take whole dot fusions (dot + elementwise epilogue): the SwiGLU FFN's
# three matmuls ran at ~70% of a lone matmul's speed without it; +13% train-step tokens/s for
# minimind2-small at 8 x 511 on 2 cores (benchmarks in docs/performance.md).
# XLA's concurrency-optimized thunk scheduler runs independent kernels side by side; on a
# decode step (one small kernel per layer and tensor) they fight over the cores: a
# minimind2-small server step of 32 rows over 1024 cache slots took 135 ms with it, 62 ms
# without (8 rows: 36 / 17 ms); the train step is unchanged (658 / 657 tokens/s).
CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot,eltwise",
             "--xla_cpu_enable_concurrency_optimized_scheduler=false")
MEASURED_JAXLIB = ("0.10.",)
ENV_SWITCH = "MINIMIND_JAX_XLA_DEFAULTS"
# Programs that decode a few rows per step (the server's decode step, `generate`) compile
# without YNNPACK fusions, which this jaxlib puts every dot in by default: its dots of a few
# rows are slower than XLA's own. minimind2-small's server decode step of 8 rows over 128 cache
# slots: 24.3-25.6 ms with them, 18.2-19.7 ms without; 32 rows over 1,024: 109.7 / 92.1 ms;
# one row: the same. Prefills of several rows keep them (4 x 64 tokens: 232 ms with, 258
# without; 2-core AVX2 VM). Per program, so one process gets both.
DECODE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def _measured(jaxlib_version: str | None) -> bool:
    return jaxlib_version is not None and jaxlib_version.startswith(MEASURED_JAXLIB)


def _flag_name(flag: str) -> str:
    """The name of a "--name=value" flag, without its dashes."""
    return flag.split("=", 1)[0].lstrip("-")


def installed_jaxlib_version() -> str | None:
    try:
        return metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return None


def with_cpu_defaults(xla_flags: str, jaxlib_version: str | None) -> str:
    """`xla_flags` plus our CPU defaults whose names it does not already set."""
    if not _measured(jaxlib_version):
        return xla_flags
    flags = xla_flags.split()
    names = {_flag_name(f) for f in flags}
    flags += [f for f in CPU_FLAGS if _flag_name(f) not in names]
    return " ".join(flags)


def cpu_backend_expected(environ: Mapping[str, str], plugins: Iterable[str]) -> bool:
    """Whether JAX will pick the CPU, judged without creating a backend: JAX_PLATFORMS names
    only cpu, or it is unset and no accelerator plugin (`jax_plugins.*`, libtpu) is installed."""
    platforms = environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME") or ""
    if platforms:
        return {p.strip() for p in platforms.split(",") if p.strip()} == {"cpu"}
    return not any(plugins)


def installed_accelerator_plugins() -> list[str]:
    """Names of the installed PJRT plugins JAX would load (CUDA, ROCm, TPU)."""
    names = []
    if importlib.util.find_spec("jax_plugins") is not None:
        import jax_plugins

        names += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    if importlib.util.find_spec("libtpu") is not None:
        names.append("libtpu")
    return names


def apply_cpu_defaults() -> None:
    """Add the measured XLA:CPU flags to XLA_FLAGS (call before the first JAX computation)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return
    if not cpu_backend_expected(os.environ, installed_accelerator_plugins()):
        return
    os.environ["XLA_FLAGS"] = with_cpu_defaults(os.environ.get("XLA_FLAGS", ""),
                                                installed_jaxlib_version())


def decode_compiler_options(environ: Mapping[str, str], jaxlib_version: str | None,
                            backend: str) -> dict[str, str]:
    """The XLA options of a program that decodes a few rows per step: DECODE_OPTIONS on the
    CPU with a measured jaxlib, unless the defaults are off or the user's XLA_FLAGS set the
    option. A flag that is exactly one of CPU_FLAGS counts as ours, not the user's:
    `apply_cpu_defaults` put it there (so a user who wants YNNPACK fusions in decode programs
    too sets them with another value, or turns the defaults off)."""
    if environ.get(ENV_SWITCH, "1") == "0" or backend != "cpu" or not _measured(jaxlib_version):
        return {}
    user = {_flag_name(f) for f in environ.get("XLA_FLAGS", "").split() if f not in CPU_FLAGS}
    return {name: value for name, value in DECODE_OPTIONS.items() if name not in user}


class DecodingJit:
    """`jax.jit(fun, **jit_kwargs)` whose programs compile with `decode_compiler_options`,
    decided at the first call (when JAX's backend is known), not at import."""

    def __init__(self, fun, **jit_kwargs):
        self.fun, self.jit_kwargs = fun, jit_kwargs
        functools.update_wrapper(self, fun)

    @functools.cached_property
    def jitted(self):
        import jax

        options = decode_compiler_options(os.environ, installed_jaxlib_version(),
                                          jax.default_backend())
        return jax.jit(self.fun, compiler_options=options or None, **self.jit_kwargs)

    def __call__(self, *args, **kwargs):
        return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self.jitted.lower(*args, **kwargs)


def jit_for_decoding(**jit_kwargs):
    """Decorator: `functools.partial(jax.jit, **jit_kwargs)` for a decode program."""
    return lambda fun: DecodingJit(fun, **jit_kwargs)
