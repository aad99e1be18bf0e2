"""Guard settings as command-line flags, shared by our CLI, the benchmarks and the patches.

One definition of the flags means a patched ``llava/eval`` script, ``benchmarks/pope.py`` and
``vlsae-guard`` accept the same spelling, and all of them validate through :class:`GuardConfig`.
"""

from __future__ import annotations

import argparse
import json

from pydantic import ValidationError

from ..core.intervention import GUARD_MODES, REWRITES, GuardConfig
from ..validation import describe_validation_error
from .app import field_choices, show_default


def add_guard_flags(parser: argparse.ArgumentParser, prefix: str = "vlsae-") -> None:
    """Add ``--{prefix}guard DIR`` and the settings; nothing is guarded unless DIR is given."""
    group = parser.add_argument_group("vlsae-guard")
    group.add_argument(
        f"--{prefix}guard",
        metavar="DIR",
        default=None,
        help="VL-SAE checkpoint directory (or Hub id); enables the guard",
    )
    group.add_argument(
        f"--{prefix}mode",
        choices=GUARD_MODES,
        default=None,
        help="projector (default; --method vlsae), paper (--method paper) or cue-mask "
        "(--method cue-mask)",
    )
    group.add_argument(
        f"--{prefix}rewrite",
        choices=REWRITES,
        default=None,
        help="projector mode: replace (default) or edit the image tokens",
    )
    group.add_argument(
        f"--{prefix}method",
        choices=REWRITES,
        default=None,
        help=f"deprecated name of --{prefix}rewrite",
    )
    group.add_argument(f"--{prefix}alpha", type=float, default=None)
    group.add_argument(f"--{prefix}text-grounded", action="store_true", default=None)
    group.add_argument(f"--{prefix}layer", type=int, default=None, help="paper mode: layer L")
    group.add_argument(
        f"--{prefix}steer",
        default=None,
        metavar="JSON",
        help="clamp concepts, e.g. '{\"12\": 1.5}'",
    )
    for where, flags in (
        ("paper mode", PAPER_FLAGS),
        ("cue-mask mode", CUE_FLAGS),
        ("projector mode", SITE_FLAGS),
    ):
        for field, help in flags.items():
            if field in SWITCHES:
                kind = {"action": "store_true"}
            elif field in NUMBERS:
                kind = {"type": float}
            elif field in ("objects", "site"):
                kind = {"metavar": field.upper() if field == "site" else "FILE"}
            else:
                kind = {"choices": field_choices(GuardConfig, field)}
            default = GuardConfig.model_fields[field].default
            shown = {"objects": "CHECKPOINT/objects.json"}.get(field, "as loaded")
            shown = shown if default is None else show_default(default)
            group.add_argument(
                f"--{prefix}{field.replace('_', '-')}",
                default=None,  # unset: GuardConfig's default
                help=f"{where}: {help} (default: {shown})",
                **kind,
            )


# Paper mode's settings beyond --{prefix}layer: GuardConfig field -> help (its default is added).
PAPER_FLAGS = {
    "point": "hook the input or the output of layer L",
    "beta": "pull of the text code towards the image's, z_t' = (1 - beta) z_t + beta z_v",
    "c_alpha": "weight of the guarded logits in the fusion",
    "c_beta": "plausibility cutoff: drop tokens below log(c_beta) + the plain maximum logit",
    "exact": "re-run the whole sequence every step (the official semantics, slow)",
    "sae_dtype": "the SAE's and auxiliary AE's compute dtype (the official scripts: float16)",
    "topk_ties": "TopK at a tie on the k-th activation: keep k, or drop the whole tie (fewer "
    "than k) as the official code does",
}
# Cue masking's settings: GuardConfig field -> help.
CUE_FLAGS = {
    "objects": "the object map (vlsae_guard.concepts.object_map.build_object_map)",
    "recall_floor": "a cue is in the image where its evidence reaches what this share of "
    "images holding it reach",
    "min_conditional": "c is a cue of o where captions name o with c at least this often",
    "min_lift": "... and at least this many times o's base rate",
    "token_share": "tokens masked: the cue's evidence above this share of the image's largest",
    "fill": "a masked token becomes the SAE's concept-free token, or the image's background",
}
# Where the projector mode acts, and the vision tower's settings: GuardConfig field -> help.
SITE_FLAGS = {
    "site": "projector, or vision_tower:L: the vision encoder's layer L output becomes the SAE's "
    "reconstruction with the steer concepts clamped",
    "pre_zero": "vision_tower site: zero every other concept before clamping",
    "keep_error": "vision_tower site: add back the SAE's error, so only the clamps change tokens",
    "search": "each image token's top-k: full, or screened (bfloat16 first with a certified "
    "bound; the same answer, faster on CPUs with AMX)",
}
SWITCHES = ("exact", "pre_zero", "keep_error")
NUMBERS = ("beta", "c_alpha", "c_beta", "recall_floor", "min_conditional", "min_lift",
           "token_share")  # fmt: skip
