"""The CLI's help shows each config field's default as the model has it.

Flags that set a config field are declared with ``field_arg`` and carry ``config_field`` on
their argparse action; the check below reads the default shown in the help back and compares
it with the model's, so a default written by hand (or one the model changed since) fails.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from vlsae_guard.cli import main
from vlsae_guard.cli.app import build_parser, field_arg, show_default
from vlsae_guard.cli.checkpoints import ImportOfficialArgs
from vlsae_guard.cli.concepts import CatalogArgs, InspectArgs, MSArgs
from vlsae_guard.pipeline.collect import CollectConfig
from vlsae_guard.pipeline.train import TrainConfig

# Each command's own model: every value flag named like one of its fields must be mapped.
COMMAND_MODELS = {
    ("collect",): CollectConfig,
    ("train",): TrainConfig,
    ("import-official",): ImportOfficialArgs,
    ("inspect",): InspectArgs,
    ("catalog",): CatalogArgs,
    ("ms",): MSArgs,
}
SHOWN = re.compile(r"^(?P<text>.*?)\s*\(?default: (?P<shown>[^)]*)\)?$")


def actions(
    parser: argparse.ArgumentParser, command: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.Action]]:
    """(subcommand path, action) for every flag of every (nested) subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from actions(sub, (*command, name))
        elif command:
            yield command, action


def subcommands() -> list[tuple[str, ...]]:
    return sorted({command for command, _ in actions(build_parser())})


def default_problems(parser: argparse.ArgumentParser) -> list[str]:
    """One line per mapped flag whose help or argparse default disagrees with its field."""
    problems = []
    for command, action in actions(parser):
        if getattr(action, "config_field", None) is None:
            continue
        model, name = action.config_field
        default = model.model_fields[name].get_default(call_default_factory=True)
        where = f"{' '.join(command)} {action.option_strings[0]}"
        match = SHOWN.match(action.help or "")
        text, shown = (match["text"], match["shown"]) if match else (action.help or "", None)
        if "default" in text.lower():
            problems.append(f"{where}: default written by hand in {action.help!r}")
        if default is PydanticUndefined:
            if shown is not None:
                problems.append(f"{where}: shows default {shown!r} of a required field")
        elif default is None:
            # None means "computed": the help may say how, but must not show a value.
            if shown is not None and (
                _number(shown) is not None or shown in (action.choices or ())
            ):
                problems.append(f"{where}: shows {shown!r}, the field's default is None")
        elif shown is None:
            problems.append(f"{where}: shows no default, the field's is {default!r}")
        elif isinstance(default, int | float) and not isinstance(default, bool):
            if _number(shown) != default:
                problems.append(f"{where}: shows {shown!r}, the field's default is {default!r}")
        elif shown != str(default):
            problems.append(f"{where}: shows {shown!r}, the field's default is {default!r}")
        if action.default is not None and action.default != default:
            problems.append(f"{where}: argparse default {action.default!r}, field's {default!r}")
    return problems


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def test_every_mapped_flag_shows_its_fields_default():
    assert default_problems(build_parser()) == []


def test_flags_named_like_a_field_are_mapped():
    by_command: dict[tuple[str, ...], list[argparse.Action]] = {}
    for command, action in actions(build_parser()):
        by_command.setdefault(command, []).append(action)
    assert set(COMMAND_MODELS) <= set(by_command)
    unmapped = [
        f"{' '.join(command)} {action.option_strings[0]}"
        for command, model in COMMAND_MODELS.items()
        for action in by_command[command]
        if action.option_strings
        and action.nargs != 0  # switches (--no-progress, --align) show no default
        and action.dest in model.model_fields
        and getattr(action, "config_field", None) is None
    ]
    assert unmapped == []
    mapped = sum(getattr(a, "config_field", None) is not None for _, a in actions(build_parser()))
    assert mapped >= 70  # the declarations reach the parser


def test_the_check_catches_hand_written_and_wrong_defaults():
    parser = argparse.ArgumentParser()
    subs = parser.add_subparsers()
    collect = subs.add_parser("collect")
    wrong = collect.add_argument("--batch-size", help="pairs per forward pass (default: 32)")
    wrong.config_field = (CollectConfig, "batch_size")
    hand = collect.add_argument("--workers", help="image-decoding threads (default 4)")
    hand.config_field = (CollectConfig, "workers")
    filled = collect.add_argument("--seed", type=int, default=1, help="seed (default: 0)")
    filled.config_field = (CollectConfig, "seed")
    none = collect.add_argument("--limit", help="pairs (default: 100)")
    none.config_field = (CollectConfig, "limit")
    problems = default_problems(parser)
    assert any("--batch-size: shows '32'" in p for p in problems)
    assert any("--workers: default written by hand" in p for p in problems)
    assert any("--seed: argparse default 1" in p for p in problems)
    assert any("--limit: shows '100'" in p for p in problems)
    assert any("--workers: shows no default" in p for p in problems)
    assert len(problems) == 5


class _Model(BaseModel):
    lr: float = 5e-5
    n: int | None = None
    path: str


def test_field_arg_reads_the_default_from_the_model():
    assert field_arg(_Model, "lr", "--lr", help="rate").kwargs["help"] == "rate (default: 5e-5)"
    assert field_arg(_Model, "n", "--n", help="n", unset="all").kwargs["help"] == "n (default: all)"
    assert field_arg(_Model, "n", "--n", help="n").kwargs["help"] == "n"
    assert field_arg(_Model, "path", "--path").kwargs["help"] is None
    filled = field_arg(_Model, "lr", "--lr", fill=True)
    assert (filled.kwargs["default"], filled.field) == (5e-5, (_Model, "lr"))
    assert "default" not in field_arg(_Model, "lr", "--lr").kwargs
    assert [show_default(v) for v in (1e-4, 1e-3, 0.0, 2048, "auto")] == [
        "0.0001",
        "0.001",
        "0",
        "2048",
        "auto",
    ]


@pytest.mark.parametrize("command", subcommands(), ids=" ".join)
def test_every_subcommand_prints_its_help(command, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: vlsae-guard {' '.join(command)}")
