"""`pretrain` and `sft` commands: the reference's training scripts, data-parallel and resumable.

A run writes `{out_dir}/{pretrain|full_sft}_{dim}{_moe}/`: `config.json` (the model),
`train_args.json` (the flags), `metrics.jsonl` (one record per logged micro-step), `tb/`
(TensorBoard), `tokenizer/` (a copy, so generation finds it) and `checkpoints/<step>/` (orbax).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import sys
import time

import jax

from minimind_jax import checkpoint, distributed, host_memory, optim, prepare
from minimind_jax.config import ModelConfig
from minimind_jax.errors import UserError
from minimind_jax.packing import DEFAULT_WINDOW as DEFAULT_PACK_WINDOW

REFERENCE_TOKENIZER_DIR = "model/minimind_tokenizer"  # where the reference keeps its tokenizer
SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim",
                "use_moe", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
                "scan_layers")


@dataclasses.dataclass(frozen=True)
class Stage:
    """Per-stage defaults (SPEC "Training recipe")."""

    command: str  # CLI command
    data_stage: str  # sample format for the loader
    run_prefix: str  # run folder is {out_dir}/{run_prefix}_{tag}
    learning_rate: float
    accumulation_steps: int
    data_path: str


STAGES = {
    "pretrain": Stage("pretrain", "pretrain", "pretrain", 5e-4, 8, "./dataset/pretrain_hq.jsonl"),
    "sft": Stage("sft", "sft", "full_sft", 5e-5, 1, "./dataset/sft_mini_512.jsonl"),
}


# ------------------------------------------------------------------------------------- setup


def run_dir_for(out_dir: str, stage: Stage, config: ModelConfig) -> pathlib.Path:
    return pathlib.Path(out_dir) / f"{stage.run_prefix}_{config.tag}"


def resolve_tokenizer(args: argparse.Namespace, stage: Stage) -> pathlib.Path:
    """--tokenizer; else the run's own copy (--resume) or, for sft, the pretrain run's copy;
    else the reference's ./model/minimind_tokenizer."""
    if args.tokenizer:
        return pathlib.Path(args.tokenizer)
    tag = _tag_from_args(args)
    candidates = []
    if args.resume:
        candidates.append(pathlib.Path(args.out_dir) / f"{stage.run_prefix}_{tag}" / "tokenizer")
    if stage.command == "sft" and not args.init_from:
        candidates.append(pathlib.Path(args.out_dir) / f"pretrain_{tag}" / "tokenizer")
    candidates.append(pathlib.Path(REFERENCE_TOKENIZER_DIR))
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise UserError("no tokenizer: pass --tokenizer DIR (a folder with tokenizer.json, e.g. the "
                    "reference's model/minimind_tokenizer); looked in "
                    + ", ".join(str(c) for c in candidates))


def _tag_from_args(args: argparse.Namespace) -> str:
    from minimind_jax import cli

    return cli.model_config_from_args(args).tag


def check_same_shape(saved: ModelConfig, config: ModelConfig, where: str) -> None:
    diffs = [f"{f}: checkpoint {getattr(saved, f)!r}, flags {getattr(config, f)!r}"
             for f in SHAPE_FIELDS if getattr(saved, f) != getattr(config, f)]
    if diffs:
        raise UserError(f"{where} was trained with another model shape; pass matching flags:\n  "
                        + "\n  ".join(diffs))


def initial_params(args: argparse.Namespace, stage: Stage, config: ModelConfig):
    """--init_from; else sft: the latest pretrain checkpoint; else a seeded random init."""
    from minimind_jax.model import init_params

    if args.init_from:
        source = pathlib.Path(args.init_from)
    elif stage.command == "sft":
        pretrain_dir = run_dir_for(args.out_dir, STAGES["pretrain"], config)
        source = checkpoint.latest_checkpoint(pretrain_dir)
        if source is None:
            raise UserError(f"sft starts from the pretrain weights, but there is no checkpoint "
                            f"in {pretrain_dir}: run `pretrain` first with the same --out_dir "
                            "and model flags, or pass --init_from (checkpoint folder, .pth, "
                            ".safetensors or .npz)")
    else:
        return init_params(config, jax.random.PRNGKey(args.seed)), "random init"
    return checkpoint.load_init_params(source, config), str(source)


