"""JAX's persistent compilation cache for the CLI's commands that compile models.

A run compiles its init and train step from scratch each time it starts: seconds on a CPU,
tens of seconds for the bigger presets on a GPU, paid again by every rerun, `--resume`, eval or
chat of the same shapes. With JAX's on-disk cache the later ones load the executables instead
(the cache key covers the program, devices, compile options, XLA flags and the jax version, so
a changed program is compiled anew). Only compilations of 1 s or more are kept (JAX's default).

The CLI points it at `$XDG_CACHE_HOME/minimind_jax/xla` (`~/.cache/...`) for a real process
entry of the commands that train or run models, unless the user already chose a folder
(`JAX_COMPILATION_CACHE_DIR`) or turned it off (`MINIMIND_JAX_COMPILE_CACHE=0`); a folder it
cannot write is one warning line and no cache. The folder holds only cached executables and can
be deleted at any time. Importing this module does nothing.
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Mapping

ENV_SWITCH = "MINIMIND_JAX_COMPILE_CACHE"


def default_cache_dir(environ: Mapping[str, str]) -> pathlib.Path:
    """`$XDG_CACHE_HOME/minimind_jax/xla`, or `~/.cache/minimind_jax/xla`."""
    base = environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "minimind_jax" / "xla"


def enable_default(environ: Mapping[str, str] = os.environ) -> str | None:
    """Turn the persistent cache on (call before the process's first compilation); returns
    the folder in use, or None when it is off."""
    import jax

    if environ.get(ENV_SWITCH, "1") == "0":
        return None
    chosen = jax.config.jax_compilation_cache_dir  # JAX_COMPILATION_CACHE_DIR, the user's
    if chosen:
        return chosen
    path = default_cache_dir(environ)
    try:
        path.mkdir(parents=True, exist_ok=True)
        writable = os.access(path, os.W_OK)
    except OSError:
        writable = False
    if not writable:  # else JAX warns at every compilation it cannot read back or store
        print(f"warning: no compilation cache: cannot write {path} (set "
              f"JAX_COMPILATION_CACHE_DIR to another folder, or {ENV_SWITCH}=0)",
              file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    return str(path)
