"""minimind_jax: a pure-functional JAX port of the MiniMind2 pretrain + full-SFT pipeline."""

from minimind_jax.xla_flags import apply_cpu_defaults

__version__ = "0.1.0"

apply_cpu_defaults()