def _is_main_process() -> bool:
    return distributed.is_main_process()


def _say(message: str) -> None:
    if _is_main_process():
        from tqdm import tqdm

        tqdm.write(message, file=sys.stdout)


# ------------------------------------------------------------------------------------- logging


class RunLog:
    """metrics.jsonl + TensorBoard + the reference-style line + the tqdm bar (main process)."""

    def __init__(self, run_dir: pathlib.Path, start_step: int, total_steps: int,
                 enabled: bool):
        self.enabled = enabled
        self.metrics_path = run_dir / "metrics.jsonl"
        self.file = self.writer = self.bar = None
        if not enabled:
            return
        from tensorboardX import SummaryWriter
        from tqdm import tqdm

        self._keep_records_before(start_step)
        if start_step == 0:  # a fresh run: no curves of an earlier run under the same name
            shutil.rmtree(run_dir / "tb", ignore_errors=True)
        self.file = self.metrics_path.open("a", encoding="utf-8")
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step or None)
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not sys.stderr.isatty(), file=sys.stderr)

    def _keep_records_before(self, step: int) -> None:
        """Drop records from a previous attempt at steps >= `step` (a resumed run redoes them)."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] < step:
                    kept.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # e.g. a half-written last line of a killed run
        self.metrics_path.write_text("".join(kept), encoding="utf-8")

    def record(self, record: dict, line: str | None) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key in ("loss", "aux", "lr", "grad_norm", "tokens_per_sec"):
            if key in record:
                self.writer.add_scalar(f"train/{key}", record[key], record["step"])
        if line:
            self.bar.write(line, file=sys.stdout)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                             tok_s=f"{record['tokens_per_sec']:.0f}", refresh=False)

    def advance(self) -> None:
        if self.enabled:
            self.bar.update(1)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.file.close()


def reference_line(epoch: int, epochs: int, batch: int, batches: int, loss: float, lr: float,
                   epoch_seconds: float, batches_done: int) -> str:
    """`Epoch:[e/E](step/iters) loss:.. lr:.. epoch_Time:..min:` as the reference prints it."""
    minutes_left = epoch_seconds / batches_done * batches // 60 - epoch_seconds // 60
    return (f"Epoch:[{epoch + 1}/{epochs}]({batch}/{batches}) loss:{loss:.3f} lr:{lr:.12f} "
            f"epoch_Time:{minutes_left}min:")


# ------------------------------------------------------------------------------------- the run


def _write_run_files(run_dir: pathlib.Path, config: ModelConfig, args: argparse.Namespace,
                     tokenizer_dir: pathlib.Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / checkpoint.CONFIG_FILE).write_text(config.to_json() + "\n")
    flags = {k: v for k, v in vars(args).items() if k != "func"}
    (run_dir / "train_args.json").write_text(json.dumps(flags, indent=2, default=str) + "\n")
    target = run_dir / "tokenizer"
    if tokenizer_dir.resolve() != target.resolve():
        if tokenizer_dir.is_dir():
            shutil.copytree(tokenizer_dir, target, dirs_exist_ok=True)
        else:
            target.mkdir(exist_ok=True)
            shutil.copy2(tokenizer_dir, target / tokenizer_dir.name)


def run_stage(args: argparse.Namespace, stage: Stage) -> int:
    from minimind_jax import cli
    from minimind_jax import step as train_step
    from minimind_jax.loader import Loader
    from minimind_jax.model import count_params
    from minimind_jax.tokenizer import load_tokenizer

    distributed.initialize(args)  # before any other JAX call
    for flag in ("batch_size", "epochs", "accumulation_steps", "log_interval", "save_interval"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    tokenizer_dir = resolve_tokenizer(args, stage)
    tokenizer = load_tokenizer(tokenizer_dir)
    vocab = {} if args.vocab_size is not None else {"vocab_size": tokenizer.vocab_size}
    config = cli.model_config_from_args(args, **vocab)
    if config.vocab_size < tokenizer.vocab_size:
        raise UserError(f"--vocab_size {config.vocab_size} is smaller than the tokenizer's "
                        f"vocabulary ({tokenizer.vocab_size}, {tokenizer_dir})")
    run_dir = run_dir_for(args.out_dir, stage, config)

    mesh = train_step.data_mesh()
    source = _open_source_once(args, stage, tokenizer, config)
    loader = Loader(source, args.batch_size, shuffle=not args.no_shuffle, seed=args.seed,
                    num_shards=jax.process_count(), shard_index=jax.process_index(),
                    pad_to_multiple=_rows_multiple(config, args.batch_size))
    batches = loader.batches_per_epoch
    total_steps = args.epochs * batches
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    if total_steps < 1:
        raise UserError(f"nothing to train: {args.data_path} gives {batches} batches per epoch")

    learning_rate = args.learning_rate
    accumulation = args.accumulation_steps
    schedule = optim.Schedule(args.lr_schedule, learning_rate, total_steps, accumulation,
                              args.warmup_iters)
    optimizer = optim.make_optimizer(accumulation_steps=accumulation, grad_clip=args.grad_clip,
                                     weight_decay=args.weight_decay)

    abstract = train_step.abstract_train_state(config, optimizer, mesh, fsdp=args.fsdp)
    shardings = train_step.shardings_of(abstract)
    manager = checkpoint.open_manager(run_dir)
    elapsed_before = 0.0
    if args.resume:
        if manager.latest_step() is None:
            raise UserError(f"--resume: no checkpoint in {run_dir / checkpoint.CHECKPOINT_DIR}")
        saved = checkpoint.restore_meta(manager)
        check_same_shape(ModelConfig.from_dict(saved["model_config"]), config,
                         f"{run_dir} (step {saved['step']})")
        state, meta = checkpoint.restore_train_state(manager, abstract)
        epoch, batch = meta["epoch"], meta["batch"]
        elapsed_before = float(meta.get("elapsed_s", 0.0))
        _say(f"resuming {run_dir} at step {meta['step']} (epoch {epoch + 1}, batch {batch})")
    else:
        params, origin = initial_params(args, stage, config)
        if manager.latest_step() is not None:
            _say(f"starting over: removing the previous checkpoints of {run_dir}")
            manager.close()
            distributed.barrier("train:checkpoints_seen")  # all decided before one deletes
            if _is_main_process():
                shutil.rmtree(run_dir / checkpoint.CHECKPOINT_DIR)
            distributed.barrier("train:checkpoints_removed")
            manager = checkpoint.open_manager(run_dir)
        state = train_step.init_train_state(params, optimizer, args.seed, shardings)
        del params
        epoch, batch = 0, 0
        _say(f"initial weights: {origin}")
    start_step = int(train_step.to_host(state.step))
    if _is_main_process():
        _write_run_files(run_dir, config, args, tokenizer_dir)
    n_params = count_params(state.params)
    _say(f"model parameters: {n_params / 1e6:.3f} M ({n_params:,}); {mesh.devices.size} "
         f"device(s) {jax.devices()[0].platform} in {jax.process_count()} process(es); "
         f"dtype {config.dtype}; run folder {run_dir}")
    _say(_layout_line(state, args.fsdp, mesh.devices.size))
    _say(host_memory.describe())
    _say(f"{stage.command}: {args.epochs} epoch(s) x {batches} batches of {args.batch_size}, "
         f"accumulation {accumulation}, {total_steps} micro-steps, lr {learning_rate} "
         f"({args.lr_schedule})")
    _say(_rows_line(source, args))

    log = RunLog(run_dir, start_step, total_steps, _is_main_process())
    step_fn = train_step.make_train_step(config, optimizer, schedule, mesh,
                                         shardings=shardings if args.fsdp else None)
    try:
        state = _train_loop(args, stage, config, state, step_fn, loader, mesh, manager, log,
                            schedule, start=(start_step, epoch, batch), total_steps=total_steps,
                            elapsed_before=elapsed_before)
    finally:
        log.close()
        manager.wait_until_finished()
        manager.close()
    _say(f"done: {int(train_step.to_host(state.step))} micro-steps, "
         f"{int(train_step.to_host(state.skipped))} skipped; checkpoints in "
         f"{run_dir / checkpoint.CHECKPOINT_DIR}")
    return 0


def _open_source_once(args, stage: Stage, tokenizer, config: ModelConfig):
    """The training rows; with several processes, process 0 builds a missing token cache
    first, so the others find it (shared storage) instead of racing on it."""
    from minimind_jax.loader import open_source

    def open_it(quiet: bool):
        return open_source(args.data_path, tokenizer, stage.data_stage, config.max_seq_len,
                           pack=args.pack, pack_window=args.pack_window,
                           cache_dir=args.cache_dir,
                           skip_bad_lines=args.skip_bad_lines,
                           progress=False if quiet else None,
                           log=(lambda message: None) if quiet else None)

    if not _is_main_process():
        distributed.barrier("train:token_cache")
        return open_it(quiet=True)  # bad data fails here too, with the same UserError
    try:
        return open_it(quiet=False)
    finally:
        distributed.barrier("train:token_cache")  # reached on failure too: nobody hangs


def _rows_multiple(config: ModelConfig, batch_size: int) -> int:
    """What this process's rows of a batch are padded to a multiple of (zero-mask rows).

    Dense models: the whole per-process batch, so the last partial batch of an epoch keeps the
    compiled shape instead of compiling the step a second time (seconds on CPU; the masked
    mean loss ignores the empty rows exactly). MoE models: only the local device count, since
    the reference's per-sequence aux loss is a mean over the batch's rows."""
    per_process, devices = batch_size // jax.process_count(), jax.local_device_count()
    if not config.use_moe and per_process % devices == 0:
        return per_process
    return devices


def _rows_line(source, args) -> str:
    """How full the rows are: packing's fill fraction, or the padding of one sample per row."""
    fill = 1.0 - source.padding_fraction
    if args.pack:
        how = ("next fit in file order" if args.pack_window == 0
               else f"best fit over windows of {args.pack_window:,} documents")
        return f"rows: {len(source):,} packed ({how}), filled {fill:.1%}"
    return f"rows: {len(source):,}, one sample each, filled {fill:.1%}"


