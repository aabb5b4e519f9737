"""The CLI with each batch delayed on the host by SECONDS, so a parent can land a signal mid-run
(the device step and everything it saves are untouched): `python slow_cli.py SECONDS <command> ...`.
"""

import sys
import time

from minimind_jax import cli
from minimind_jax.train import train_step

delay = float(sys.argv[1])
put_batch = train_step.put_batch


def slow_put_batch(batch, mesh):
    time.sleep(delay)
    return put_batch(batch, mesh)


train_step.put_batch = slow_put_batch
sys.exit(cli.main(sys.argv[2:]))
