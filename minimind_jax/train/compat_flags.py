"""The reference training scripts' flags, accepted by `pretrain` and `sft` as they are.

A command line of MiniMind2's `train_pretrain.py` / `train_full_sft.py` (d9453ed) or of
minimind-3's `trainer/train_pretrain.py` / `trainer/train_full_sft.py` (d65ef2c) runs here with
only the script name replaced. Each flag is either mapped onto ours (`--hidden_size` is `--dim`,
`--save_dir` is `--out_dir`, `--from_resume 1` is `--resume`, ...) or, where it has no meaning in
this port, accepted with one printed line saying why (`--ddp`, `--num_workers`, ...).

`add_reference_args` declares them (all default to None, so "given" is visible);
`apply(args)` rewrites the namespace before the run and returns the lines to print.
"""

from __future__ import annotations

import argparse

from minimind_jax.errors import UserError

GROUP_TITLE = "reference compatibility (flags of MiniMind2's and minimind-3's training scripts)"

# Flags only minimind-3's scripts have: a command line with one of them is a minimind-3 run.
MINIMIND3_ONLY_FLAGS = ("hidden_size", "num_hidden_layers", "save_dir", "save_weight",
                        "from_weight", "from_resume", "use_compile")


def add_reference_args(parser: argparse.ArgumentParser) -> None:
    """The reference-only flags of the training scripts, in their own --help group."""
    g = parser.add_argument_group(GROUP_TITLE, description=(
        "Their other flags are ours under the same name: --out_dir --data_path --epochs\n"
        "--batch_size --learning_rate --accumulation_steps --grad_clip --warmup_iters\n"
        "--log_interval --save_interval --dim --n_layers --max_seq_len --dtype,\n"
        "--use_moe 0|1|True|False (model), --use_wandb --wandb_project (experiment tracking)."))
    g.add_argument("--hidden_size", type=int, default=None, help="minimind-3's name of --dim")
    g.add_argument("--num_hidden_layers", type=int, default=None,
                   help="minimind-3's name of --n_layers")
    g.add_argument("--save_dir", default=None, help="minimind-3's name of --out_dir")
    g.add_argument("--save_weight", default=None, metavar="PREFIX",
                   help="minimind-3's weight-name prefix: the run folder becomes "
                        "OUT_DIR/PREFIX_{dim}[_moe] (default pretrain / full_sft)")
    g.add_argument("--from_weight", default=None, metavar="NAME",
                   help="minimind-3: start from OUT_DIR/NAME_{dim}[_moe] (our run folder, or "
                        "the reference's .pth of that name); `none` = random init")
    g.add_argument("--from_resume", type=int, choices=(0, 1), default=None,
                   help="minimind-3: 1 = --resume")
    g.add_argument("--device", default=None,
                   help="`cpu` runs on the CPU; `cuda[:N]`: jax uses every visible device")
    g.add_argument("--num_workers", type=int, default=None,
                   help="accepted; the loader reads a memory-mapped token cache with a "
                        "background prefetch thread")
    g.add_argument("--ddp", action="store_true", default=None,
                   help="accepted; data parallelism always spans every device")
    g.add_argument("--local_rank", type=int, default=None,
                   help="accepted; jax assigns process ranks itself")
    g.add_argument("--use_compile", type=int, choices=(0, 1), default=None,
                   help="accepted; every train step is always jit-compiled by XLA")


def _tag(args: argparse.Namespace) -> str:
    """The run-name suffix of the model flags, without touching JAX (whose devices
    `--device` may still choose)."""
    from minimind_jax.model.config import PRESETS, arch_defaults

    config = (PRESETS[args.preset] if getattr(args, "preset", None)
              else arch_defaults(getattr(args, "arch", None) or "minimind2"))
    changes = {f: getattr(args, f) for f in ("dim", "use_moe") if getattr(args, f) is not None}
    return config.replace(**changes).tag


