"""The benchmark scripts' flags: argparse in, a validated run config out.

Only the entry points (``benchmarks/pope.py``, ``benchmarks/chair.py``) parse; the harness takes
a :class:`~vlsae_guard.harness.config.PopeRunConfig` or
:class:`~vlsae_guard.harness.config.ChairRunConfig`. Every flag's default is read from its config
field, so the two cannot drift; the guard flags are :mod:`.guard_flags`' as everywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ValidationError

from ..backends import UnsupportedModelError
from ..core.checkpoint import CheckpointError
from ..core.guard import GuardError
from ..harness import generation
from ..harness.common import BenchmarkError
from ..harness.config import (
    CHAIR_SPLITS,
    DTYPES,
    PRESETS,
    ChairRunConfig,
    PopeRunConfig,
    RunConfig,
)
from ..harness.generation import BACKENDS, PROMPT_FORMATS
from ..lab.demo import DemoConfig
from ..methods import MODES, MethodError
from ..scoring import chair, pope
from ..scoring.files import DataError
from .guard_flags import (
    GuardFlagsError,
    add_guard_flags,
    guard_config,
    guard_fields,
    settings_from_args,
)
from .method_flags import ab_from_args, add_method_flags
from .method_flags import settings_from_args as method_settings_from_args

# argparse destinations that are not named as their field
DESTS = {"vlsae_guard": "sae"}
_UNSET = object()


class RunParser(argparse.ArgumentParser):
    """Records which flags the command line gave (``args.given_flags``: their destinations), so
    that a preset fills in exactly the others."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        dests = {a.dest for a in self._actions if a.default is not argparse.SUPPRESS}
        probe, _ = super().parse_known_args(
            args, argparse.Namespace(**dict.fromkeys(dests, _UNSET))
        )
        parsed.given_flags = frozenset(d for d, v in vars(probe).items() if v is not _UNSET)
        return parsed, extras


def default(config: type[BaseModel], field: str):
    """The field's default (None for a required field: the flag then has none either)."""
    info = config.model_fields[field]
    return None if info.is_required() else info.get_default(call_default_factory=True)


def _adder(group, config: type[BaseModel]):
    """``group.add_argument`` with the default of the field the flag sets."""

    def add(name: str, **kwargs) -> None:
        field = DESTS.get(kwargs.get("dest", ""), name[2:].replace("-", "_"))
        group.add_argument(name, default=default(config, field), **kwargs)

    return add


def add_run_flags(parser: argparse.ArgumentParser, config: type[RunConfig]) -> None:
    """Model, arms, data, batching, decoding and output flags; the guard flags as everywhere."""
    add = _adder(parser.add_argument_group("model"), config)
    add(
        "--model",
        help="model directory or Hub id (e.g. llava-hf/llava-1.5-7b-hf); for --backend openai "
        "the served model name (default: the server's only model; hashed when it is a directory)",
    )
    add(
        "--backend",
        choices=BACKENDS,
        help="hf: transformers; llava: the original llava package; vllm: an offline vLLM engine "
        "serving both arms; openai: a running `vlsae-guard serve` at --base-url",
    )
    add("--base-url", help="--backend openai: the server, e.g. http://host:8000/v1")
    add(
        "--engine-args",
        type=json.loads,
        metavar="JSON",
        help="--backend vllm: vllm.LLM keyword arguments, e.g. '{\"max_model_len\": 4096}'",
    )
    add("--dtype", choices=DTYPES, help="auto: float16 on a GPU, float32 on a CPU")
    add("--device", help="default: cuda if available, else cpu")
    add(
        "--prompt-format",
        choices=PROMPT_FORMATS,
        help="llava: LLaVA-1.5's vicuna_v1 eval conversation (default; not --backend openai); "
        "chat-template: the processor's chat template (hf, vllm; the only one for openai, "
        "where the server applies it)",
    )
    add = _adder(parser.add_argument_group("A/B"), config)
    add(
        "--sae",
        dest="vlsae_guard",
        metavar="DIR",
        help="VL-SAE checkpoint (directory or Hub id); same as --vlsae-guard",
    )
    add = _adder(parser.add_argument_group("run"), config)
    add("--images", type=Path, help="image directory (COCO val2014 for COCO/CHAIR)")
    add("--limit", type=int, help="first N items per split (smoke runs)")
    add("--batch-size", type=int)
    add("--max-new-tokens", type=int)
    add("--temperature", type=float, help="0: greedy (default)")
    add("--top-p", type=float)
    add("--top-k", type=int, help="sampling: generate()'s 50 when unset; 0: off")
    add(
        "--image-aspect",
        choices=["pad", "crop"],
        help="hf/llava: pad images to a square (LLaVA-1.5) or centre-crop them (CLIP); unset: as "
        "the checkpoint's processor does",
    )
    add(
        "--preset",
        choices=list(PRESETS),
        help="official: the VL-SAE release's protocol for paper mode (sampling T=1 without "
        "top-k, seed 55, its prompt and token limits, centre crop, float16, layer 30's output, "
        "its alpha/beta/c_alpha/c_beta, float16 SAE with its TopK ties; docs/guard.md); flags "
        "given as well win",
    )
    add("--seed", type=int)
    add("--bootstrap", type=int, help="paired bootstrap replicates for the 95%% intervals")
    add("--out", type=Path, help="output directory")
    add_method_flags(parser)
    add_guard_flags(parser)


