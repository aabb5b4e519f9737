"""One process of a multi-process CLI run; with --resume, also this process's own multi-process
load_weights of the run, printed as `RESTORED {"process": ..., "sums": [...]}`.

    python distributed_run.py pretrain ... --coordinator_address HOST:PORT --process_id N
"""

import json
import sys

import jax
import numpy as np

from minimind_jax import cli
from minimind_jax.model.weights import load_weights

argv = sys.argv[1:]
code = cli.main(argv)
if code == 0 and "--resume" in argv:
    params, _, _ = load_weights(argv[argv.index("--out_dir") + 1] + "/pretrain_64")
    sums = [float(np.asarray(x, np.float64).sum()) for x in jax.tree.leaves(params)]
    print("RESTORED " + json.dumps({"process": jax.process_index(), "sums": sums}))
sys.exit(code)
