"""Shared test setup: the tests' jax options (helpers.JAX_OPTIONS) and the golden fixtures.
Everything else the tests share is in tests/helpers.py."""

import jax
import numpy as np
import pytest

from tests.helpers import GOLDEN_PATH, JAX_OPTIONS, MINIMIND3_GOLDEN_PATH

for _name, _value in JAX_OPTIONS.items():
    jax.config.update(_name, _value)


@pytest.fixture(scope="session")
def golden():
    with np.load(GOLDEN_PATH) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def minimind3_golden():
    """minimind-3 (upstream HEAD d65ef2c) goldens, SPEC3 section 6."""
    with np.load(MINIMIND3_GOLDEN_PATH) as data:
        return {k: data[k] for k in data.files}
