"""Print the values of the jax options named on the command line as JSON, with whether an
implicit rank promotion was refused: `python jax_options.py jax_numpy_rank_promotion ...`."""

import json
import sys

import jax
import jax.numpy as jnp

try:
    jnp.ones((3, 4)) + jnp.ones(4)
    refused = False
except ValueError:
    refused = True
print(json.dumps({"options": {name: getattr(jax.config, name) for name in sys.argv[1:]},
                  "rank_promotion_refused": refused}))
