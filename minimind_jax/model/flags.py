"""Command-line pieces shared by every command: the help formatter, the 0/1-or-true/false flag
value, and the model group (`--arch/--preset/--dim ...`) with the ModelConfig built from it.

It lives in the lowest layer whose commands use it (`convert`), so that every command module,
in whichever layer, imports it downward; it imports no command module."""

from __future__ import annotations

import argparse
import re

from minimind_jax.errors import UserError
from minimind_jax.model.config import (
    ARCHES,
    PRESETS,
    ModelConfig,
    arch_defaults,
    arch_of,
    resolve_dtype,
)

# A help text that says "default" already states the option's default in words.
_STATES_DEFAULT = re.compile(r"%\(default\)|\bdefault\b", re.IGNORECASE)


def help_states_default(help_text: str | None) -> bool:
    return bool(help_text) and _STATES_DEFAULT.search(help_text) is not None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each default once and keeps the description's line breaks.

    argparse's ArgumentDefaultsHelpFormatter appends "(default: X)" to every option, also when
    X is None (the stage or arch fills it in later, which the help says in words) or when the
    help already says "(default 1; --arch minimind3: 2)". Here it is appended only when the
    default is a real value, the help does not mention its default, and the option is not an
    on/off switch that is off by default.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        if (default is None or default is argparse.SUPPRESS or help_states_default(help_text)
                or (action.nargs == 0 and default is False)):
            return help_text
        return super()._get_help_string(action)


FALSE_WORDS = ("0", "false", "no", "off", "")
TRUE_WORDS = ("1", "true", "yes", "on")


def parse_flag_bool(text: str) -> bool:
    """A 0/1 or true/false value, as minimind-3 gives `--use_moe 0|1` and MiniMind2
    `--use_moe True`."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected 0/1 or true/false, got {text!r}")


def add_model_args(parser: argparse.ArgumentParser, moe_value: bool = False) -> None:
    """Model-shape flags shared by every command that builds a model (reference names).

    `moe_value`: `--use_moe` also takes the reference scripts' value (0|1|True|False); only for
    commands without positional arguments, which the optional value could swallow.
    """
    g = parser.add_argument_group("model")
    g.add_argument("--arch", choices=ARCHES, default=None,
                   help="reference family: minimind2 (jingyaogong/minimind d9453ed, the "
                        "default) or minimind3 (upstream HEAD d65ef2c: q/k norm, rotate-half "
                        "RoPE, top-1 MoE, its samples and stage defaults; 768/8 by default)")
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
    moe_help = "mixture-of-experts feed-forward (4 routed experts, top-2, 1 shared)"
    if moe_value:
        g.add_argument("--use_moe", nargs="?", const=True, default=None,
                       type=parse_flag_bool, metavar="0|1",
                       help=moe_help + "; alone or 1/True = on, 0/False = off (minimind-3's "
                            "`--use_moe 1`, MiniMind2's `--use_moe True`; MiniMind2's bool() "
                            "parser read even `False` as on)")
    else:
        g.add_argument("--use_moe", action="store_true", default=None, help=moe_help)
    g.add_argument("--moe_impl", choices=("auto", "ragged", "blocked", "dense"), default=None,
                   help="MoE kernel: auto = ragged_dot grouped GEMM on GPU/TPU, blocked scan on "
                        "CPU; dense = every expert on every token (for checks)")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="compute dtype; auto = bfloat16 on GPU/TPU, float32 on CPU "
                        "(master weights, logits and softmax stay float32)")
    g.add_argument("--attention_impl", choices=("auto", "xla", "cudnn", "chunked"),
                   default="auto",
                   help="attention kernel: auto = chunked causal blocks on CPU, cuDNN on GPU "
                        "(bf16/fp16; packed rows through a mask bias, odd lengths padded by one), "
                        "else XLA's dot_product_attention; decoding always uses XLA")
    g.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each block's activations in the backward pass (one scanned "
                        "loop of blocks): a fraction of the step's memory for about a third "
                        "more forward compute (default off; on for dpo, distill, grpo and ppo, "
                        "which hold a frozen second model, at --max_seq_len 256 or more)")
    g.add_argument("--scan_layers", action="store_true",
                   help="compile one layer body and scan it (faster compiles for deep models)")


def arch_from_args(args: argparse.Namespace) -> str:
    """--arch, else the --preset's family, else minimind2; a preset of the other family is an
    error."""
    preset = getattr(args, "preset", None)
    preset_arch = arch_of(PRESETS[preset]) if preset else None
    arch = getattr(args, "arch", None)
    if arch and preset_arch and arch != preset_arch:
        raise UserError(f"--preset {preset} is a {preset_arch} model, not --arch {arch}")
    return arch or preset_arch or "minimind2"


def model_config_from_args(args: argparse.Namespace, base: ModelConfig | None = None,
                           **overrides) -> ModelConfig:
    """Build a ModelConfig: `base` (or the preset, or the defaults), then explicit flags."""
    config = base or (PRESETS[args.preset] if getattr(args, "preset", None)
                      else arch_defaults(arch_from_args(args)))
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
    if getattr(args, "remat", None) is not None:
        changes["remat"] = args.remat
    if getattr(args, "scan_layers", False):
        changes["scan_layers"] = True
    changes.update(overrides)
    return config.replace(**changes)  # a ConfigError names the offending fields
