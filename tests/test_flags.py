"""CLI flags made from the config dataclasses: names, defaults and help come from the dataclass, stated once."""

import argparse
import dataclasses

import pytest

from treeflash.bench.runner import BenchConfig
from treeflash.cli import build_parser
from treeflash.cli.flags import (add_dataclass_flags, add_decode_flags, dataclass_from_args, dataclass_to_argv,
                                 decode_config_from_args, field_comments)
from treeflash.decoding import DEFAULT_CPU_BUDGET, DecodeConfig
from treeflash.serve.app import ServeConfig
from treeflash.train.config import TrainConfig


@dataclasses.dataclass
class Example:
    size: int = 3  # how many
    # the name, over
    # two lines
    name: str | None = None
    ratio: float = dataclasses.field(default=0.5, metadata={"help": "from metadata"})
    fast: bool = False  # go fast
    checked: bool = True  # check things
    sizes: tuple[int, ...] = (1, 2)  # several sizes
    tuned: int | None = None  # a number; None = the tuned one


def _help(parser: argparse.ArgumentParser, dest: str) -> str:
    return next(a.help for a in parser._actions if a.dest == dest)


def test_flags_come_from_the_fields_comments_and_defaults():
    assert field_comments(Example)["name"] == "the name, over two lines"
    p = argparse.ArgumentParser()
    add_dataclass_flags(p, Example)
    assert dataclass_from_args(Example, p.parse_args([])) == Example()
    args = p.parse_args(["--size", "5", "--name", "x", "--ratio", "2", "--fast", "--no-checked", "--sizes", "4,8",
                         "--tuned", "7"])
    assert dataclass_from_args(Example, args) == Example(5, "x", 2.0, True, False, (4, 8), 7)
    for example in (Example(), Example(5, "x", 2.0, True, False, (4, 8), 7)):  # and back to the same flags
        assert dataclass_from_args(Example, p.parse_args(dataclass_to_argv(example))) == example
    assert _help(p, "size") == "how many (default: 3)"
    assert _help(p, "name") == "the name, over two lines"
    assert _help(p, "ratio") == "from metadata (default: 0.5)"
    assert _help(p, "sizes") == "several sizes (default: 1,2)"
    assert _help(p, "tuned") == "a number (default: the tuned one)"
    with pytest.raises(SystemExit):
        p.parse_args(["--sizes", "4,x"])


@pytest.mark.parametrize("cls", [BenchConfig, ServeConfig, DecodeConfig, TrainConfig])
def test_every_field_has_help_and_no_flag_changes_a_default(cls):
    p = argparse.ArgumentParser()
    if cls is DecodeConfig:
        add_decode_flags(p)
        made = decode_config_from_args(p.parse_args([]))
    else:
        add_dataclass_flags(p, cls)
        made = dataclass_from_args(cls, p.parse_args([]))
    assert made == cls()
    for field in dataclasses.fields(cls):
        assert _help(p, field.name), f"{cls.__name__}.{field.name} has no help"


def test_the_cpu_default_budget_is_the_codes_own_in_every_help():
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in ("generate", "serve"):
        assert f"else {DEFAULT_CPU_BUDGET} on a CPU" in _help(commands[name], "budget"), name
