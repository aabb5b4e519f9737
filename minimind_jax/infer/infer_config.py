"""The typed configuration of the commands that run a model: frozen dataclasses, read from the
flags once, at the command's edge.

`LoadConfig` says which weights and tokenizer a command runs (generate, chat, eval, serve);
`GenerateConfig` adds how `generate` and `chat` prompt and sample (`SamplingConfig`,
infer/sampling.py). A flag that sets a field is made from it by `field_flag`: its default is the
field's, so each default is written once, in its dataclass; `config_from_flags` reads the
parsed flags back into the dataclass. Each dataclass checks its bounds in `__post_init__`, the
one place that does.
"""

from __future__ import annotations

import argparse
import dataclasses

from minimind_jax.infer.sampling import SamplingConfig
from minimind_jax.model import flags as model_flags
from minimind_jax.model.config import ModelConfig


def field_default(cls, name: str):
    """The default of dataclass `cls`'s field `name` (dataclasses.MISSING: none)."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def field_flag(parser, cls, name: str, help: str, flag: str | None = None,
               **kwargs) -> argparse.Action:
    """`--name` (or `--flag`) setting field `name` of dataclass `cls`, defaulting to the field's
    default (a field without one: a required flag), typed as that default: a bool field that is
    off by default is a switch, one that is on is switched off by `--no_name` (its default then
    goes unprinted: the help says it). `kwargs` add to or override these (argparse's own)."""
    default = field_default(cls, name)
    if flag and not isinstance(default, bool):  # named as the flag in --help, not as the field
        kwargs.setdefault("metavar", flag.upper())
    flag = f"--{flag or name}"
    if default is dataclasses.MISSING:
        kwargs.setdefault("required", True)
    elif isinstance(default, bool):
        kwargs.setdefault("action", "store_false" if default else "store_true")
        if default:
            flag, kwargs = f"--no_{flag[2:]}", {"default": argparse.SUPPRESS, **kwargs}
    elif default is not None:
        kwargs.setdefault("type", type(default))
    kwargs.setdefault("default", None if default is dataclasses.MISSING else default)
    return parser.add_argument(flag, dest=name, help=help, **kwargs)


def config_from_flags(cls, args: argparse.Namespace, **given):
    """A `cls` of the `given` fields and, for each other field, the flag of its name (one the
    command lacks or left unprinted and unset: the field's default)."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in given]
    return cls(**{name: getattr(args, name) for name in names if hasattr(args, name)}, **given)


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    """Which weights a command runs and how: `ckpt` (a run or checkpoint folder, or a
    reference state-dict file, whose shapes come from the file and the rest from `model`), with
    `lora_weight`'s adapters, computing in `dtype` (`auto`: by platform); its tokenizer is
    `tokenizer`, else the one saved beside `ckpt`."""

    ckpt: str
    tokenizer: str | None = None
    lora_weight: str | None = None
    model: ModelConfig | None = None  # None: ModelConfig()
    dtype: str = "auto"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LoadConfig:
        """The --ckpt, --tokenizer and --lora_weight flags, and the model flags."""
        return config_from_flags(cls, args, model=model_flags.model_config_from_args(args))


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """What `generate` and `chat` run: the model, its sampling, and how a prompt is made."""

    load: LoadConfig
    sampling: SamplingConfig = SamplingConfig()
    seed: int = 0  # chat: the first turn's; each next turn counts up
    raw: bool = False  # no chat template: `<s>` + the text (pretrained-only models)
    system: str | None = None  # None: the template's own
    think: bool = False  # minimind-3: open a think block (its template's open_thinking)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> GenerateConfig:
        sampling = config_from_flags(SamplingConfig, args)  # the cheap checks first
        return config_from_flags(cls, args, sampling=sampling, load=LoadConfig.from_args(args))


def add_load_args(parser, ckpt_help: str,
                  tokenizer_help: str = "tokenizer folder (default: one saved beside the "
                                        "checkpoint)") -> None:
    """LoadConfig's flags, but the model flags (model.flags.add_model_args)."""
    field_flag(parser, LoadConfig, "ckpt", ckpt_help)
    add_lora_weight_arg(parser)
    field_flag(parser, LoadConfig, "tokenizer", tokenizer_help)


def add_lora_weight_arg(parser) -> None:
    """--lora_weight of the commands that run a model (generate, chat, eval, serve)."""
    field_flag(parser, LoadConfig, "lora_weight", metavar="ADAPTER",
               help="apply this LoRA adapter (the reference's adapter .pth, or our lora run's "
                    "lora_*.pth) to the --ckpt weights, as the reference's load_lora (a lora "
                    "run folder as --ckpt has its adapters already)")
