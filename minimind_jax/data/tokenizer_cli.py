"""`minimind-jax tokenizer`: train a sentencepiece BPE tokenizer on pretrain JSONL.

The result is a folder (`tokenizer.model` + `tokenizer_config.json` with the MiniMind chat
template) that `--tokenizer` and `load_tokenizer` accept. Ids 0/1/2 are `<unk>`/`<s>`/`</s>`,
unseen characters fall back to bytes, and there is no normalisation, so decode(encode(s)) == s.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from minimind_jax.data.tokenizer import SENTENCEPIECE_MODEL, TOKENIZER_CONFIG, default_chat_template
from minimind_jax.errors import UserError
from minimind_jax.model import flags as model_flags


def sentencepiece_options(vocab_size: int, *, character_coverage: float = 0.9995,
                          max_sentences: int = 0) -> dict:
    """Trainer options for a lossless byte-fallback BPE with MiniMind's special ids."""
    return dict(
        model_type="bpe", vocab_size=vocab_size,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # pad is <unk>, as in the reference
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        byte_fallback=True,  # any character outside the vocabulary round-trips as UTF-8 bytes
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
        # A newline is always a piece of its own (as the reference's byte-level pre-tokenizer
        # keeps it apart): otherwise "\n「" in SFT data merges, and a chat prompt ending in
        # "<s>assistant\n" tokenizes differently at generation time than in training.
        user_defined_symbols=["\n"],
        character_coverage=character_coverage,
        input_sentence_size=max_sentences, shuffle_input_sentence=True,
        max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1, minloglevel=1,
    )


def train_sentencepiece(texts: Iterable[str], out_dir, vocab_size: int = 6400, *,
                        character_coverage: float = 0.9995, max_sentences: int = 0) -> Path:
    """Train on `texts` and write `out_dir`/tokenizer.model + tokenizer_config.json."""
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model,
            **sentencepiece_options(vocab_size, character_coverage=character_coverage,
                                    max_sentences=max_sentences))
    except RuntimeError as err:
        raise UserError(f"sentencepiece training failed: {err}".strip()) from err
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SENTENCEPIECE_MODEL).write_bytes(model.getvalue())
    config = {"tokenizer_class": "SentencePiece", "unk_token": "<unk>", "bos_token": "<s>",
              "eos_token": "</s>", "pad_token": "<unk>", "add_bos_token": False,
              "add_eos_token": False, "chat_template": default_chat_template()}
    (out / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return out


def _texts_with_progress(data_path, skip_bad_lines: bool, bar) -> Iterator[str]:
    from minimind_jax.data.samples import SkipReport, iter_jsonl_chunks

    skips = SkipReport(str(data_path))
    for texts, n_bytes in iter_jsonl_chunks(data_path, "pretrain", skip_bad_lines=skip_bad_lines,
                                            skips=skips):
        yield from texts
        bar.update(n_bytes)
    if skips.count:
        bar.write(skips.summary())


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tokenizer", formatter_class=model_flags.HelpFormatter,
        help="train a sentencepiece BPE tokenizer on pretrain JSONL",
        description=__doc__)
    parser.add_argument("--data_path", required=True, help="pretrain JSONL ({\"text\": ...})")
    parser.add_argument("--vocab_size", type=int, default=6400, help="vocabulary size")
    parser.add_argument("--out", required=True, help="output folder for the tokenizer")
    parser.add_argument("--character_coverage", type=float, default=0.9995,
                        help="share of characters given their own piece (0.98..1); the rest "
                             "fall back to bytes")
    parser.add_argument("--max_sentences", type=int, default=2_000_000,
                        help="train on a random sample of at most this many texts (0 = all)")
    parser.add_argument("--skip_bad_lines", action="store_true",
                        help="skip (and count) malformed lines instead of stopping")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    train_tokenizer(args.data_path, args.out, args.vocab_size,
                    character_coverage=args.character_coverage,
                    max_sentences=args.max_sentences, skip_bad_lines=args.skip_bad_lines)
    return 0


def train_tokenizer(data_path, out_dir, vocab_size: int = 6400, *,
                    character_coverage: float = 0.9995, max_sentences: int = 2_000_000,
                    skip_bad_lines: bool = False) -> Path:
    """The `tokenizer` command from Python: train on pretrain JSONL with a progress bar, print
    the vocabulary size and a round-trip probe; returns the tokenizer folder."""
    from tqdm import tqdm

    from minimind_jax.data.tokenizer import load_tokenizer

    size = Path(data_path).stat().st_size if Path(data_path).is_file() else 0
    started = time.perf_counter()
    with tqdm(total=size, unit="B", unit_scale=True, desc="read + count",
              disable=not sys.stderr.isatty()) as bar:
        out = train_sentencepiece(_texts_with_progress(data_path, skip_bad_lines, bar),
                                  out_dir, vocab_size, character_coverage=character_coverage,
                                  max_sentences=max_sentences)
    seconds = time.perf_counter() - started
    tokenizer = load_tokenizer(out)
    probe = "<s>MiniMind 你好！\n\tTabs,   spaces & emoji 🙂</s>"
    ids = tokenizer.encode(probe)
    print(f"trained sentencepiece BPE, vocab {tokenizer.vocab_size}, on {size / 2**20:.2f} MiB "
          f"in {seconds:.1f} s -> {out}")
    print(f"probe: {len(ids)} tokens, round trip "
          f"{'ok' if tokenizer.decode(ids) == probe else 'FAILED'}")
    return out