FIELDS = ("mode", "rewrite", "method", "alpha", "text_grounded", "layer", "steer", *PAPER_FLAGS,
          *CUE_FLAGS, *SITE_FLAGS)  # fmt: skip


class GuardFlagsError(ValueError):
    """The guard flags do not describe a valid :class:`GuardConfig` (the message names them)."""


def settings_from_args(
    args: argparse.Namespace, prefix: str = "vlsae-", base: dict | None = None
) -> GuardConfig | None:
    """The validated :class:`GuardConfig` the flags describe, or None when not guarding."""
    if vars(args).get(f"{prefix.replace('-', '_')}guard") is None:
        return None
    return guard_config(args, prefix, base)


def guard_config(
    args: argparse.Namespace, prefix: str = "vlsae-", base: dict | None = None
) -> GuardConfig:
    """The settings flags as a :class:`GuardConfig` (over ``base``, e.g. a preset's), whether or
    not a checkpoint is given; invalid ones raise :class:`GuardFlagsError`."""
    names = {f: f"--{prefix}{f.replace('_', '-')}" for f in FIELDS}
    names[""] = f"--{prefix}*"
    try:
        given = guard_fields(args, prefix)
        names.update(
            {f"steer.{c}": f"{names['steer']} concept {c}" for c in given.get("steer", {})}
        )
        return GuardConfig(**{**(base or {}), **given})
    except ValidationError as e:
        raise GuardFlagsError(
            f"invalid --{prefix}* settings\n{describe_validation_error(e, names)}"
        ) from e
    except ValueError as e:
        raise GuardFlagsError(f"invalid --{prefix}* settings: {e}") from e


def guard_fields(args: argparse.Namespace, prefix: str = "vlsae-") -> dict:
    """The guard settings the flags gave (unset flags left out; ``steer`` parsed)."""
    ns = vars(args)
    attr = prefix.replace("-", "_")
    given = {f: ns.get(f"{attr}{f}") for f in FIELDS}
    given = {f: v for f, v in given.items() if v is not None}
    if "steer" in given:
        given["steer"] = parse_steer(given["steer"], f"--{prefix}steer")
    return given


def parse_steer(text: str, flag: str) -> dict[int, float]:
    """``'{"12": 1.5}'`` -> ``{12: 1.5}``; anything else says that a JSON object is expected."""
    expected = f"{flag}: expected a JSON object of concept index -> value, e.g. '{{\"12\": 1.5}}'"
    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError(f"{expected}, found {text!r} (not JSON)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{expected}, found {text!r}")
    steer = {}
    for key, value in data.items():
        if (
            not key.strip().isdigit()
            or isinstance(value, bool)
            or not isinstance(value, int | float)
        ):
            raise ValueError(f"{expected}, found the entry {key!r}: {value!r}")
        steer[int(key)] = float(value)
    return steer


def check_guard_flags(
    parser: argparse.ArgumentParser, args: argparse.Namespace, prefix: str = "vlsae-"
) -> GuardConfig | None:
    """For a script's ``main``: the settings, or argparse's own usage error (exit status 2, the
    message naming the flags) before any model is loaded."""
    try:
        return settings_from_args(args, prefix)
    except GuardFlagsError as e:
        parser.error(str(e))


def guard_from_args(model, args: argparse.Namespace, prefix: str = "vlsae-"):
    """Guard ``model`` as the flags say; returns the handle, or None when not guarding."""
    config = settings_from_args(args, prefix)
    if config is None:
        return None
    from ..core.guard import guard

    return guard(model, vars(args)[f"{prefix.replace('-', '_')}guard"], config=config)
