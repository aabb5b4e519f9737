"""Huge pages for malloc: when the CLI re-executes itself, and that a training process gets them."""

import json
import subprocess
import sys

import pytest

from minimind_jax.runtime import host_memory
from minimind_jax.runtime.host_memory import ENV_SWITCH, TUNABLE, hugepage_environ
from tests.helpers import subprocess_env

GLIBC = (2, 36)


def test_tunable_added_on_glibc_with_madvise_thp():
    env = hugepage_environ({"PATH": "/bin"}, GLIBC, "madvise")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": TUNABLE}


def test_other_tunables_kept():
    env = hugepage_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "madvise")
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}"


@pytest.mark.parametrize("environ, libc, mode", [
    ({ENV_SWITCH: "0"}, GLIBC, "madvise"),  # switched off
    ({"GLIBC_TUNABLES": TUNABLE}, GLIBC, "madvise"),  # already re-executed: no loop
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=2"}, GLIBC, "madvise"),  # the user's own choice
    ({}, (2, 31), "madvise"),  # glibc without the tunable
    ({}, None, "madvise"),  # not glibc
    ({}, GLIBC, "never"),  # THP off
    ({}, GLIBC, "always"),  # THP for everything already
    ({}, GLIBC, None),  # no THP support
])
def test_no_reexec_when_nothing_to_gain(environ, libc, mode):
    assert hugepage_environ(environ, libc, mode) is None


def test_thp_mode_parsed(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert host_memory.thp_mode(str(path)) == "madvise"
    assert host_memory.thp_mode(str(tmp_path / "missing")) is None


def _bench(tmp_path, **env):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "minimind_jax.cli", "bench", "--dim", "64", "--n_layers", "1",
           "--n_heads", "2", "--n_kv_heads", "1", "--vocab_size", "256", "--batch_size", "2",
           "--seq_len", "32", "--steps", "1", "--warmup", "0", "--no_torch", "--json", str(out)]
    environ = {k: v for k, v in subprocess_env().items() if k != "GLIBC_TUNABLES"} | env
    subprocess.run(cmd, check=True, env=environ, capture_output=True, timeout=300)
    return json.loads(out.read_text())


def test_training_commands_run_with_hugepages(tmp_path):
    glibc, thp = host_memory.glibc_version(), host_memory.thp_mode()
    if hugepage_environ({}, glibc, thp) is None:
        libc = "glibc " + ".".join(map(str, glibc)) if glibc else "no glibc"
        pytest.skip(f"needs glibc 2.35+ with THP in madvise mode (here: {libc}, THP {thp})")
    assert _bench(tmp_path)["host_hugepages"] is True
    assert _bench(tmp_path, **{ENV_SWITCH: "0"})["host_hugepages"] is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the re-exec is Linux-only")
def test_reexec_replays_the_command_line_but_never_replaces_a_notebook(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory.os, "execve", lambda *args: calls.append(args))
    monkeypatch.setattr(host_memory, "hugepage_environ", lambda *_: {"GLIBC_TUNABLES": TUNABLE})
    monkeypatch.setitem(sys.modules, "IPython", object())
    host_memory.reexec_with_hugepages()
    assert calls == []
    monkeypatch.delitem(sys.modules, "IPython")
    host_memory.reexec_with_hugepages()
    assert calls == [(sys.executable, sys.orig_argv, {"GLIBC_TUNABLES": TUNABLE})]
