"""Thin entry point: `python train.py pretrain ...` is `minimind-jax pretrain ...`."""

import sys

from minimind_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
