"""Hold the lock of run folder RUN_DIR, print `held`, then sleep until killed:
`python hold_run_lock.py RUN_DIR`."""

import sys
import time

from minimind_jax.train import run_lock

with run_lock.hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
