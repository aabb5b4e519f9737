"""Transparent huge pages for the host heap, so XLA:CPU's per-step buffers fault in cheaply.

XLA:CPU allocates one temp buffer per train step with malloc (3.1 GB for minimind2-small at
8 x 512). glibc maps an allocation that large afresh and unmaps it when it is freed, so every
step faults the whole buffer back in, 4 KiB at a time: 0.77M page faults and 1.3 s of kernel
time per step, ~20% of the tokens/s on 2 cores. glibc's tunable `glibc.malloc.hugetlb=1`
(glibc 2.35+) makes malloc advise transparent huge pages on the memory it maps: 2 MiB faults,
~500x fewer, and fewer TLB misses in the matmuls, with the same resident memory. (Keeping the
buffer with mallopt instead stops the faults too, but fragments the heap: the RSS grew from 4.5
to 10 GB in 12 steps.)

glibc reads tunables only when a process starts, so the CLI commands that train re-execute
their own command line once with the tunable added (same PID, same arguments), when JAX will run
on the CPU. Set MINIMIND_JAX_HUGEPAGES=0 to skip that.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import sys
from collections.abc import Mapping

from minimind_jax.runtime.xla_flags import cpu_backend_expected, installed_accelerator_plugins

ENV_SWITCH = "MINIMIND_JAX_HUGEPAGES"
TUNABLE = "glibc.malloc.hugetlb=1"
MIN_GLIBC = (2, 35)
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc, or None on another libc."""
    try:
        func = ctypes.CDLL(None).gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    func.restype = ctypes.c_char_p
    major, minor = func().decode().split(".")[:2]
    return int(major), int(minor)


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's THP mode (`always`, `madvise` or `never`), None if unknown."""
    try:
        text = pathlib.Path(path).read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


def hugepage_environ(environ: Mapping[str, str], libc: tuple[int, int] | None,
                     mode: str | None) -> dict[str, str] | None:
    """`environ` with the hugetlb tunable added, or None when there is nothing to gain (already
    set, switched off, not glibc 2.35+, THP unavailable or already `always`)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (environ.get(ENV_SWITCH, "1") == "0" or "glibc.malloc.hugetlb=" in tunables
            or libc is None or libc < MIN_GLIBC or mode != "madvise"):
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def reexec_with_hugepages() -> None:
    """Replace this process by the same command line with huge pages for malloc, if useful.

    Call it first thing in a command-line entry point (not in a library or a notebook): the
    process starts over, so nothing done before the call survives.
    """
    if not sys.platform.startswith("linux") or not sys.executable or _interactive():
        return
    if not cpu_backend_expected(os.environ, installed_accelerator_plugins()):
        return  # the device's memory is not malloc's
    environ = hugepage_environ(os.environ, glibc_version(), thp_mode())
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environ)


def _interactive() -> bool:
    """An interpreter or notebook kernel that must not be replaced by a re-execution."""
    return bool(sys.flags.interactive) or hasattr(sys, "ps1") or "IPython" in sys.modules


def hugepages_active(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process was started with the hugetlb tunable."""
    return TUNABLE in environ.get("GLIBC_TUNABLES", "")


def describe() -> str:
    """One line for logs: which pages malloc uses in this process."""
    if hugepages_active():
        return "host malloc: transparent huge pages (glibc.malloc.hugetlb=1)"
    return ("host malloc: default pages (huge pages need the CLI's re-exec on glibc 2.35+ with "
            f"THP in madvise mode, and {ENV_SWITCH} unset)")
