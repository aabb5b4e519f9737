"""The training commands, one per stage of train.stages.STAGES (pretrain, sft, lora, dpo,
distill, distill_reason, grpo): their flags, read once into a `TrainConfig` and the stage's options.

Every flag that sets a TrainConfig field defaults to that field's default; a None default
(epochs, batch size, learning rate, accumulation, seed, schedule, shuffling) is resolved with
the stage's defaults for the model's arch and the recipe by `TrainConfig.resolved`, for the
command and for Python callers alike. The reference scripts' own flags are mapped first
(train.compat_flags).
"""

from __future__ import annotations

import argparse
import dataclasses

from minimind_jax.data import prepare
from minimind_jax.infer.infer_config import field_default
from minimind_jax.model import flags as model_flags
from minimind_jax.model.generation import GENERATIONS
from minimind_jax.runtime import distributed
from minimind_jax.train import compat_flags, evaluate, optim, recipes, tracking
from minimind_jax.train.run_log import say
from minimind_jax.train.stages import STAGES, Stage
from minimind_jax.train.train_config import (
    DataConfig,
    EvalConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    check_settings,
    resolve_model,
    resolve_settings,
)

_default = field_default


def run_stage(args: argparse.Namespace, stage: Stage) -> int:
    """A training command: `config_from_args`, the stage's options from its flags, then
    `train.loop.run`."""
    from minimind_jax.train.loop import run

    config = config_from_args(args, stage)
    if stage.options_from_args is not None:
        stage = dataclasses.replace(stage, options=stage.options_from_args(args))
    return run(config, stage)


def config_from_args(args: argparse.Namespace, stage: Stage) -> TrainConfig:
    """The command's flags as a resolved TrainConfig, checked before anything is created or
    opened; joins the distributed runtime (before the model flags' dtype `auto` asks JAX for
    its backend) and prints the reference flags' notes."""
    notes = stage.map_flags(args) if stage.map_flags is not None else []
    notes += compat_flags.apply(args)  # the reference's flags; may pick the CPU
    defaults = stage.defaults_for(model_flags.arch_from_args(args))
    settings = resolve_settings(settings_from_args(args), defaults)
    check_settings(settings)
    distributed.initialize(settings["distributed"])
    overrides = {}
    if args.max_seq_len is None and "max_seq_len" in defaults:
        overrides["max_seq_len"] = defaults["max_seq_len"]
    if getattr(args, "lora_rank", None) is not None:  # the lora command's flag
        overrides["lora_rank"] = args.lora_rank
    model = model_flags.model_config_from_args(args, **overrides)
    for note in notes:
        say(note)
    model = resolve_model(model, defaults)  # as TrainConfig.resolved does
    run = dataclasses.replace(settings["run"],
                              flags=_recorded_flags(args, settings, model))
    return TrainConfig(model=model, **{**settings, "run": run})


def settings_from_args(args: argparse.Namespace) -> dict:
    """The training flags (after `compat_flags.apply`) as a TrainConfig's fields but its model,
    unresolved: flags left unset stay None."""
    return dict(
        data=DataConfig(data_path=args.data_path, tokenizer=args.tokenizer,
                        batch_size=args.batch_size, shuffle=False if args.no_shuffle else None,
                        pack=args.pack, pack_window=args.pack_window, cache_dir=args.cache_dir,
                        skip_bad_lines=args.skip_bad_lines, sft_random=not args.no_sft_random,
                        length_buckets=args.length_buckets,
                        batch_packing=args.batch_packing),
        optim=OptimConfig(learning_rate=args.learning_rate,
                          accumulation_steps=args.accumulation_steps, epochs=args.epochs,
                          max_steps=args.max_steps, lr_schedule=args.lr_schedule,
                          warmup_iters=args.warmup_iters, grad_clip=args.grad_clip,
                          weight_decay=args.weight_decay),
        run=RunConfig(out_dir=args.out_dir, run_prefix=getattr(args, "run_prefix", None) or None,
                      init_from=args.init_from, resume=args.resume, overwrite=args.overwrite,
                      lora_init_from=getattr(args, "lora_init_from", None),
                      log_interval=args.log_interval, save_interval=args.save_interval,
                      max_consecutive_skips=args.max_consecutive_skips,
                      tracker=tracking.tracker_kind(args.tracker, args.use_wandb),
                      tracker_project=args.wandb_project),
        eval=EvalConfig(data_path=args.eval_data, interval=args.eval_interval,
                        batches=args.eval_batches),
        distributed=distributed.config_from_args(args),
        seed=args.seed,
        recipe=recipes.recipe_named(args.recipe),
        vocab_from_tokenizer=args.vocab_size is None)


def _recorded_flags(args: argparse.Namespace, settings: dict, model) -> dict:
    """What train_args.json records: the flags, with the defaults they resolved to."""
    data, optim_ = settings["data"], settings["optim"]
    flags = {k: v for k, v in vars(args).items() if k != "func"}
    flags.update(epochs=optim_.epochs, batch_size=data.batch_size,
                 learning_rate=optim_.learning_rate,
                 accumulation_steps=optim_.accumulation_steps, lr_schedule=optim_.lr_schedule,
                 no_shuffle=not data.shuffle, seed=settings["seed"],
                 eval_interval=settings["eval"].interval, max_seq_len=model.max_seq_len,
                 remat=model.remat)
    return flags


