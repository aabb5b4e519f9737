"""`minimind-jax prepare`: tokenize a JSONL dataset into the token cache ahead of training."""

from __future__ import annotations

import argparse

from minimind_jax.data.rows import CachedSource, open_source
from minimind_jax.data.samples import SAMPLE_FORMATS
from minimind_jax.model import flags as model_flags
from minimind_jax.model.config import ARCHES


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare", formatter_class=model_flags.HelpFormatter,
        help="tokenize a JSONL dataset into the token cache (training does this on first use)",
        description="Stream a pretrain ({\"text\"}) or SFT ({\"conversations\"}) JSONL file "
                    "through batched tokenization into a memory-mapped token cache, keyed by "
                    "the data file, the tokenizer, the stage and max_seq_len. A second run (or "
                    "the training run) reuses it at once.")
    add_data_args(parser)
    parser.add_argument("--stage", choices=SAMPLE_FORMATS, required=True,
                        help="record format: pretrain ({\"text\"}) or sft ({\"conversations\"})")
    parser.add_argument("--max_seq_len", type=int, default=512,
                        help="training sequence length; samples are cached truncated to it")
    parser.add_argument("--arch", choices=ARCHES, default="minimind2",
                        help="whose sample rules: MiniMind2's or minimind-3's (its "
                             "PretrainDataset/SFTDataset; match the training run's --arch)")
    parser.add_argument("--pack", action="store_true",
                        help="also report the packed layout (pretrain or sft; minimind-3: sft "
                             "only; packing reuses the same cache)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild the cache even if a matching one exists")
    parser.set_defaults(func=run)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Data flags shared by `prepare` and the training commands."""
    g = parser.add_argument_group("data")
    g.add_argument("--data_path", required=True, help="JSONL dataset file")
    g.add_argument("--tokenizer", required=True,
                   help="tokenizer folder (tokenizer.json [+ tokenizer_config.json]) or a "
                        "sentencepiece .model / folder holding one")
    add_cache_args(g)


def add_cache_args(group) -> None:
    """Token-cache flags shared by `prepare` and the training commands."""
    group.add_argument("--cache_dir", default=None,
                       help="token cache folder; unset: .minimind_cache/ next to the data file")
    group.add_argument("--skip_bad_lines", action="store_true",
                       help="skip (and count) malformed lines instead of stopping at the first")


def run(args: argparse.Namespace) -> int:
    source = open_source(args.data_path, args.tokenizer, args.stage, args.max_seq_len,
                         pack=args.pack, cache_dir=args.cache_dir,
                         skip_bad_lines=args.skip_bad_lines, force=args.force, log=print,
                         rules=args.arch)
    # With --pack `source` is the packed layout; the one-sample-per-row figures come first.
    unpacked = CachedSource(source.cache, args.max_seq_len) if args.pack else source
    meta = source.cache.meta
    print(f"cache: {source.cache.path}")
    print(f"{len(unpacked):,} samples, {meta['num_tokens']:,} tokens, "
          f"{meta['num_truncated']:,} truncated to {args.max_seq_len}, "
          f"{meta['skipped_lines']:,} bad lines skipped")
    print(f"padding fraction at max_seq_len {args.max_seq_len}: "
          f"{unpacked.padding_fraction:.4f} ({len(unpacked):,} rows)")
    if args.pack:
        print(f"packed: padding fraction {source.padding_fraction:.4f} ({len(source):,} rows)")
    return 0
