"""`--help` states each default once: no "(default: None)", no default said twice."""

import argparse

import pytest

from minimind_jax import cli
from minimind_jax.model.flags import HelpFormatter, help_states_default


def _subparsers():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


PARSER, COMMANDS = _subparsers()


def _option_helps(parser):
    """(option, action, its help as printed but unwrapped, the "(default: X)" appended to it or
    "") for every shown option of one parser."""
    formatter = parser._get_formatter()
    assert isinstance(formatter, HelpFormatter)
    for action in parser._actions:
        if action.help is argparse.SUPPRESS:
            continue
        name = action.option_strings[-1] if action.option_strings else action.dest
        own = action.help or ""
        shown = formatter._get_help_string(action)
        assert shown.startswith(own)
        yield name, action, formatter._expand_help(action), shown[len(own):]


def test_every_command_uses_the_formatter():
    assert {"pretrain", "sft", "lora", "dpo", "distill", "eval", "generate", "chat", "serve",
            "convert", "compare", "demo", "tokenizer", "prepare", "bench"} <= set(COMMANDS)
    for name, sub in COMMANDS.items():
        assert sub.formatter_class is HelpFormatter, name


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_states_each_default_once(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside "(default: ...)"
    sub = COMMANDS[command]
    assert "(default: None)" not in sub.format_help()
    for name, action, text, appended in _option_helps(sub):
        if appended:
            assert appended == " (default: %(default)s)", (command, name)
            assert not help_states_default(action.help), (
                f"{command} {name}: default stated twice: {text!r}")
            assert action.default not in (None, argparse.SUPPRESS), (command, name)
            assert text.count("(default") == 1, (command, name, text)
        elif action.default not in (None, argparse.SUPPRESS, False) and action.option_strings:
            # a real default: the help must say it in words, else it is appended
            assert help_states_default(action.help), f"{command} {name}: default hidden"


def test_main_help_and_real_defaults(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    assert "(default: None)" not in PARSER.format_help()
    helps = {name: text for name, _, text, _ in _option_helps(COMMANDS["pretrain"])}
    assert helps["--dtype"].endswith("(default: auto)")  # a real default, shown once
    assert helps["--epochs"].count("default") == 1  # said in words, nothing appended
    assert "(default: False)" not in helps["--resume"]