def _parser(benchmark: str, config: type[RunConfig]):
    """The script's parser with the run flags; the group for the benchmark's own, and its
    :func:`_adder`."""
    p = RunParser(
        prog=f"benchmarks/{benchmark.lower()}.py",
        description=f"{benchmark} on a LLaVA model with and without the VL-SAE guard (A/B).",
    )
    add_run_flags(p, config)
    group = p.add_argument_group(benchmark)
    return p, group, _adder(group, config)


def pope_parser() -> argparse.ArgumentParser:
    p, group, add = _parser("POPE", PopeRunConfig)
    add(
        "--dataset",
        choices=list(pope.DATASETS),
        help="coco: current files; coco_llava: the older files LLaVA-1.5's numbers "
        "used; aokvqa; gqa",
    )
    add("--split", choices=[*pope.SPLITS, "all"])
    add(
        "--questions",
        nargs="+",
        metavar="FILE",
        help="question files (JSON lines or array) instead of --dataset/--split",
    )
    add(
        "--prompt",
        choices=list(pope.PROMPTS),
        help="llava: '{question}\\nAnswer the question using a single word or "
        "phrase.'; vcd: '{question} Please answer this question with one word.'",
    )
    add(
        "--strict",
        action="store_true",
        help="strict exact yes/no parser instead of LLaVA's (see docs)",
    )
    group.add_argument(
        "--demo",
        action="store_true",
        help="build a tiny LLaVA, a VL-SAE, images and questions here and run the A/B "
        "end to end (offline, CPU, about 10 s)",
    )
    return p


def chair_parser() -> argparse.ArgumentParser:
    p, _, add = _parser("CHAIR", ChairRunConfig)
    add(
        "--split",
        choices=CHAIR_SPLITS,
        help="chair500: the 500 COCO val2014 images of the standard LLaVA protocol",
    )
    add(
        "--image-ids",
        type=Path,
        metavar="FILE",
        help="COCO image ids, one per line, instead of --split",
    )
    add("--prompt", help=f"default: {chair.PROMPT!r}")
    add(
        "--coco-annotations",
        type=Path,
        metavar="DIR",
        help="build the ground truth from the COCO 2014 annotation files "
        "(cached) instead of the shipped table",
    )
    return p


def flag(field: str) -> str:
    """The flag that sets ``field``."""
    return "--sae" if field == "sae" else "--" + field.replace("_", "-")


