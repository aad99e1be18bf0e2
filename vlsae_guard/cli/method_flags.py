"""``--method``, ``--ab`` and each method's settings as flags, made from the settings models.

Every field of a peer method's settings (:data:`vlsae_guard.methods.METHODS`) becomes
``--{method}-{field}`` (``VCDSettings.noise_step`` -> ``--vcd-noise-step``), its help ending with
the model's default, so a method added to the registry gets its flags without a line here. The
SAE methods (vlsae, paper, cue-mask) keep their ``--vlsae-*`` flags (:mod:`.guard_flags`).
"""

from __future__ import annotations

import argparse
import json
import typing

from pydantic.fields import FieldInfo

from ..methods import METHODS, MODES
from .app import show_default
from .guard_flags import GuardFlagsError

SEP = "__"  # argparse destination: method__{name}__{field}


def peer_methods() -> dict[str, type]:
    """Methods with settings of their own (not the guard's, not none)."""
    return {n: s.settings for n, s in METHODS.items() if n not in MODES and s.settings.model_fields}


def _value(text: str):
    """A flag value that is not a plain number: JSON if it parses (lists, numbers), else text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _flag_kwargs(field: str, info: FieldInfo) -> dict:
    annotation = info.annotation
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation in (int, float):
        return {"type": annotation, "metavar": field.upper()}
    if typing.get_origin(annotation) is typing.Literal:
        return {"choices": list(typing.get_args(annotation))}
    return {"type": _value, "metavar": "VALUE"}


def add_method_flags(parser: argparse.ArgumentParser) -> None:
    """``--method``, ``--ab [A B]`` and every peer method's settings."""
    group = parser.add_argument_group("method")
    group.add_argument(
        "--method",
        choices=list(METHODS),
        default=None,
        help="the inference method: "
        + "; ".join(f"{n}: {s.summary}" for n, s in METHODS.items())
        + " (default: vlsae with --sae, else none)",
    )
    group.add_argument(
        "--ab",
        nargs="*",
        metavar="METHOD",
        default=False,
        help="two arms: '--ab' alone compares none with --method; '--ab A B' compares method "
        "A with method B (deltas are B - A)",
    )
    for name, settings in peer_methods().items():
        group = parser.add_argument_group(f"--method {name}")
        for field, info in settings.model_fields.items():
            default = info.get_default(call_default_factory=True)
            help_ = (info.description or "").strip()
            help_ = f"{help_} (default: {show_default(default)})" if help_ else None
            group.add_argument(
                f"--{name}-{field.replace('_', '-')}",
                dest=f"method{SEP}{name}{SEP}{field}",
                default=None,
                help=help_,
                **_flag_kwargs(field, info),
            )


def ab_from_args(args: argparse.Namespace) -> bool | tuple[str, str]:
    """``--ab``: absent -> False, alone -> True, two methods -> (A, B)."""
    given = vars(args).get("ab")
    if given is None:
        return False
    if isinstance(given, bool):
        return given
    if len(given) == 0:
        return True
    if len(given) != 2:
        raise GuardFlagsError(f"--ab takes no method or two (A B), found {' '.join(given)}")
    unknown = [m for m in given if m not in METHODS]
    if unknown:
        raise GuardFlagsError(
            f"--ab: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}"
        )
    return tuple(given)


def settings_from_args(args: argparse.Namespace) -> dict[str, dict]:
    """The peer methods' flags that were given: ``{"vcd": {"alpha": 1.0}, ...}``."""
    out: dict[str, dict] = {}
    for dest, value in vars(args).items():
        if value is None or not dest.startswith(f"method{SEP}"):
            continue
        _, name, field = dest.split(SEP)
        out.setdefault(name, {})[field] = value
    return out
