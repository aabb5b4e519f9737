"""The one CLI parser builder: `minimind-jax <command> ...` (and `python train.py <command>`).

Each command lives in its own module, which exposes `register(subparsers)`; that function adds
its sub-parser and sets `func(args) -> int | None` as the default, `host_hugepages=True` if
the command trains (see runtime/host_memory.py) and `compile_cache=True` if it compiles
models (runtime/compile_cache.py). Modules are imported when the parser is built; heavy or
optional imports (torch, matplotlib) stay inside the commands.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from minimind_jax.errors import error_line_and_code
from minimind_jax.model.flags import HelpFormatter
from minimind_jax.runtime import compile_cache, host_memory, xla_flags

# command module -> the commands it registers, in `--help` order.
COMMAND_MODULES = (
    "minimind_jax.train.flags",  # the stages: pretrain, sft, lora, dpo, distill, ...
    "minimind_jax.data.prepare",  # prepare
    "minimind_jax.data.tokenizer_cli",  # tokenizer
    "minimind_jax.model.convert",  # convert
    "minimind_jax.train.evaluate",  # eval
    "minimind_jax.infer.generate",  # generate, chat
    "minimind_jax.serve.command",  # serve
    "minimind_jax.tools.compare",  # compare
    "minimind_jax.tools.demo",  # demo
    "minimind_jax.tools.bench",  # bench
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minimind-jax",
        description="Train MiniMind2 and minimind-3 language models with JAX: tokenizer -> "
                    "prepare -> "
                    "pretrain -> sft -> generate/chat, plus weight conversion, loss-curve "
                    "comparison with the PyTorch reference, and benchmarks.",
        formatter_class=HelpFormatter,
        epilog="environment:\n"
               f"  {host_memory.ENV_SWITCH + '=0':27s}  training commands do not re-execute "
               f"themselves with {host_memory.TUNABLE}\n"
               f"  {'':27s}  (huge pages for XLA:CPU's per-step buffers)\n"
               f"  {xla_flags.ENV_SWITCH + '=0':27s}  no XLA:CPU flag defaults "
               "(minimind_jax/runtime/xla_flags.py)\n"
               f"  {compile_cache.ENV_SWITCH + '=0':27s}  no persistent compilation cache "
               "(default: ~/.cache/minimind_jax/xla;\n"
               f"  {'':27s}  JAX_COMPILATION_CACHE_DIR=DIR picks another folder)",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None:  # a real process entry only: in-process calls keep their environment
        if getattr(args, "host_hugepages", False):
            host_memory.reexec_with_hugepages()
        xla_flags.apply_cpu_defaults()
        if getattr(args, "compile_cache", False):
            compile_cache.enable_default()
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

