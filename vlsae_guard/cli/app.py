"""The ``vlsae-guard`` command line: the subcommand registry, the parser and error handling.

Each subcommand is one function decorated with :func:`subcommand`, which declares its
arguments next to it, in the module of its command group (:data:`GROUPS`); :func:`main` builds
the parser from that registry and dispatches. Flags that set a config field are declared with
:func:`field_arg`, so their help shows the default the model has, not a copy of it.
Expected failures (a broken checkpoint, invalid arguments, an unwritable path) print a message
to stderr and exit with status 2, without a traceback: tracebacks are reserved for bugs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from .. import __version__
from ..backends import UnsupportedModelError
from ..core.checkpoint import CheckpointError
from ..core.intervention import REWRITES, GuardConfig
from ..harness.common import BenchmarkError
from ..outputs import write_text
from ..scoring.files import DataError
from ..validation import describe_validation_error

PROG = "vlsae-guard"
EXIT_ERROR = 2
# The modules that register the subcommands, in the order `vlsae-guard --help` lists them.
GROUPS = ("checkpoints", "bench", "pipeline", "concepts", "steer", "serve")

Handler = Callable[[argparse.Namespace], None]
M = TypeVar("M", bound=BaseModel)


class UsageError(Exception):
    """Arguments argparse accepted but the models reject; the message names the flags."""


@dataclass(frozen=True)
class Arg:
    """One ``add_argument`` call, kept until the parser is built; ``field`` is the config field
    (model, name) the flag sets, if any."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any]
    field: tuple[type[BaseModel], str] | None = None


_SUBCOMMANDS: dict[str, tuple[str, tuple[Arg, ...], Handler]] = {}
# Help of command groups ("score pope" registers subcommand pope of group score).
_GROUPS = {"score": "score answer/caption files that others produced (POPE, CHAIR)"}


def arg(*flags: str, **kwargs: Any) -> Arg:
    """A flag that sets no config field."""
    return Arg(flags, kwargs)


def field_arg(
    model: type[BaseModel],
    name: str,
    *flags: str,
    help: str = "",
    unset: str = "",
    fill: bool = False,
    **kwargs: Any,
) -> Arg:
    """A flag that sets ``model.name``; its help ends with the field's default, read from the
    model (``unset`` says what a default of None means).

    ``fill``: argparse fills in the default (commands without a settings file); otherwise the
    flag defaults to None, so that an omitted flag leaves the file's value alone.
    """
    default = field_default(model, name)
    shown = unset if default is None else show_default(default)
    if shown:
        help = f"{help} (default: {shown})" if help else f"default: {shown}"
    if fill and default is not PydanticUndefined:
        kwargs["default"] = default
    return Arg(flags, {**kwargs, "help": help or None}, (model, name))


def field_default(model: type[BaseModel], name: str) -> Any:
    """The field's default (from its factory if it has one); PydanticUndefined if required."""
    return model.model_fields[name].get_default(call_default_factory=True)


def show_default(value: Any) -> str:
    """A default as help shows it (1e-4 -> 0.0001, 5e-5 -> 5e-5); required fields: empty."""
    if value is PydanticUndefined:
        return ""
    if isinstance(value, float):
        short = f"{value:g}".replace("e-0", "e-")
        return short if float(short) == value else repr(value)  # 1/3 is not 0.333333
    return str(value)


def field_choices(model: type[BaseModel], name: str) -> tuple[str, ...]:
    """The values a (possibly optional) Literal field allows, so argparse's help lists them."""

    def values(annotation: Any) -> tuple[str, ...]:
        if get_origin(annotation) is Literal:
            return get_args(annotation)
        return tuple(v for a in get_args(annotation) for v in values(a))

    return values(model.model_fields[name].annotation)


def subcommand(name: str, help: str, *args: Arg) -> Callable[[Handler], Handler]:
    """Register ``handler(args)`` as ``vlsae-guard NAME``; its docstring is the description."""

    def register(handler: Handler) -> Handler:
        _SUBCOMMANDS[name] = (help, args, handler)
        return handler

    return register


