"""The --fsdp run (its metrics kept in straight/metrics.jsonl beside the run folder), its resume
from step 6, then the final state restored into the sharded layout, printed as `LAYOUT {...}`:
bytes each device holds.

    python fsdp_run.py pretrain ... --fsdp --max_steps 10 --save_interval 3
"""

import json
import pathlib
import shutil
import sys

import jax

from minimind_jax import cli
from minimind_jax.model.weights import load_weights
from minimind_jax.train import checkpoint, optim, train_step

argv = sys.argv[1:]
run_dir = pathlib.Path(argv[argv.index("--out_dir") + 1]) / "pretrain_64"
assert cli.main(argv) == 0
(run_dir.parent / "straight").mkdir()
shutil.copy(run_dir / "metrics.jsonl", run_dir.parent / "straight" / "metrics.jsonl")
for step in (9, 10):
    shutil.rmtree(run_dir / "checkpoints" / str(step))
assert cli.main(argv + ["--resume"]) == 0

config = load_weights(run_dir)[1]
optimizer = optim.make_optimizer(accumulation_steps=2)
abstract = train_step.abstract_train_state(config, optimizer, train_step.data_mesh(), fsdp=True)
with checkpoint.open_manager(run_dir, create=False) as manager:
    state, _ = checkpoint.restore_train_state(manager, abstract)
per_device = {}
for leaf in jax.tree.leaves(state.params):
    for shard in leaf.addressable_shards:
        per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
print("LAYOUT " + json.dumps({
    "params_per_device": per_device,
    "opt_state_local": train_step.local_bytes(state.opt_state),
    "opt_state_total": sum(x.nbytes for x in jax.tree.leaves(state.opt_state)),
    "specs": [str(x.sharding.spec) for x in jax.tree.leaves(state.params)],
    "shapes": [list(x.shape) for x in jax.tree.leaves(state.params)]}))