def build(config: type[BaseModel], args: argparse.Namespace, **values):
    """``config`` from the flags that were given (and ``values``); an invalid combination is a
    :class:`BenchmarkError` naming the flags."""
    given = {DESTS.get(k, k): v for k, v in vars(args).items() if v is not None}
    if getattr(args, "preset", None) is not None and hasattr(args, "given_flags"):
        # a flag left at its default must not undo the preset's value
        named = {DESTS.get(d, d) for d in args.given_flags}
        given = {k: v for k, v in given.items() if k in named}
    given = {k: v for k, v in given.items() if k in config.model_fields}
    try:
        return config(**{**given, **values})
    except ValidationError as e:
        raise BenchmarkError("; ".join(_problem(err) for err in e.errors())) from e


def _problem(err: dict) -> str:
    """A check across flags says it in its own words; one flag's problem names the flag."""
    if err["type"] == "value_error":
        return str(err["ctx"]["error"])
    loc = err["loc"]
    if len(loc) > 1 and loc[0] == "guard":  # a preset's guard merged with the --vlsae-* flags
        loc = (f"vlsae_{loc[1]}",)
    where = flag(str(loc[0])) if loc else "flags"
    if err["type"] == "missing":
        return f"{where} is required"
    return f"{where}: {err['msg']} (found {err['input']!r})"


def run_values(args: argparse.Namespace) -> dict:
    """What the method and guard flags set: ``ab``, the guard settings (in the mode of an SAE
    method named by --method or --ab), the peers' settings."""
    ab = ab_from_args(args)
    named = [args.method] + (list(ab) if isinstance(ab, tuple) else [])
    modes = {MODES[m] for m in named if m in MODES}
    if len(modes) == 1 and getattr(args, "vlsae_mode", None) is None:
        args = argparse.Namespace(**{**vars(args), "vlsae_mode": modes.pop()})
    if getattr(args, "preset", None) is not None:  # the config lays these over the preset's
        guard = guard_fields(args) if args.vlsae_guard is not None else None
    else:
        guard = settings_from_args(args)
    return {"ab": ab, "guard": guard, "method_settings": method_settings_from_args(args)}


def pope_config(args: argparse.Namespace) -> PopeRunConfig:
    return build(PopeRunConfig, args, **run_values(args))


def chair_config(args: argparse.Namespace) -> ChairRunConfig:
    return build(ChairRunConfig, args, **run_values(args))


def demo_config(args: argparse.Namespace) -> DemoConfig:
    """``pope_parser()``'s flags for ``--demo``: output, seed, batching and the guard settings;
    model and data are the demo's own (``--sae``, ``--model`` and the like are not used).
    Without a ``--vlsae-*`` flag the guard is the demo's (cue masking); with one, the flags
    describe it as for any run (``--vlsae-alpha 0.5``: the projector guard)."""
    if not guard_fields(args):
        return build(DemoConfig, args)
    return build(DemoConfig, args, guard=guard_config(args))


# --- what the scripts do on an expected failure ----------------------------------------------


def fail(prog: str, error: Exception) -> int:
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2


EXPECTED_ERRORS: tuple[type[Exception], ...] = (
    DataError,
    BenchmarkError,
    CheckpointError,
    GuardError,
    GuardFlagsError,
    MethodError,
    UnsupportedModelError,
    generation.BackendUnavailable,
    generation.GenerationError,
    OSError,
)


def run_main(prog: str, body: Callable[[], int]) -> int:
    """Run a benchmark body; expected failures print one line and exit 2 (no traceback)."""
    try:
        return body()
    except EXPECTED_ERRORS as e:
        return fail(prog, e)


def report(table: str, results: dict, notes: str, out: Path) -> None:
    """What a benchmark script prints at the end: the table, its warnings (stderr), the notes."""
    print(table)
    for warning in results["warnings"]:
        print(f"WARNING: {warning}", file=sys.stderr)
    print(f"\n{notes}\nwrote {out}/results.json, results.md, results.png")
