"""The command line: the parser (one sub-command per module's `register`, in the layers below).
`main` is the `minimind-jax` entry point."""

from minimind_jax.cli.parser import build_parser, main

__all__ = ["build_parser", "main"]
