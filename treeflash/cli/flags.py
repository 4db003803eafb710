"""Command-line flags made from config dataclasses, so that a setting's name, default and help are stated once.

A field `max_new_tokens: int = 256  # stop after this many new tokens` becomes
`--max-new-tokens N` (type int, default 256, help "stop after this many new tokens (default: 256)"). The help
is the field's `metadata["help"]` if it has one, else its comment in the class source: the comment on the
field's line, or the comment lines right above it. A bool field that defaults to False becomes a switch
(`--analyses`); one that defaults to True a `--no-...` switch (`--no-chat`) that turns it off. A tuple field
takes a comma-separated list. A comment that ends "; None = X" states X as the default of a field whose default is
None. `dataclass_from_args` builds the dataclass back from the parsed flags, so the dataclass
validates them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import re
import textwrap
import tokenize
from typing import Any, Callable, Iterable

from ..decoding import DEFAULT_BUDGET, DEFAULT_CPU_BUDGET, DEFAULT_LOOKUP, METHODS, DecodeConfig
from ..errors import TreeFlashError
from ..trees import budget_from_tree_size

_SCALARS: dict[str, Callable] = {"int": int, "float": float, "str": str}

# What a default of None means where the field's comment speaks to code rather than to a user of the CLI
# (the numbers come from the code's own constants, so they cannot drift from what it does).
BUDGET_DEFAULT = (f"the budget `treeflash tune` chose on this machine, else {DEFAULT_CPU_BUDGET} on a CPU and "
                  f"{DEFAULT_BUDGET} on a GPU for trees; block size - 1 for dflash")
LOOKUP_DEFAULT = ("the tuned length, else " + " and ".join(f"{n} for {m}" for m, n in DEFAULT_LOOKUP.items())
                  + ", 0 for ar and dflash")


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """The comment of each field in the source of `cls`: on its line, else the comment lines right above it."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (a frozen application): flags go without help
        return {}
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    found: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        match = re.match(r"\s+(\w+)\s*:", line)
        if not match or match.group(1) in found:
            continue
        if number in comments and not line.lstrip().startswith("#"):
            found[match.group(1)] = comments[number]
            continue
        above = []
        k = number - 1
        while k >= 1 and lines[k - 1].lstrip().startswith("#"):
            above.insert(0, comments.get(k, ""))
            k -= 1
        if above:
            found[match.group(1)] = " ".join(above)
    return found


def field_help(cls: type, name: str) -> str:
    """A field's help text: its `metadata["help"]`, else its comment in the source."""
    field = _fields(cls)[name]
    return field.metadata.get("help") or field_comments(cls).get(name, "")


def default_of(cls: type, name: str) -> Any:
    field = _fields(cls)[name]
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def comma_list(kind: Callable) -> Callable[[str], tuple]:
    """An argparse type: "a,b,c" -> (kind(a), kind(b), kind(c))."""
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x.strip()) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
    return parse


def add_field_flag(parser, cls: type, name: str, flag: str | None = None, default_text: str | None = None,
                   help: str | None = None, own_help: str | None = None, **kwargs) -> None:
    """Add the flag of one field of the dataclass `cls` to `parser` (a parser or an argument group).

    flag: the flag's name (default: --field-name; --no-field-name for a bool that defaults to True).
    default_text: how the help states the default, where its value alone would not say it (e.g. a None that
    means "the tuned one"). help: extra text after the field's own; own_help: text instead of the field's own,
    where that speaks to code rather than to a user. kwargs go to `add_argument` (e.g. choices)."""
    field = _fields(cls)[name]
    default = default_of(cls, name)
    annotation = field.type  # a string under `from __future__ import annotations`
    if not isinstance(annotation, str):
        plain = isinstance(annotation, type) and not hasattr(annotation, "__origin__")
        annotation = annotation.__name__ if plain else str(annotation)
    text = own_help if own_help is not None else field_help(cls, name)
    if help:
        text = f"{text}; {help}" if text else help
    if annotation == "bool":
        flag = flag or (f"--no-{name.replace('_', '-')}" if default else f"--{name.replace('_', '-')}")
        kwargs.setdefault("action", "store_false" if default else "store_true")
        if default and own_help is None:  # the field says what it turns on; this flag turns it off
            text = f"{text} (on by default; {flag} turns it off)"
    else:
        flag = flag or f"--{name.replace('_', '-')}"
        base = annotation.replace(" | None", "").strip()
        sequence = re.fullmatch(r"tuple\[(\w+), \.\.\.\]", base)
        if sequence:
            kwargs.setdefault("type", comma_list(_SCALARS[sequence.group(1)]))
            item = "N" if sequence.group(1) == "int" else name.upper().rstrip("S")
            kwargs.setdefault("metavar", f"{item}[,{item}...]")
        elif base in _SCALARS and base != "str":
            kwargs.setdefault("type", _SCALARS[base])
        meaning = re.search(r";\s*None = (.+)$", text) if default is None else None
        if meaning:  # "...; None = the tuned one" -> "... (default: the tuned one)"
            text = text[: meaning.start()]
            default_text = default_text or meaning.group(1)
        if default_text is None and default is not None:
            default_text = _shown(default)
        if default_text is not None:
            text = f"{text} (default: {default_text})" if text else f"(default: {default_text})"
    parser.add_argument(flag, dest=name, default=default, help=text.replace("%", "%%"), **kwargs)


