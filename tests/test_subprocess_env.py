"""Child processes run under the tests' jax options (helpers.JAX_OPTIONS), read by jax from the
environment that helpers.subprocess_env builds: an implicit rank promotion fails there too; and
they share the test run's compilation cache, as the pytest process does."""

import json
import subprocess

import jax

from tests.helpers import JAX_OPTIONS, child_argv, compile_cache_options, subprocess_env


def test_children_get_the_jax_options_and_refuse_rank_promotion():
    done = subprocess.run(child_argv("jax_options", *JAX_OPTIONS), env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report == {"options": JAX_OPTIONS, "rank_promotion_refused": True}


def test_children_share_the_runs_compilation_cache():
    options = compile_cache_options()
    assert options["jax_compilation_cache_dir"] == jax.config.jax_compilation_cache_dir
    done = subprocess.run(child_argv("jax_options", *options), env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["options"] == options
