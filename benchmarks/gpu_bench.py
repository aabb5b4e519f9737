"""GPU figures for issue 6: minimind2-small and minimind2 at batch 64 x 512, bf16, beside eager
PyTorch (bf16 autocast) on the same card, plus scan_layers compile time for 8 vs 16 layers.

    python benchmarks/gpu_bench.py
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from minimind_jax.model.config import preset
from minimind_jax.model.transformer import MiniMind, init_params
from minimind_jax.runtime.host_memory import reexec_with_hugepages
from minimind_jax.tools.bench import run_bench


def scan_compile_seconds(config) -> float:
    params = init_params(config, 0)
    ids = jnp.asarray(np.zeros((8, 512), np.int32))
    loss = lambda p: MiniMind(config).apply({"params": p}, ids)[0].mean()
    start = time.perf_counter()
    jax.jit(jax.grad(loss)).lower(params).compile()
    return time.perf_counter() - start


if __name__ == "__main__":
    reexec_with_hugepages()  # as the training CLI does (runtime/host_memory.py)
    for name in ("minimind2-small", "minimind2"):
        print(f"== {name}", flush=True)
        run_bench(preset(name).replace(dtype="bfloat16"), 64, 512, steps=5, warmup=2,
                  with_torch=True)
    for layers in (8, 16):
        config = preset("minimind2").replace(dtype="bfloat16", n_layers=layers, scan_layers=True)
        print(f"scan_layers compile (fwd+bwd), {layers} layers: "
              f"{scan_compile_seconds(config):.1f} s", flush=True)
