"""The CLI's persistent compilation cache: a rerun of the same shapes loads the train step
instead of compiling it; the user's own folder and the off switch are respected."""

import subprocess
import sys

import jax
import pytest

from minimind_jax.runtime import compile_cache
from tests.helpers import REPO_ROOT, subprocess_env, tiny_run_argv


def test_default_folder_and_off_switch(tmp_path):
    assert compile_cache.default_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == \
        tmp_path / "minimind_jax" / "xla"
    assert compile_cache.enable_default({compile_cache.ENV_SWITCH: "0"}) is None


@pytest.fixture
def no_folder_chosen():
    """jax as in a user's process that chose no cache folder (the tests run with their own)."""
    kept = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    jax.config.update("jax_compilation_cache_dir", kept)


def test_a_folder_it_cannot_write_is_one_warning_and_no_cache(capsys, no_folder_chosen):
    assert compile_cache.enable_default({"XDG_CACHE_HOME": "/proc/no_such_cache"}) is None
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        "warning: no compilation cache: cannot write /proc/no_such_cache/minimind_jax/xla")


@pytest.mark.slow
def test_a_rerun_loads_the_train_step_from_the_cache(tmp_path):
    env = subprocess_env() | {"XDG_CACHE_HOME": str(tmp_path / "xdg"),
                              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                              "JAX_LOG_COMPILES": "1"}  # logs persistent-cache hits
    del env[compile_cache.ENV_SWITCH]
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    users = tmp_path / "users_folder"

    def run(extra_env, *extra):
        argv = tiny_run_argv("pretrain", tmp_path / "out", tmp_path / "cache", "--batch_size",
                             "8", "--max_steps", "2", *extra)
        done = subprocess.run([sys.executable, "-m", "minimind_jax.cli", *argv],
                              env=env | extra_env, cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout + done.stderr

    first, rerun = run({}), run({}, "--overwrite")
    elsewhere = run({"JAX_COMPILATION_CACHE_DIR": str(users)}, "--overwrite")
    folder = tmp_path / "xdg" / "minimind_jax" / "xla"
    assert f"compilation cache: {folder}" in first
    assert any(p.name.startswith("jit_step-") for p in folder.iterdir())
    hit = "Persistent compilation cache hit for 'jit_step'"
    assert hit not in first and hit in rerun
    assert f"compilation cache: {users}" in elsewhere and hit not in elsewhere
    assert any(p.name.startswith("jit_step-") for p in users.iterdir())
