"""Three steps of a minimind-3 MoE model (batch-level aux, made large) on a 4-device mesh and on
a 1-device mesh of the same process; prints `MOE {"4": [[loss, aux, grad_norm], ...], "1": ...}`.
Run with 4 host devices (tests.helpers.subprocess_env(4))."""

import json

import jax
import numpy as np

from minimind_jax.model.config import arch_defaults
from minimind_jax.model.transformer import init_params
from minimind_jax.train import optim, train_step

config = arch_defaults("minimind3").replace(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=6400, max_seq_len=32, use_moe=True,
    aux_loss_alpha=0.1, dtype="float32")
ids = np.random.default_rng(0).integers(1, 6400, (8, 33), dtype=np.int32)
batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": np.ones((8, 32))}
optimizer = optim.make_optimizer(accumulation_steps=1)
schedule = optim.Schedule("cosine", 1e-3, total_steps=100)
runs = {}
for n in (4, 1):
    mesh = train_step.data_mesh(jax.devices()[:n])
    step_fn = train_step.make_train_step(config, optimizer, schedule, mesh)
    state = train_step.put_replicated(
        train_step.create_train_state(init_params(config, 0), optimizer), mesh)
    runs[n] = []
    for _ in range(3):
        state, m = step_fn(state, train_step.put_batch(batch, mesh))
        runs[n].append([float(m[k]) for k in ("loss", "aux", "grad_norm")])
print("MOE " + json.dumps(runs))
