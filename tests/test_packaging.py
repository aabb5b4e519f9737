"""The wheel: it builds without warnings, installs into a fresh venv and runs from there."""

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, subprocess_env

# What the wheel is built from (a copy, so the build's build/ and egg-info stay out of the tree).
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "minimind_jax")


def _build_wheel(tmp_path: Path) -> tuple[Path, str]:
    pytest.importorskip("build")
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO_ROOT / name, src / name)
    # --no-isolation: the installed setuptools (>= 77, the test extra), no download.
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                           "--outdir", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    (wheel,) = (tmp_path / "dist").glob("minimind_jax-*.whl")
    with zipfile.ZipFile(wheel) as archive:  # the license text travels with the wheel
        assert any(name.endswith(".dist-info/licenses/LICENSE") for name in archive.namelist())
    return wheel, log


@pytest.mark.slow
def test_wheel_installs_in_a_fresh_venv_and_runs_the_demo(tmp_path):
    wheel, log = _build_wheel(tmp_path)
    assert "deprecat" not in log.lower(), [line for line in log.splitlines()
                                           if "deprecat" in line.lower()]

    # A fresh venv that sees the installed dependencies (jax, ...) but gets minimind_jax from
    # the wheel: the editable install of the checkout must not be what runs.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    python = env_dir / "bin" / "python"
    env = subprocess_env()
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    env["VIRTUAL_ENV"] = str(env_dir)
    env["PATH"] = str(env_dir / "bin") + os.pathsep + env.get("PATH", "")
    cwd = tmp_path / "run"
    cwd.mkdir()
    run = lambda *argv, timeout=300: subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout)

    proc = run(python, "-m", "pip", "install", "--no-deps", "--ignore-installed",
               "--no-index", "-q", wheel)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    proc = run(python, "-c", "import minimind_jax, pathlib; "
               "print(pathlib.Path(minimind_jax.__file__).resolve().parent)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    package = Path(proc.stdout.strip())
    assert package.is_relative_to(env_dir.resolve()), package
    assert list((package / "templates").glob("*.jinja")), "templates/*.jinja not installed"
    assert (package / "web" / "chat.html").is_file(), "web/chat.html not installed"

    script = env_dir / "bin" / "minimind-jax"
    assert script.is_file()
    proc = run(script, "demo", "--tiny", "--out_dir", cwd / "demo", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "=== [8/8]" in proc.stdout
    assert (cwd / "demo" / "loss.png").is_file()