def add_dataclass_flags(parser, cls: type, names: Iterable[str] | None = None, exclude: Iterable[str] = (),
                        flags: dict[str, str] | None = None, default_text: dict[str, str] | None = None,
                        help: dict[str, str] | None = None, own_help: dict[str, str] | None = None,
                        choices: dict[str, Iterable] | None = None) -> None:
    """Add one flag per field of the dataclass `cls` (those in `names`, else all but `exclude`), in that order;
    `flags`, `default_text`, `help`, `own_help` and `choices` are per field name (see `add_field_flag`)."""
    flags, default_text, help, choices = flags or {}, default_text or {}, help or {}, choices or {}
    own_help = own_help or {}
    wanted = list(names) if names is not None else [f.name for f in dataclasses.fields(cls) if f.name not in exclude]
    for name in wanted:
        kwargs = {"choices": tuple(choices[name])} if name in choices else {}
        add_field_flag(parser, cls, name, flags.get(name), default_text.get(name), help.get(name),
                       own_help.get(name), **kwargs)


def dataclass_to_argv(config: Any, flags: dict[str, str] | None = None) -> list[str]:
    """The flags of `add_dataclass_flags` that make `config` again, every field spelled out (a switch only where
    it is on): the inverse of `dataclass_from_args`."""
    flags = flags or {}
    argv: list[str] = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, bool):
            default = default_of(type(config), field.name)
            if value != default:
                argv.append(flags.get(field.name) or f"--{'no-' if default else ''}{field.name.replace('_', '-')}")
        elif value is not None:
            argv += [flags.get(field.name) or f"--{field.name.replace('_', '-')}", _shown(value)]
    return argv


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides) -> Any:
    """The dataclass `cls` made of the parsed flags that carry its fields' names, and `overrides`."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


# --------------------------------------------------------------------------------------------------
# Flags that several commands share


def add_decode_flags(p: argparse.ArgumentParser) -> None:
    """One flag per DecodeConfig field (`--ignore-eos` for stop_at_eos), and --tree-size, the budget counted
    with the root."""
    add_field_flag(p, DecodeConfig, "method", choices=METHODS)
    budget = p.add_mutually_exclusive_group()
    add_field_flag(budget, DecodeConfig, "budget", default_text=BUDGET_DEFAULT)
    budget.add_argument("--tree-size", type=int, default=None,
                        help="the same, counting the root as ETH's TreeFlash does (tree size = budget + 1)")
    add_dataclass_flags(p, DecodeConfig, exclude=("method", "budget"), flags={"stop_at_eos": "--ignore-eos"},
                        own_help={"stop_at_eos": "keep generating past end-of-sequence tokens"},
                        default_text={"lookup": LOOKUP_DEFAULT})


def decode_config_from_args(args: argparse.Namespace) -> DecodeConfig:
    """The DecodeConfig of `add_decode_flags`' flags (--tree-size turned into a budget)."""
    budget = args.budget if args.tree_size is None else budget_from_tree_size(args.tree_size)
    return dataclass_from_args(DecodeConfig, args, budget=budget)


def add_model_flags(p: argparse.ArgumentParser, drafter: bool = True) -> None:
    """--target, --drafter, --drafter-dtype, --device, --dtype: what `treeflash.load` takes."""
    p.add_argument("--target", default=None,
                   help="Hugging Face model directory or hub id (default: the embedded SmolLM2-135M-Instruct)")
    if drafter:
        p.add_argument("--drafter", default=None,
                       help="drafter checkpoint directory (DFlash, TreeFlash or ours); 'untrained' for a fresh one "
                            "(default: the drafter shipped for the target)")
        p.add_argument("--drafter-dtype", default=None,
                       help="the drafter's dtype; its precision never changes an output (default: bfloat16 for a "
                            "float32 target on a CPU with AMX, else the target's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or float64 (default: float32)")


def int_list(text: str, flag: str) -> list[int]:
    """"4,8,16" -> [4, 8, 16], or a one-sentence error naming `flag`."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise TreeFlashError(f"{flag} takes comma-separated whole numbers, like 4,8,16; got {text!r}") from None
    if not values:
        raise TreeFlashError(f"{flag} needs at least one value")
    return values
