"""The one CLI parser builder: `minimind-jax <command> ...` (and `python train.py <command>`).

Each command lives in its own module, which exposes `register(subparsers)`; that function adds
its sub-parser and sets `func(args) -> int | None` as the default, and `host_hugepages=True` if
the command trains (see host_memory.py). Modules are imported when the parser is built; heavy or
optional imports (torch, matplotlib) stay inside the commands.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from minimind_jax import host_memory, xla_flags
from minimind_jax.config import PRESETS, ModelConfig
from minimind_jax.errors import UserError, error_line_and_code

# command module (in minimind_jax/) -> the commands it registers, in `--help` order.
COMMAND_MODULES = (
    "train",  # pretrain, sft
    "prepare",  # prepare
    "tokenizer_cli",  # tokenizer
    "convert",  # convert
    "generate",  # generate, chat
    "compare",  # compare
    "demo",  # demo
    "bench",  # bench
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the description's line breaks."""


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Model-shape flags shared by every command that builds a model (reference names)."""
    g = parser.add_argument_group("model")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="start from a named preset; explicit flags below override it")
    g.add_argument("--dim", type=int, default=None, help="model width (default 512)")
    g.add_argument("--n_layers", type=int, default=None, help="transformer blocks (default 8)")
    g.add_argument("--n_heads", type=int, default=None, help="attention heads (default 8)")
    g.add_argument("--n_kv_heads", type=int, default=None,
                   help="key/value heads for grouped-query attention (default 2)")
    g.add_argument("--vocab_size", type=int, default=None,
                   help="vocabulary size (default: the tokenizer's, else 6400)")
    g.add_argument("--max_seq_len", type=int, default=None,
                   help="training sequence length in tokens (default 512)")
    g.add_argument("--use_moe", action="store_true", default=None,
                   help="mixture-of-experts feed-forward (4 routed experts, top-2, 1 shared)")
    g.add_argument("--moe_impl", choices=("auto", "ragged", "blocked", "dense"), default=None,
                   help="MoE kernel: auto = ragged_dot grouped GEMM on GPU/TPU, blocked scan on "
                        "CPU; dense = every expert on every token (for checks)")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="compute dtype; auto = bfloat16 on GPU/TPU, float32 on CPU "
                        "(master weights, logits and softmax stay float32)")
    g.add_argument("--attention_impl", choices=("auto", "xla", "cudnn", "chunked"),
                   default="auto",
                   help="attention kernel: auto = chunked causal blocks on CPU, cuDNN on GPU "
                        "(bf16, even lengths, no packing), else XLA's dot_product_attention")
    g.add_argument("--remat", action="store_true", help="rematerialise each block in backward")
    g.add_argument("--scan_layers", action="store_true",
                   help="compile one layer body and scan it (faster compiles for deep models)")


def resolve_dtype(name: str) -> str:
    """`auto` -> bfloat16 on accelerators, float32 on CPU."""
    if name != "auto":
        return name
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def model_config_from_args(args: argparse.Namespace, base: ModelConfig | None = None,
                           **overrides) -> ModelConfig:
    """Build a ModelConfig: `base` (or the preset, or the defaults), then explicit flags."""
    config = base or (PRESETS[args.preset] if getattr(args, "preset", None) else ModelConfig())
    changes = {}
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len",
                  "use_moe", "moe_impl"):
        value = getattr(args, field, None)
        if value is not None:
            changes[field] = value
    if getattr(args, "dtype", None):
        changes["dtype"] = resolve_dtype(args.dtype)
    if getattr(args, "attention_impl", None):
        changes["attention_impl"] = args.attention_impl
    if getattr(args, "remat", False):
        changes["remat"] = True
    if getattr(args, "scan_layers", False):
        changes["scan_layers"] = True
    changes.update(overrides)
    try:
        return config.replace(**changes)
    except ValueError as err:  # ModelConfig's own checks, worded with the flags' names
        raise UserError(str(err).replace("invalid ModelConfig", "invalid model flags")
                        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minimind-jax",
        description="Train MiniMind2 language models with JAX: tokenizer -> prepare -> "
                    "pretrain -> sft -> generate/chat, plus weight conversion, loss-curve "
                    "comparison with the PyTorch reference, and benchmarks.",
        formatter_class=HelpFormatter,
        epilog="environment:\n"
               f"  {host_memory.ENV_SWITCH + '=0':27s}  training commands do not re-execute "
               f"themselves with {host_memory.TUNABLE}\n"
               f"  {'':27s}  (huge pages for XLA:CPU's per-step buffers)\n"
               f"  {xla_flags.ENV_SWITCH + '=0':27s}  no XLA:CPU flag defaults "
               "(minimind_jax/xla_flags.py)",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"minimind_jax.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None and getattr(args, "host_hugepages", False):
        host_memory.reexec_with_hugepages()  # a real process entry only, not in-process calls
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the one place that turns errors into `error: ...` lines
        reported = error_line_and_code(err)
        if reported is None:
            raise  # a bug: keep the traceback
        message, code = reported
        print(f"error: {message}", file=sys.stderr)
        return code
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
