"""Training recipes and per-stage defaults: ours, MiniMind2's and minimind-3's (HEAD's).

`--recipe minimind2` is the MiniMind2 reference's data order and schedule (file order, its
`get_lr`); `--recipe minimind3` is HEAD's trainer (SPEC3 section 5): each epoch `torch.randperm`
after seeding with seed + epoch (seed 42), its `get_lr` of the 1-based micro-step, the last
partial batch kept, a flush of a partial accumulation window at each epoch's end, SFT draws
seeded with seed + epoch, and SFT starting from the pretrain weights rounded to float16 (as
HEAD's weight files hold them). `--arch minimind3` also takes HEAD's stage defaults.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from minimind_jax.cli.model_args import arch_from_args
from minimind_jax.errors import UserError

RECIPES = ("minimind2", "minimind3")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a recipe fixes beyond the flags' defaults."""

    shuffle: bool = True
    permutation: str = "numpy"  # batches.PERMUTATIONS
    lr_schedule: str | None = None  # None: the --lr_schedule flag
    seed: int = 1337  # default --seed
    flush_epoch_end: bool = False
    fp16_sft_init: bool = False


_RECIPES = {
    None: Recipe(),
    "minimind2": Recipe(shuffle=False, lr_schedule="minimind2"),
    "minimind3": Recipe(permutation="torch", lr_schedule="minimind3", seed=42,
                        flush_epoch_end=True, fp16_sft_init=True),
}

# (stage command, arch) -> defaults of the flags left unset.
_STAGE_DEFAULTS = {
    ("pretrain", "minimind2"): dict(epochs=1, batch_size=32, learning_rate=5e-4,
                                    accumulation_steps=8),
    ("sft", "minimind2"): dict(epochs=1, batch_size=32, learning_rate=5e-5,
                               accumulation_steps=1),
    # HEAD's train_pretrain.py / train_full_sft.py defaults.
    ("pretrain", "minimind3"): dict(epochs=2, batch_size=32, learning_rate=5e-4,
                                    accumulation_steps=8, max_seq_len=340),
    ("sft", "minimind3"): dict(epochs=2, batch_size=16, learning_rate=1e-5,
                               accumulation_steps=1, max_seq_len=768),
}


def recipe_of(args: argparse.Namespace) -> Recipe:
    return recipe_named(getattr(args, "recipe", None))


def recipe_named(name: str | None) -> Recipe:
    """--recipe NAME's settings (None: no recipe)."""
    return _RECIPES[name]


def stage_defaults(command: str, arch: str) -> dict:
    return dict(_STAGE_DEFAULTS[(command, arch)])


def apply_defaults(args: argparse.Namespace, command: str) -> None:
    """Fill the training flags left unset (None) from the arch's stage defaults and the
    recipe; a recipe conflicts with explicit `--no_shuffle` / `--lr_schedule` of another."""

    arch = arch_from_args(args)
    for name, value in stage_defaults(command, arch).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    recipe = recipe_of(args)
    if args.seed is None:
        args.seed = recipe.seed
    if recipe.lr_schedule:
        if args.lr_schedule not in (None, recipe.lr_schedule):
            raise UserError(f"--recipe {args.recipe} uses --lr_schedule {recipe.lr_schedule}, "
                            f"not {args.lr_schedule}")
        args.lr_schedule = recipe.lr_schedule
    elif args.lr_schedule is None:
        args.lr_schedule = "cosine"
    if not recipe.shuffle:
        args.no_shuffle = True
    elif args.recipe and args.no_shuffle:
        raise UserError(f"--recipe {args.recipe} shuffles every epoch; drop --no_shuffle")


def round_to_float16(params):
    """float32(float16(w)) per leaf: the weights as HEAD's .pth files store them."""
    import jax

    return jax.tree.map(lambda x: np.asarray(np.asarray(x, np.float16), np.float32), params)