def _add_train_args(parser: argparse.ArgumentParser, stage: Stage) -> None:
    g = parser.add_argument_group("training (reference flag names)")
    g.add_argument("--out_dir", default=_default(RunConfig, "out_dir"),
                   help=f"runs go to OUT_DIR/{_by_arch(stage, 'run_prefix')}_{{dim}}[_moe]/")
    g.add_argument("--data_path", default=stage.data_path, help="training JSONL file")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (tokenizer.json) or sentencepiece .model; default: "
                        "the run's own copy with --resume, "
                        + ("else the copy in the run folder its weights start from, "
                           if stage.start_from else "")
                        + "else where the reference's scripts keep it: "
                        + "; ".join(f"{name}: " + ", ".join(f"./{d}" for d in g.tokenizer_dirs)
                                    for name, g in GENERATIONS.items()))
    _add_optim_flags(g, stage)
    _add_rows_flags(g)
    _add_run_flags(g, stage)


def _by_arch(stage: Stage, key: str, table=None) -> str:
    """`key`'s MiniMind2 value, and minimind-3's where it differs, for --help."""
    table = table if table is not None else {arch: d.get(key) for arch, d in
                                             stage.defaults.items()}
    ours, head = table["minimind2"], table["minimind3"]
    return f"{ours}" if ours == head else f"{ours} (--arch minimind3: {head})"


def _add_optim_flags(g, stage: Stage) -> None:
    """OptimConfig's flags, with --batch_size, --recipe, --no_sft_random and --seed (in the
    order --help lists them)."""
    ours, head = stage.defaults_for("minimind2"), stage.defaults_for("minimind3")
    g.add_argument("--epochs", type=int, default=None,
                   help=f"passes over the data (default {ours['epochs']}; --arch minimind3: "
                        f"{head['epochs']})")
    g.add_argument("--batch_size", type=int, default=None,
                   help=f"sequences per micro-batch, over all devices (default "
                        f"{ours['batch_size']}; --arch minimind3: {head['batch_size']})")
    g.add_argument("--learning_rate", type=float, default=None,
                   help=f"peak LR (default {ours['learning_rate']}; --arch minimind3: "
                        f"{head['learning_rate']})")
    g.add_argument("--accumulation_steps", type=int, default=None,
                   help=f"micro-batches whose mean gradient makes one optimizer update (default "
                        f"{ours['accumulation_steps']}; --arch minimind3: "
                        f"{head['accumulation_steps']})"
                        + (f". --arch minimind3 also defaults --max_seq_len to "
                           f"{head['max_seq_len']}" if "max_seq_len" in head else ""))
    g.add_argument("--recipe", choices=tuple(recipes.RECIPES), default=None,
                   help="reproduce a reference's trainer: minimind2 = --no_shuffle "
                        "--lr_schedule minimind2; minimind3 = minimind-3's per-epoch "
                        "torch.randperm seeded 42+epoch, its LR formula, end-of-epoch flush of "
                        "a partial accumulation window, SFT draws seeded 42+epoch, SFT from "
                        "the pretrain weights rounded to float16")
    g.add_argument("--no_sft_random", action="store_true",
                   help="minimind-3 SFT: no random system prompts and keep every empty think "
                        "block (minimind-3 adds a prompt with p=0.2 and strips with p=0.8)")
    g.add_argument("--grad_clip", type=float, default=_default(OptimConfig, "grad_clip"),
                   help="clip the global gradient norm to this (<= 0: no clipping)")
    g.add_argument("--weight_decay", type=float,
                   default=_default(OptimConfig, "weight_decay"),
                   help="AdamW decoupled weight decay, on every parameter (default "
                        "%(default)s, torch's)")
    g.add_argument("--lr_schedule", choices=optim.SCHEDULES, default=None,
                   help="cosine (default): linear warmup over --warmup_iters updates, then cosine "
                        "to lr/10; minimind2: the reference's lr/10 + lr/2*(1+cos(pi*step/total)) "
                        "per micro-step (no warmup; use it to reproduce reference curves); "
                        "minimind3: minimind-3's lr*(0.1+0.45*(1+cos(pi*(step+1)/total)))")
    g.add_argument("--warmup_iters", type=int, default=_default(OptimConfig, "warmup_iters"),
                   help="warmup updates of the cosine schedule (the reference ignores it)")
    g.add_argument("--max_steps", type=int, default=None,
                   help="stop after this many micro-steps in total; the LR schedule then spans "
                        "them instead of all epochs")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the random init and of the shuffling order (default 1337; "
                        "--recipe minimind3: 42, minimind-3's epoch e uses seed + e)")


