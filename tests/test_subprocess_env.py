"""Child processes run under the tests' jax options (helpers.JAX_OPTIONS), read by jax from the
environment that helpers.subprocess_env builds: an implicit rank promotion fails there too."""

import json
import subprocess

from tests.helpers import JAX_OPTIONS, child_argv, subprocess_env


def test_children_get_the_jax_options_and_refuse_rank_promotion():
    done = subprocess.run(child_argv("jax_options", *JAX_OPTIONS), env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report == {"options": JAX_OPTIONS, "rank_promotion_refused": True}
