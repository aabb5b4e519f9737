"""Shared test setup: the tests' jax options (helpers.JAX_OPTIONS), the test run's compilation
cache and the golden fixtures. Everything else the tests share is in tests/helpers.py."""

import os
import shutil
import subprocess
import tempfile

import jax
import numpy as np
import pytest

from tests.helpers import (
    GOLDEN_PATH,
    JAX_OPTIONS,
    MINIMIND3_GOLDEN_PATH,
    REPO_ROOT,
    TEST_COMPILE_CACHE,
    compile_cache_options,
)

for _name, _value in JAX_OPTIONS.items():
    jax.config.update(_name, _value)

_OWNED_CACHE = pytest.StashKey[str]()
_REPO_BEFORE = pytest.StashKey[set]()
_REPO_WRITES = pytest.StashKey[list]()


def pytest_configure(config):
    """One persistent compilation cache for the whole test run, in a temporary folder: the
    tests and their children (helpers.subprocess_env) compile the same tiny programs over and
    over, and load them from it instead (the cache key covers program, options and devices, so
    a test never gets another's program). The first process makes it; pytest-xdist workers
    inherit its path; it is deleted at the end, and the user's own cache is never touched."""
    if TEST_COMPILE_CACHE not in os.environ:
        os.environ[TEST_COMPILE_CACHE] = tempfile.mkdtemp(prefix="minimind_jax_test_xla_")
        config.stash[_OWNED_CACHE] = os.environ[TEST_COMPILE_CACHE]
    for name, value in compile_cache_options().items():
        jax.config.update(name, value)
    if "PYTEST_XDIST_WORKER" not in os.environ and (before := repo_paths()) is not None:
        config.stash[_REPO_BEFORE] = before


# Tests write only into temporary folders: the repository's untracked and ignored paths (caches
# of bytecode, pytest and ruff aside) and its fixtures are the same after the run as before.
_NOT_WRITES = ("__pycache__/", ".pytest_cache/", ".ruff_cache/")


def repo_paths() -> set[str] | None:
    """The repository's untracked and ignored paths, one per file, and the tracked files under
    tests/fixtures that differ from the index, as "XY path" lines of `git status`; None
    without git or outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "-z", "--ignored",
             "--untracked-files=all"], cwd=REPO_ROOT, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    entries = [e for e in out.stdout.decode(errors="replace").split("\0") if e]
    return {e for e in entries
            if len(e) > 3 and not any(part in e for part in _NOT_WRITES)
            and (e[:2] in ("??", "!!") or e[3:].startswith("tests/fixtures/"))}


def pytest_sessionfinish(session):
    """The controller (not a pytest-xdist worker) compares the repository with its state at
    the start: a path that a test wrote outside its temporary folders fails the run."""
    before = session.config.stash.get(_REPO_BEFORE, None)
    if before is None or (after := repo_paths()) is None:
        return
    if new := sorted(after - before):
        session.config.stash[_REPO_WRITES] = new
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, config):
    if new := config.stash.get(_REPO_WRITES, None):
        terminalreporter.section("writes outside temporary folders", red=True, bold=True)
        terminalreporter.line("the run left these in the repository (git status; tests must "
                              "write only under tmp_path):")
        for entry in new:
            terminalreporter.line(f"  {entry}")


def pytest_unconfigure(config):
    if folder := config.stash.get(_OWNED_CACHE, None):
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def golden():
    with np.load(GOLDEN_PATH) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def minimind3_golden():
    """minimind-3 (upstream HEAD d65ef2c) goldens, SPEC3 section 6."""
    with np.load(MINIMIND3_GOLDEN_PATH) as data:
        return {k: data[k] for k in data.files}
