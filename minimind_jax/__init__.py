"""minimind_jax: a pure-functional JAX port of the MiniMind2 pretrain + full-SFT pipeline.

Importing it changes nothing in the process: the CPU tunings (`xla_flags.apply_cpu_defaults`,
`host_memory.reexec_with_hugepages`) are applied by the CLI entry point, or by whoever calls them.
"""

__version__ = "0.1.0"
