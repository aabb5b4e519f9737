"""Import minimind_jax and every submodule; fail naming any environment variable that changed."""

import importlib
import os
import pkgutil

before = dict(os.environ)
import minimind_jax  # noqa: E402  (the environment must be read before the import)

for module in pkgutil.walk_packages(minimind_jax.__path__, "minimind_jax."):
    importlib.import_module(module.name)
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
assert not changed, changed