def _layout_line(state, fsdp: bool, n_devices: int) -> str:
    """Where params and optimizer state live, with this device's share of the params."""
    from minimind_jax import step as train_step

    total = sum(leaf.nbytes for leaf in jax.tree.leaves(state.params))
    local = train_step.local_bytes(state.params)
    layout = (f"fsdp: params and optimizer state sharded over {n_devices} device(s)" if fsdp
              else "params and optimizer state replicated on every device")
    return (f"{layout}; params per device {local / 2**20:.3f} MiB of {total / 2**20:.3f} MiB "
            f"({100 * local / total:.1f}%)")


class TooManySkips(Exception):
    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


def _train_loop(args, stage, config, state, step_fn, loader, mesh, manager, log, schedule, *,
                start, total_steps, elapsed_before):
    """Consume batches from `start` = (global step, epoch, batch) until `total_steps`.

    Metrics of step s are fetched after step s+1 is dispatched, so the host never stalls the
    device; they are all written before any checkpoint, so a checkpoint never precedes its log.
    """
    from minimind_jax import step as train_step

    step, epoch, batch = start
    batches = loader.batches_per_epoch
    run_start = time.time()
    pending = []  # (device metrics, host info) of the dispatched step not logged yet
    window = {"tokens": 0, "since": run_start}
    epoch_clock = {"epoch": None, "start": run_start, "first": batch}

    def drain():
        """Log the dispatched steps; raise once too many in a row were non-finite."""
        while pending:
            metrics, info = pending.pop(0)
            metrics = train_step.to_host(metrics)
            _log_step(args, log, schedule, metrics, info, window, epoch_clock, batches,
                      run_start, elapsed_before)
            if int(metrics["consecutive_skips"]) >= args.max_consecutive_skips:
                raise TooManySkips(info["step"])

    def save(position):
        drain()
        checkpoint.save(manager, state, epoch=position[0], batch=position[1], config=config,
                        stage=stage.command, elapsed_s=elapsed_before + time.time() - run_start)

    position = (epoch, batch)  # of the next batch to consume
    try:
        while step < total_steps and position[0] < args.epochs:
            epoch, batch = position
            epoch_clock.update(epoch=epoch, start=time.time(), first=batch)
            for b, host_batch in enumerate(loader.epoch(epoch, start_batch=batch), start=batch):
                state, metrics = step_fn(state, train_step.put_batch(host_batch, mesh))
                info = {"step": step, "epoch": epoch, "batch": b,
                        "seq_len": host_batch["input_ids"].shape[1]}
                step += 1
                position = (epoch + 1, 0) if b + 1 >= batches else (epoch, b + 1)
                log.advance()
                drain()  # the previous step's metrics (this step runs meanwhile)
                pending.append((metrics, info))
                if step % args.save_interval == 0:
                    save(position)
                if step >= total_steps:
                    break
            else:
                position = (epoch + 1, 0)  # in case an epoch had fewer batches than announced
        save(position)
    except TooManySkips as err:
        pending.clear()
        checkpoint.save(manager, state, epoch=position[0], batch=position[1], config=config,
                        stage=stage.command)
        raise UserError(f"{args.max_consecutive_skips} micro-steps in a row had a non-finite "
                        f"loss or gradient (last: step {err.step}); stopped. Lower "
                        "--learning_rate or use --dtype float32; the state without them is "
                        f"saved in {manager.directory}") from None
    return state


