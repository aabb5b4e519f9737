"""Shared test setup: the tests' jax options (helpers.JAX_OPTIONS), the test run's compilation
cache and the golden fixtures. Everything else the tests share is in tests/helpers.py."""

import os
import shutil
import tempfile

import jax
import numpy as np
import pytest

from tests.helpers import (
    GOLDEN_PATH,
    JAX_OPTIONS,
    MINIMIND3_GOLDEN_PATH,
    TEST_COMPILE_CACHE,
    compile_cache_options,
)

for _name, _value in JAX_OPTIONS.items():
    jax.config.update(_name, _value)

_OWNED_CACHE = pytest.StashKey[str]()


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
