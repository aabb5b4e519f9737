"""Training recipes: ours, MiniMind2's and minimind-3's (the stages' own defaults: train.stages).

`minimind2` is the MiniMind2 reference's data order and schedule (file order, its `get_lr`);
`minimind3` is minimind-3's trainer (shared/SPEC3.md section 5): each epoch `torch.randperm`
after seeding with seed + epoch (seed 42), its `get_lr` of the 1-based micro-step, the last
partial batch kept, a flush of a partial accumulation window at each epoch's end, SFT draws
seeded with seed + epoch, and SFT starting from the pretrain weights rounded to float16 (as
minimind-3's weight files hold them).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from minimind_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a recipe fixes beyond the stage defaults (`name` None: ours)."""

    name: str | None = None
    shuffle: bool = True
    permutation: str = "numpy"  # data.batches.PERMUTATIONS
    lr_schedule: str | None = None  # None: the config's (default cosine)
    seed: int = 1337  # the default seed
    flush_epoch_end: bool = False
    # MiniMind2: accumulation windows counted per epoch, leftovers carried into the next
    # epoch's first window (optim.minimind2_windows)
    epoch_windows: bool = False
    fp16_sft_init: bool = False


RECIPES = {
    "minimind2": Recipe("minimind2", shuffle=False, lr_schedule="minimind2",
                        epoch_windows=True),
    "minimind3": Recipe("minimind3", permutation="torch", lr_schedule="minimind3", seed=42,
                        flush_epoch_end=True, fp16_sft_init=True),
}

def recipe_named(name: str | Recipe | None) -> Recipe:
    """The recipe called `name` (None: ours; a Recipe is returned as it is)."""
    if isinstance(name, Recipe):
        return name
    if name is None:
        return Recipe()
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return RECIPES[name]


def round_to_float16(params):
    """float32(float16(w)) per leaf: the weights as minimind-3's .pth files store them."""
    import jax

    return jax.tree.map(lambda x: np.asarray(np.asarray(x, np.float16), np.float32), params)
