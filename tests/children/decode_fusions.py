"""As the CLI starts (XLA:CPU defaults applied first): print which of a decode program and a
plain jit program compile a matmul into a YNNPACK fusion, as JSON."""

import json

from minimind_jax.runtime.xla_flags import apply_cpu_defaults

apply_cpu_defaults()

import jax  # noqa: E402  (after the flags, as the CLI imports it)
import jax.numpy as jnp  # noqa: E402

from minimind_jax.runtime.xla_flags import jit_for_decoding  # noqa: E402


def matmul(a, b):
    return a @ b


x_BD, w_DD = jnp.ones((8, 64)), jnp.ones((64, 64))
texts = {"default": jax.jit(matmul).lower(x_BD, w_DD).compile().as_text(),
         "decoding": jit_for_decoding()(matmul).jitted.lower(x_BD, w_DD).compile().as_text()}
print(json.dumps({name: "__ynn_fusion" in text for name, text in texts.items()}))
