"""The ``vlsae-guard serve MODEL --sae DIR [vllm args...]`` command line: guard and serving
flags out of the arguments, the rest for vLLM.

Guard flags may appear anywhere after MODEL; they are the ones every vlsae-guard tool accepts
(:mod:`vlsae_guard.cli.guard_flags`), plus the serving ones. Everything else goes to vLLM unchanged.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
from collections.abc import Sequence

from pydantic import ValidationError

from ..serving.server import ServeError, prepare
from ..serving.settings import ALLOW_FLAG, ServeSettings
from ..validation import describe_validation_error
from .guard_flags import GuardFlagsError, add_guard_flags, settings_from_args


def guard_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlsae-guard serve", add_help=False, allow_abbrev=False)
    parser.add_argument("--sae", dest="vlsae_guard", default=None)
    add_guard_flags(parser)
    group = parser.add_argument_group("serving")
    group.add_argument("--vlsae-default", choices=["on", "off"], default="on")
    group.add_argument("--vlsae-dtype", choices=["float32", "model"], default="float32")
    group.add_argument("--vlsae-log", default=None)
    group.add_argument(ALLOW_FLAG, dest="vlsae_allow_request_kwargs", action="store_true")
    group.add_argument("--dry-run", action="store_true")
    return parser


def parse(sae: str | None, rest: Sequence[str]) -> tuple[ServeSettings, list[str], bool]:
    """(settings, vLLM's arguments, dry run) from ``--sae`` and the arguments after MODEL."""
    ns, vllm_args = guard_parser().parse_known_args(list(rest))
    if sae and ns.vlsae_guard and sae != ns.vlsae_guard:
        raise ServeError(f"--sae given twice: {sae} and {ns.vlsae_guard}")
    ns.vlsae_guard = ns.vlsae_guard or sae
    try:
        guard = settings_from_args(ns)
    except GuardFlagsError as e:
        raise ServeError(str(e)) from e
    if guard is None:
        raise ServeError("--sae DIR is required (the VL-SAE checkpoint to guard with)")
    try:
        settings = ServeSettings(
            sae=ns.vlsae_guard,
            guard=guard,
            default=ns.vlsae_default == "on",
            dtype=ns.vlsae_dtype,
            log=ns.vlsae_log,
            allow_request_kwargs=ns.vlsae_allow_request_kwargs,
        )
    except ValidationError as e:
        raise ServeError(
            f"invalid guard settings\n{describe_validation_error(e, {'': '--vlsae-*'})}"
        ) from e
    return settings, vllm_args, ns.dry_run


def serve(model: str, sae: str | None, rest: Sequence[str]) -> None:
    """Validate, then replace this process with the vLLM server (or print it: --dry-run)."""
    settings, vllm_args, dry_run = parse(sae, rest)
    command, env = prepare(model, settings, vllm_args)
    if dry_run:
        for key, value in sorted(settings.to_env().items()):
            print(f"{key}={shlex.quote(value)}")
        print(shlex.join(command))
        return
    if importlib.util.find_spec("vllm") is None:
        raise ServeError(
            "vLLM is not installed in this environment: pip install 'vlsae-guard[vllm]' (GPU), "
            "or bash scripts/setup-vllm.sh for the CPU build"
        )
    os.execve(command[0], command, env)
