"""Validation loss: the masked mean cross-entropy over every supervised token of a held-out set.

The figure is sum(token CE) / (number of supervised tokens) over the whole set (or its first
`--eval_batches` batches), so it depends neither on the batch size nor on the device count;
perplexity is its exp. One jit-compiled step per batch, over the training mesh, returns the
batch's CE sum and token count; the host adds them up in float64.

Used by `pretrain`/`sft --eval_data` (every `--eval_interval` micro-steps and at the end) and by
`minimind-jax eval --ckpt RUN|.pth --data_path X.jsonl --stage pretrain|sft`, whose rows follow
the model's sample rules (MiniMind2's, or minimind-3's for a minimind-3 model), as training's do.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import jax
import numpy as np

from minimind_jax.data.batches import Loader
from minimind_jax.data.rows import open_source
from minimind_jax.data.samples import SAMPLE_FORMATS
from minimind_jax.errors import UserError
from minimind_jax.model import flags as model_flags
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.generation import generation_of
from minimind_jax.train.recipes import recipe_named


@dataclasses.dataclass(frozen=True)
class EvalResult:
    loss: float  # masked mean CE over all supervised tokens evaluated
    tokens: int  # supervised tokens evaluated
    batches: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))  # exp overflows float64 past ~709

    def record(self) -> dict:
        """The fields of an eval record of metrics.jsonl."""
        return {"eval_loss": self.loss, "eval_ppl": self.perplexity,
                "eval_tokens": self.tokens, "eval_batches": self.batches}

    def line(self) -> str:
        return (f"eval_loss:{self.loss:.6f} ppl:{self.perplexity:.3f} over {self.tokens:,} "
                f"supervised tokens ({self.batches} batches)")


def make_eval_step(config: ModelConfig):
    """jit((params, batch) -> (CE sum, token count)); the batch split over the mesh's "data"
    axis, params in whatever layout they have (replicated or FSDP): XLA adds the reductions."""
    from minimind_jax.model.loss import masked_cross_entropy_sum
    from minimind_jax.model.transformer import MiniMind

    model = MiniMind(config)

    def step(params, batch):
        logits_BTV, _ = model.apply({"params": params}, batch["input_ids"],
                                    positions=batch.get("positions"),
                                    segment_ids=batch.get("segment_ids"))
        return masked_cross_entropy_sum(logits_BTV, batch["labels"], batch["loss_mask"])

    return jax.jit(step)


class Evaluator:
    """The held-out set's batches (file order, this process's share) and the eval step."""

    def __init__(self, source, config: ModelConfig, mesh, batch_size: int,
                 max_batches: int | None = None):
        if max_batches is not None and max_batches < 1:
            raise UserError(f"--eval_batches must be >= 1, got {max_batches}")
        self.loader = Loader(source, batch_size, shuffle=False, num_shards=jax.process_count(),
                             shard_index=jax.process_index(),
                             pad_to_multiple=jax.local_device_count())
        self.mesh = mesh
        self.max_batches = max_batches
        self.step = make_eval_step(config)

    def __call__(self, params) -> EvalResult:
        from minimind_jax.train.train_step import put_batch, to_host

        sums = []
        for index, batch in enumerate(self.loader.epoch(0)):
            if self.max_batches is not None and index >= self.max_batches:
                break
            sums.append(self.step(params, put_batch(batch, self.mesh)))
        totals = np.array([to_host(pair) for pair in sums], np.float64).reshape(-1, 2)
        total, count = totals.sum(axis=0)
        if count == 0:
            raise UserError("the evaluation data has no supervised tokens")
        return EvalResult(loss=float(total / count), tokens=int(count), batches=len(sums))


# ------------------------------------------------------------------------------------- CLI


def run_eval(args: argparse.Namespace) -> int:
    from minimind_jax.infer import generate
    from minimind_jax.infer.infer_config import LoadConfig
    from minimind_jax.train.stages import STAGES
    from minimind_jax.train.train_step import data_mesh, put_replicated

    load = LoadConfig.from_args(args)
    params, config = generate.load_model(load)
    tokenizer = generate.tokenizer_of(load)
    source = open_source(args.data_path, tokenizer, STAGES[args.stage].samples,
                         config.max_seq_len,
                         cache_dir=args.cache_dir, skip_bad_lines=args.skip_bad_lines,
                         rules=generation_of(config).name, sft_seed=args.seed,
                         sft_random=not args.no_sft_random)
    mesh = data_mesh()
    evaluator = Evaluator(source, config, mesh, args.batch_size, args.eval_batches)
    result = evaluator(put_replicated(params, mesh))
    print(f"{args.ckpt} on {args.data_path} ({args.stage}, max_seq_len {config.max_seq_len}): "
          + result.line())
    return 0


def register(subparsers) -> None:
    from minimind_jax.data import prepare
    from minimind_jax.infer import infer_config

    parser = subparsers.add_parser(
        "eval", formatter_class=model_flags.HelpFormatter,
        help="validation loss and perplexity of any weights on a JSONL file",
        description=__doc__)
    parser.add_argument("--ckpt", required=True,
                        help="one of our run or checkpoint folders, or a reference-keyed .pth, "
                             ".safetensors or .npz state dict")
    infer_config.add_lora_weight_arg(parser)
    parser.add_argument("--data_path", required=True, help="JSONL file in the --stage format")
    from minimind_jax.train.stages import STAGES

    lm_stages = [name for name, stage in STAGES.items() if stage.samples in SAMPLE_FORMATS]
    parser.add_argument("--stage", choices=lm_stages, required=True,
                        help="the rows that stage trains on: pretrain: {\"text\"} samples, "
                             "every token; the others: conversations, the assistant replies "
                             "only")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder; default: the one saved with the run")
    parser.add_argument("--batch_size", type=int, default=32, help="rows per eval step")
    parser.add_argument("--eval_batches", type=int, default=None,
                        help="only the first K batches (default: the whole file)")
    parser.add_argument("--seed", type=int, default=recipe_named("minimind3").seed,
                        help="minimind-3 SFT data: draw the variants (system prompt, stripped "
                             "think block) as epoch 0 of a run with this --seed does; a run's "
                             "own seed reproduces its validation loss (default %(default)s, "
                             "--recipe minimind3's)")
    parser.add_argument("--no_sft_random", action="store_true",
                        help="minimind-3 SFT data: no variants, each conversation as written")
    prepare.add_cache_args(parser)
    model_flags.add_model_args(parser)
    parser.set_defaults(func=run_eval, compile_cache=True)


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    """The training commands' validation flags."""
    g = parser.add_argument_group("validation")
    g.add_argument("--eval_data", default=None,
                   help="held-out JSONL in the --data_path format: its masked mean loss over "
                        "all supervised tokens and perplexity are logged (metrics.jsonl "
                        "`eval_loss`, TensorBoard, the tracker) every --eval_interval "
                        "micro-steps and at the end")
    g.add_argument("--eval_interval", type=int, default=None,
                   help="micro-steps between evaluations (default: --save_interval)")
    g.add_argument("--eval_batches", type=int, default=None,
                   help="evaluate the first K batches of --batch_size rows (default: all)")
