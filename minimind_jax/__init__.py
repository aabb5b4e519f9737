"""minimind_jax: a pure-functional JAX port of the MiniMind2 pretrain + full-SFT pipeline."""

__version__ = "0.1.0"