def _rename(args: argparse.Namespace, old: str, new: str, notes: list[str]) -> None:
    """Move the reference's `--old` onto our `--new` (an error if both disagree)."""
    value = getattr(args, old)
    if value is None:
        return
    ours = getattr(args, new)
    if ours is not None and ours != value:
        raise UserError(f"--{old} {value} and --{new} {ours} disagree; give one of them")
    setattr(args, new, value)
    notes.append(f"--{old} {value}: used as --{new} {value}")


def _from_weight(args: argparse.Namespace, notes: list[str]) -> None:
    """minimind-3's `--from_weight NAME` loads save_dir/NAME_{hidden}{_moe}.pth; here the run
    folder of that name (or such a .pth file) becomes --init_from."""
    from minimind_jax.train.run_folder import find_saved_weights

    name = args.from_weight
    if name is None:
        return
    if args.init_from:
        raise UserError(f"--from_weight {name} and --init_from {args.init_from}: give one")
    if name == "none":
        args.init_from = "none"
        notes.append("--from_weight none: random initial weights")
        return
    found = find_saved_weights(args.out_dir, f"{name}_{_tag(args)}",
                               f"--from_weight {name} loads those weights")
    args.init_from = str(found)
    notes.append(f"--from_weight {name}: used as --init_from {found}")


def apply(args: argparse.Namespace) -> list[str]:
    """Map the reference flags in `args` onto ours, in place; return one line per flag given.

    Runs before JAX picks its devices, so `--device cpu` can still select the CPU.
    """
    notes: list[str] = []
    given = [f"--{f}" for f in MINIMIND3_ONLY_FLAGS if getattr(args, f) is not None]
    if given and args.arch is None and args.preset is None:
        args.arch = "minimind3"
        notes.append(f"{' '.join(given)}: minimind-3's script flags, so --arch minimind3 "
                     "(give --arch minimind2 for a MiniMind2 model)")
    if args.device is not None:
        notes.append(_device(args.device))
    if args.save_dir is not None:
        args.out_dir = args.save_dir
        notes.append(f"--save_dir {args.save_dir}: used as --out_dir")
    _rename(args, "hidden_size", "dim", notes)
    _rename(args, "num_hidden_layers", "n_layers", notes)
    if args.save_weight is not None:
        args.run_prefix = args.save_weight
        notes.append(f"--save_weight {args.save_weight}: run folder "
                     f"{args.out_dir}/{args.save_weight}_{_tag(args)}")
    _from_weight(args, notes)
    if args.from_resume is not None:
        args.resume = args.resume or bool(args.from_resume)
        notes.append(f"--from_resume {args.from_resume}: "
                     + ("used as --resume" if args.from_resume else "a fresh run"))
    if args.num_workers is not None:
        notes.append(f"--num_workers {args.num_workers}: ignored; batches come from a "
                     "memory-mapped token cache, prefetched on a background thread")
    if args.ddp:
        notes.append("--ddp: nothing to switch on; data parallelism always spans every device "
                     "of every process (see --num_processes for several hosts)")
    if args.local_rank is not None:
        notes.append(f"--local_rank {args.local_rank}: ignored; jax numbers the processes "
                     "itself (--process_id, or from SLURM/Open MPI/TPU)")
    if args.use_compile is not None:
        notes.append(f"--use_compile {args.use_compile}: ignored; the train step is always "
                     "jit-compiled by XLA")
    return notes


def _device(device: str) -> str:
    """`--device cpu` pins JAX to the CPU (before it starts its backends); a GPU name only
    says what jax does anyway."""
    import jax

    if device.strip().lower() == "cpu":
        jax.config.update("jax_platforms", "cpu")
        return "--device cpu: running on the CPU"
    return (f"--device {device}: ignored; jax uses every visible device of its default backend "
            "(restrict with CUDA_VISIBLE_DEVICES or --local_device_ids)")
