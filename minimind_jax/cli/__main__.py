"""`python -m minimind_jax.cli <command> ...`."""

import sys

from minimind_jax.cli.parser import main

if __name__ == "__main__":
    sys.exit(main())