def build_parser() -> argparse.ArgumentParser:
    """The whole CLI; each flag's action carries ``config_field`` (model, name) or None."""
    for group in GROUPS:
        importlib.import_module(f"{__package__}.{group}")
    parser = argparse.ArgumentParser(
        prog=PROG, description="Reduce object hallucination in LLaVA models with a VL-SAE."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (help, args, handler) in _SUBCOMMANDS.items():
        group, _, name = name.rpartition(" ")  # "score pope": subcommand pope of group score
        where = commands
        if group:
            if group not in groups:
                parent = commands.add_parser(group, help=_GROUPS[group], description=_GROUPS[group])
                groups[group] = parent.add_subparsers(dest="subcommand", metavar="BENCHMARK")
                groups[group].required = True
            where = groups[group]
        sub = where.add_parser(name, help=help, description=handler.__doc__)
        for a in args:
            sub.add_argument(*a.flags, **a.kwargs).config_field = a.field
        sub.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (also for ``--help`` and usage errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, argparse usage errors
        return 0 if e.code is None else e.code if isinstance(e.code, int) else EXIT_ERROR
    try:
        args.handler(args)
    except ValidationError as e:
        return _fail(args.command, f"invalid settings\n{describe_validation_error(e)}")
    except (
        CheckpointError,
        UsageError,
        OSError,
        DataError,
        BenchmarkError,
        UnsupportedModelError,
    ) as e:
        return _fail(args.command, str(e))
    return 0


def _fail(command: str, message: str) -> int:
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def validated(model: type[M], what: str, /, *, across: str = "", **values: Any) -> M:
    """Build ``model`` from flags named like its fields (``--model-id`` for ``model_id``).

    Validation errors come back as a :class:`UsageError` naming the flags, not the fields;
    ``across`` names the flags a whole-model check is about. ``model`` and ``what`` are
    positional-only, so that models may have fields of those names (``--model``).
    """
    try:
        return model(**values)
    except ValidationError as e:
        names = {f: "--" + f.replace("_", "-") for f in values}
        names[""] = across or "/".join(names.values())
        raise UsageError(f"invalid {what}\n{describe_validation_error(e, names)}") from e


def validated_flags(model: type[M], args: argparse.Namespace, *, across: str = "") -> M:
    """:func:`validated` with every field of ``model`` read from the flag of its name."""
    values = {f: getattr(args, f) for f in model.model_fields}
    return validated(model, "arguments", across=across, **values)


def settings(
    model: type[M], file: Path | None, flags: dict[str, Any], replace: Sequence[str] = ()
) -> M:
    """``model`` from a YAML/JSON file (optional) overridden by the flags given.

    ``flags`` maps dotted field paths (``data.path``) to ``(flag, value)``; ``None`` values are
    not given, ``{}`` switches a section on (keeping the file's settings for it). Sections in
    ``replace`` are dropped from the file first. Errors name the file or the flag, the field,
    what was expected and what was found.
    """
    raw: dict[str, Any] = {}
    if file is not None:
        import yaml

        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UsageError(f"{file}: not readable as YAML or JSON ({e})") from e
        if not isinstance(raw, dict):
            raise UsageError(f"{file}: expected a mapping of settings, found {type(raw).__name__}")
    for section in replace:
        raw.pop(section, None)
    names = {}
    for path, (flag, value) in flags.items():
        if value is None:
            continue
        *parents, leaf = path.split(".")
        node = raw
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if value == {}:
            node.setdefault(leaf, {})
        else:
            node[leaf] = value
        names[path] = f"{flag} (field {path})"
        # Errors inside a tagged union (data: coco | jsonl | hf) carry the tag in their path.
        if isinstance(node.get("format"), str):
            names[".".join([*parents, node["format"], leaf])] = names[path]
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        where = f"{file}" if file is not None else "flags"
        raise UsageError(
            f"invalid settings ({where}; flags override the file)\n"
            + describe_validation_error(e, names)
        ) from e


def rewrite_args() -> tuple[Arg, Arg]:
    """--rewrite (a :class:`GuardConfig` field) and its deprecated name --method."""
    return (
        field_arg(
            GuardConfig,
            "rewrite",
            "--rewrite",
            choices=REWRITES,
            fill=True,
            help="how the guard rewrites the image tokens",
        ),
        arg("--method", choices=REWRITES, help="deprecated name of --rewrite"),
    )


def rewrite_flag(args: argparse.Namespace) -> str:
    """--rewrite, or its deprecated name --method (with a warning)."""
    if args.method is None:
        return args.rewrite
    print(f"{PROG}: warning: --method is deprecated, use --rewrite {args.method}", file=sys.stderr)
    return args.method


def write_json(path: Path | None, result: dict) -> None:
    """Write ``result`` to ``path`` (if given) and say so."""
    if path is not None:
        write_text(path, json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
