"""The CLI in a fresh process, as `cli.main(argv)` (not the console entry point, which would add
its XLA:CPU flags and huge-page re-execution): `python cli_main.py <command> ...`."""

import sys

from minimind_jax import cli

sys.exit(cli.main(sys.argv[1:]))
