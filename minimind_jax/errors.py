"""User-facing errors: the CLI prints these as one clear message, never a traceback."""


class UserError(Exception):
    """Bad input from the user (file, line, field, flag, checkpoint), stated plainly."""