def _log_step(args, log, schedule, metrics, info, window, epoch_clock, batches, run_start,
              elapsed_before):
    """Turn one step's fetched metrics into a record (and a line) if it is a logged step."""
    # Rows of the global batch (other processes load the other rows).
    window["tokens"] += int(metrics["n_rows"]) * info["seq_len"]
    if info["batch"] % args.log_interval:
        return
    now = time.time()
    record = {"step": info["step"], "epoch": info["epoch"], "batch": info["batch"],
              "update": int(metrics["update"]), "loss": float(metrics["loss"]),
              "aux": float(metrics["aux"]), "lr": schedule.host(info["step"])}
    if bool(metrics["updated"]):
        record["grad_norm"] = float(metrics["grad_norm"])
    if int(metrics["skipped"]):
        record["skipped"] = int(metrics["skipped"])
    record["tokens_per_sec"] = window["tokens"] / max(now - window["since"], 1e-9)
    record["elapsed_s"] = elapsed_before + now - run_start
    window.update(tokens=0, since=now)
    epoch_seconds = now - epoch_clock["start"]
    line = reference_line(info["epoch"], args.epochs, info["batch"], batches, record["loss"],
                          record["lr"], epoch_seconds,
                          max(info["batch"] - epoch_clock["first"] + 1, 1))
    if int(metrics["consecutive_skips"]):
        line += (f" (non-finite loss or gradient: skipped, {record['skipped']} so far, "
                 f"{int(metrics['consecutive_skips'])} in a row)")
    log.record(record, line)


