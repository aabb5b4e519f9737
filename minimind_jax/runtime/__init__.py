"""The process and its devices: `jax.distributed`, XLA:CPU flags, huge pages, the persistent
compilation cache."""
