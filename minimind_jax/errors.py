"""User-facing errors and the one mapping from exceptions to `error: ...` lines and exit codes.

`UserError` (bad input: file, line, field, flag, checkpoint; `ConfigError` for configs) exits
2; `RunFailure` (the run could not go on for a reason outside the program: a full disk, no
permission, an I/O error) exits 1; an OSError of that kind raised anywhere is reported the same
way. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno

# OSErrors caused by the machine, not by the program (a bug raises other kinds).
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                                errno.EPERM, errno.EIO, errno.EFBIG, errno.ENAMETOOLONG})


class UserError(Exception):
    """Bad input from the user (file, line, field, flag, checkpoint), stated plainly."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """An invalid config (ModelConfig, schedule, ...), from flags or from Python; a ValueError
    too, so library code that passes values in can catch it as one."""


class RunFailure(UserError):
    """The run stopped for an outside reason (disk full, permissions, I/O), stated plainly."""

    exit_code = 1


def os_error_line(err: OSError) -> str:
    """`PATH: reason` of an OSError (its strerror without the `[Errno N]` prefix)."""
    where = f"{err.filename}: " if err.filename else ""
    return where + (err.strerror or str(err))


def error_line_and_code(err: BaseException) -> tuple[str, int] | None:
    """(message, exit code) for an error the user should see as one line; None for a bug."""
    if isinstance(err, UserError):
        return str(err), err.exit_code
    if isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS:
        return os_error_line(err), RunFailure.exit_code
    return None