# ------------------------------------------------------------------------------------- CLI


def _add_train_args(parser: argparse.ArgumentParser, stage: Stage) -> None:
    g = parser.add_argument_group("training (reference flag names)")
    g.add_argument("--out_dir", default="out",
                   help=f"runs go to OUT_DIR/{stage.run_prefix}_{{dim}}[_moe]/")
    g.add_argument("--data_path", default=stage.data_path, help="training JSONL file")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (tokenizer.json) or sentencepiece .model; default: "
                        "the run's own copy with --resume, "
                        + ("else the pretrain run's copy, " if stage.command == "sft" else "")
                        + f"else ./{REFERENCE_TOKENIZER_DIR} (where the reference keeps it)")
    g.add_argument("--epochs", type=int, default=1, help="passes over the data")
    g.add_argument("--batch_size", type=int, default=32,
                   help="sequences per micro-batch, over all devices")
    g.add_argument("--learning_rate", type=float, default=stage.learning_rate, help="peak LR")
    g.add_argument("--accumulation_steps", type=int, default=stage.accumulation_steps,
                   help="micro-batches whose mean gradient makes one optimizer update")
    g.add_argument("--grad_clip", type=float, default=1.0,
                   help="clip the global gradient norm to this (<= 0: no clipping)")
    g.add_argument("--weight_decay", type=float, default=0.01,
                   help="AdamW decoupled weight decay, on every parameter (torch default)")
    g.add_argument("--lr_schedule", choices=optim.SCHEDULES, default="cosine",
                   help="cosine: linear warmup over --warmup_iters updates, then cosine to lr/10; "
                        "minimind2: the reference's lr/10 + lr/2*(1+cos(pi*step/total)) per "
                        "micro-step (no warmup; use it to reproduce reference curves)")
    g.add_argument("--warmup_iters", type=int, default=0,
                   help="warmup updates of the cosine schedule (the reference ignores it)")
    g.add_argument("--max_steps", type=int, default=None,
                   help="stop after this many micro-steps in total; the LR schedule then spans "
                        "them instead of all epochs")
    g.add_argument("--seed", type=int, default=1337,
                   help="seed of the random init and of the shuffling order")
    g.add_argument("--no_shuffle", action="store_true",
                   help="file order every epoch, as the reference's DataLoader(shuffle=False)")
    g.add_argument("--pack", action="store_true",
                   help="pack several documents per row (attention stays within a document) "
                        "instead of one padded document per row")
    g.add_argument("--pack_window", type=int, default=DEFAULT_PACK_WINDOW,
                   help="--pack: best fit (longest first, tightest row) over windows of this "
                        "many documents in file order, whole documents only; 0 = next fit in "
                        "file order (fewer full rows)")
    prepare.add_cache_args(g)
    g.add_argument("--log_interval", type=int, default=100,
                   help="log every N micro-batches of an epoch (metrics.jsonl, TensorBoard, "
                        "the reference-style line)")
    g.add_argument("--save_interval", type=int, default=100,
                   help="checkpoint every N micro-steps (and at the end); the last 3 are kept")
    g.add_argument("--init_from", default=None,
                   help="start from these weights: one of our run/checkpoint folders or a "
                        "reference-keyed .pth, .safetensors or .npz state dict (params only, "
                        "fresh optimizer)" + ("; default: the latest checkpoint of "
                                              "OUT_DIR/pretrain_{dim}[_moe]"
                                              if stage.command == "sft" else
                                              "; default: random init from --seed"))
    g.add_argument("--resume", action="store_true",
                   help="continue this stage's run from its latest checkpoint: same weights, "
                        "optimizer state, data position, schedule and RNG")
    g.add_argument("--max_consecutive_skips", type=int, default=20,
                   help="stop (with a checkpoint) after this many micro-steps in a row with a "
                        "non-finite loss or gradient; single ones are skipped and counted")
    g.add_argument("--fsdp", action="store_true",
                   help="shard params and optimizer state over all devices (each holds about "
                        "1/N; params are gathered for each step) instead of replicating them: "
                        "for models whose training state does not fit on one device; same "
                        "results. Checkpoints load into either layout")


def register(subparsers) -> None:
    from minimind_jax import cli

    descriptions = {
        "pretrain": "Pretrain a MiniMind2 model on {\"text\": ...} JSONL (the reference's "
                    "train_pretrain.py): next-token loss on every real token.",
        "sft": "Full supervised fine-tuning on {\"conversations\": [...]} JSONL (the "
               "reference's train_full_sft.py), starting from the pretrain weights; the loss "
               "covers the assistant replies only.",
    }
    for name, stage in STAGES.items():
        parser = subparsers.add_parser(
            name, formatter_class=cli.HelpFormatter,
            help=descriptions[name].split(" (")[0],
            description=descriptions[name] + "\n\nPrints the parameter count and, every "
                        "--log_interval micro-batches, `Epoch:[e/E](step/iters) loss:.. lr:.. "
                        "epoch_Time:..min:`; writes config.json, metrics.jsonl, TensorBoard "
                        "events and orbax checkpoints into the run folder.")
        _add_train_args(parser, stage)
        cli.add_model_args(parser)
        distributed.add_distributed_args(parser)
        parser.set_defaults(func=lambda args, stage=stage: run_stage(args, stage),
                            host_hugepages=True)
