"""Which reference generation a model follows, and what that fixes beyond the model's numerics:
one value per generation, read where behaviour depends on it (the stages, the data rules, the
tokenizer search, weight files) instead of branches on its name.

MiniMind2 is jingyaogong/minimind at d9453ed, minimind-3 its HEAD d65ef2c. A model's generation
follows from its numerics (`generation_of`: minimind-3's q/k norm); `--arch NAME` picks one.
The stages keep their per-generation formulas and defaults in tables keyed by `Generation.name`
(train/stages/*.py).
"""

from __future__ import annotations

import dataclasses

from minimind_jax.errors import ConfigError
from minimind_jax.model.config import ModelConfig, arch_of


@dataclasses.dataclass(frozen=True)
class Generation:
    """A reference generation's facts outside the model's numerics."""

    name: str  # the --arch value, and the key of the stages' per-generation tables
    reference: str  # the upstream code its exact behaviour comes from
    recipe: str  # the recipe (train.recipes) that reproduces its trainer step for step
    minimind3_lines: bool  # its trainers' console lines (train.log_lines): 1-based steps, ...
    float16_files: bool  # its scripts save weight and adapter .pth files in float16
    adapter_tag_has_moe: bool  # its LoRA adapter files are named {name}_{dim}[_moe].pth
    # where its scripts find the tokenizer, relative to where they run
    tokenizer_dirs: tuple[str, ...]


MINIMIND2 = Generation(
    name="minimind2", reference="jingyaogong/minimind @ d9453ed", recipe="minimind2",
    minimind3_lines=False, float16_files=False, adapter_tag_has_moe=False,
    tokenizer_dirs=("model/minimind_tokenizer",))
MINIMIND3 = Generation(
    name="minimind3", reference="jingyaogong/minimind @ d65ef2c (minimind-3)",
    recipe="minimind3", minimind3_lines=True, float16_files=True, adapter_tag_has_moe=True,
    # its scripts run from trainer/, the tokenizer lives in the repository's model/
    tokenizer_dirs=("model", "../model"))

GENERATIONS = {generation.name: generation for generation in (MINIMIND2, MINIMIND3)}


def generation_named(name: str) -> Generation:
    """The generation called `name` (an --arch value), or ConfigError."""
    if name not in GENERATIONS:
        raise ConfigError(f"unknown arch {name!r}; choose from {list(GENERATIONS)}")
    return GENERATIONS[name]


def generation_of(config: ModelConfig) -> Generation:
    """The generation whose numerics `config` has."""
    return GENERATIONS[arch_of(config)]