def _add_rows_flags(g) -> None:
    """How DataConfig's rows are made and ordered."""
    g.add_argument("--no_shuffle", action="store_true",
                   help="file order every epoch, as the reference's DataLoader(shuffle=False)")
    g.add_argument("--pack", action="store_true",
                   help="pack several whole samples per row (attention and positions stay "
                        "within a sample) instead of one padded sample per row: pretrain "
                        "documents, or the conversations of sft/lora/distill/distill_reason, "
                        "each with its own loss mask (minimind-3: SFT only, packed by each "
                        "conversation's longest variant; not dpo/grpo/ppo). Fewer, fuller "
                        "batches: the same targets, but not the unpacked run's steps "
                        "(docs/training.md)")
    g.add_argument("--pack_window", type=int, default=_default(DataConfig, "pack_window"),
                   help="--pack: best fit (longest first, tightest row) over windows of this "
                        "many samples in file order, whole samples only; 0 = next fit in "
                        "file order (fewer full rows)")
    g.add_argument("--length_buckets", type=int, default=None,
                   help="drop each batch's padding exactly, with N shapes (one compiled "
                        "step each): its rows packed into batch_size*k/N rows "
                        "(--batch_packing, the default where it applies), or its trailing "
                        "columns cut to the smallest of N widths (max_seq_len/2**k rounded up "
                        "to 16, k < N) that holds its last supervised token: the same losses, "
                        "less work. Default 4; 0 = full rows. MoE models default to 0, since "
                        "their aux loss counts padding positions (N > 0 there changes the loss)")
    g.add_argument("--batch_packing", action=argparse.BooleanOptionalAction, default=None,
                   help="with length buckets, pack each batch's rows, whole, into fewer rows of "
                        "the same width (attention and positions stay within each row; the "
                        "row count one of N sizes, batch_size*k/N) instead of cutting its "
                        "width: the same rows, masks and loss normalisation, so the same "
                        "losses, with the padding of every row gone rather than the batch's "
                        "trailing columns. Default on for sft, lora, dpo, distill and "
                        "distill_reason in one process; --no-batch_packing cuts widths")
    prepare.add_cache_args(g)


def _add_run_flags(g, stage: Stage) -> None:
    """RunConfig's flags, with --fsdp."""
    g.add_argument("--log_interval", type=int, default=None,
                   help="log every N micro-batches of an epoch (metrics.jsonl, TensorBoard, "
                        "the reference-style line); default "
                        f"{stage.defaults_for('minimind3').get('log_interval', 100)}")
    g.add_argument("--save_interval", type=int, default=_default(RunConfig, "save_interval"),
                   help="checkpoint every N micro-steps (and at the end); the last 3 are kept")
    g.add_argument("--init_from", default=None,
                   help="start from these weights: one of our run/checkpoint folders or a "
                        "reference-keyed .pth, .safetensors or .npz state dict (params only, "
                        "fresh optimizer); `none`: a random init from --seed; default: "
                        + (f"OUT_DIR/{_by_arch(stage, '', stage.start_from)}_{{dim}}[_moe], "
                           "a run folder with a checkpoint or the reference's .pth"
                           if stage.start_from else "a random init from --seed"))
    start = g.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue this stage's run from its newest intact checkpoint: "
                            "same weights, optimizer state, data position, schedule and RNG")
    start.add_argument("--overwrite", action="store_true",
                       help="start this stage's run afresh even though its folder holds an "
                            "earlier run: deletes that run's checkpoints, metrics and "
                            "TensorBoard events (without it, such a start is refused)")
    g.add_argument("--max_consecutive_skips", type=int,
                   default=_default(RunConfig, "max_consecutive_skips"),
                   help="stop (with a checkpoint) after this many micro-steps in a row with a "
                        "non-finite loss, gradient or update; single ones are skipped and "
                        "counted")
    g.add_argument("--fsdp", action="store_true",
                   help="shard params and optimizer state over all devices (each holds about "
                        "1/N; params are gathered for each step) instead of replicating them: "
                        "for models whose training state does not fit on one device; same "
                        "results. Checkpoints load into either layout")


def register(subparsers) -> None:
    """One command per stage of the table."""
    for stage in STAGES.values():
        parser = subparsers.add_parser(
            stage.name, formatter_class=model_flags.HelpFormatter, help=stage.summary,
            description=stage.description + "\n\nPrints the parameter count and, every "
                        "--log_interval micro-batches, the reference script's console line; "
                        "writes config.json, metrics.jsonl, TensorBoard events and orbax "
                        "checkpoints into the run folder. Exact reference runs: --recipe "
                        "minimind2, or --arch minimind3 --recipe minimind3.")
        _add_train_args(parser, stage)
        if stage.add_flags is not None:
            stage.add_flags(parser)
        model_flags.add_model_args(parser, moe_value=True)
        if stage.validates:
            evaluate.add_eval_args(parser)
        else:
            parser.set_defaults(eval_data=None, eval_interval=None, eval_batches=None)
        distributed.add_distributed_args(parser)
        tracking.add_tracker_args(parser)
        compat_flags.add_reference_args(parser)
        parser.set_defaults(func=lambda args, stage=stage: run_stage(args, stage),
                            host_hugepages=True, compile_cache=True)
