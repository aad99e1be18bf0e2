"""The ``vlsae-guard`` command line.

Each subcommand is one function decorated with :func:`subcommand`, which declares its
arguments next to it; :func:`main` builds the parser from that registry and dispatches.
Expected failures (a broken checkpoint, invalid arguments, an unwritable path) print a message
to stderr and exit with status 2, without a traceback: tracebacks are reserved for bugs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, FilePath, ValidationError, field_validator

from . import __version__
from .checkpoint import (
    CONFIG_NAME,
    OFFICIAL_TOPK,
    CheckpointError,
    describe_validation_error,
    import_official,
    load,
    read_config,
    resolve,
)
from .config import SAEConfig, Source

PROG = "vlsae-guard"
EXIT_ERROR = 2

Handler = Callable[[argparse.Namespace], None]
Arg = tuple[tuple[str, ...], dict[str, Any]]
M = TypeVar("M", bound=BaseModel)


class UsageError(Exception):
    """Arguments argparse accepted but the models reject; the message names the flags."""


_SUBCOMMANDS: dict[str, tuple[str, tuple[Arg, ...], Handler]] = {}


def arg(*flags: str, **kwargs: Any) -> Arg:
    """One ``add_argument`` call, kept until the parser is built."""
    return flags, kwargs


def subcommand(name: str, help: str, *args: Arg) -> Callable[[Handler], Handler]:
    """Register ``handler(args)`` as ``vlsae-guard NAME``; its docstring is the description."""

    def register(handler: Handler) -> Handler:
        _SUBCOMMANDS[name] = (help, args, handler)
        return handler

    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Reduce object hallucination in LLaVA models with a VL-SAE."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help, args, handler) in _SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help, description=handler.__doc__)
        for flags, kwargs in args:
            sub.add_argument(*flags, **kwargs)
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
    except (CheckpointError, UsageError, OSError) as e:
        return _fail(args.command, str(e))
    return 0


def _fail(command: str, message: str) -> int:
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def validated(model: type[M], what: str, *, across: str = "", **values: Any) -> M:
    """Build ``model`` from flags named like its fields (``--model-id`` for ``model_id``).

    Validation errors come back as a :class:`UsageError` naming the flags, not the fields;
    ``across`` names the flags a whole-model check is about.
    """
    try:
        return model(**values)
    except ValidationError as e:
        names = {f: "--" + f.replace("_", "-") for f in values}
        names[""] = across or "/".join(names.values())
        raise UsageError(f"invalid {what}\n{describe_validation_error(e, names)}") from e


def _field_choices(model: type[BaseModel], field: str) -> tuple[str, ...]:
    """The values a (possibly optional) Literal field allows, so argparse's help lists them."""

    def values(annotation: Any) -> tuple[str, ...]:
        if get_origin(annotation) is Literal:
            return get_args(annotation)
        return tuple(v for a in get_args(annotation) for v in values(a))

    return values(model.model_fields[field].annotation)


# --- import-official ---------------------------------------------------------------------------


class ImportOfficialArgs(BaseModel):
    """The files and k of ``import-official``; the source is validated by :class:`Source`."""

    model_config = ConfigDict(extra="forbid")

    sae: FilePath
    aux: FilePath | None = None
    out: Path
    topk: int = Field(ge=1)

    @field_validator("out")
    @classmethod
    def _out_is_a_directory(cls, out: Path) -> Path:
        if out.exists() and not out.is_dir():
            raise ValueError("exists and is not a directory")
        return out


@subcommand(
    "import-official",
    "convert the paper's .pth (+ auxiliary .pt) into a checkpoint directory",
    arg("--sae", required=True, metavar="FILE.pth", help="official SAE state dict"),
    arg("--aux", metavar="FILE.pt", help="official auxiliary autoencoder state dict"),
    arg("--out", required=True, metavar="DIR", help="checkpoint directory to write"),
    arg(
        "--topk",
        type=int,
        default=OFFICIAL_TOPK,
        metavar="K",
        help=f"active concepts per token (default: {OFFICIAL_TOPK}, as in the paper)",
    ),
    arg("--model-id", help="the LLaVA model whose representations the SAE was trained on"),
    arg(
        "--site",
        choices=_field_choices(Source, "site"),
        help="where the representations were read (default: not recorded)",
    ),
    arg("--layer", type=int, help="layer index (implies --site layer)"),
)
def import_official_command(args: argparse.Namespace) -> None:
    """Convert the checkpoints released with the VL-SAE paper into config.json + safetensors.

    The .pth/.pt files are read tensors-only (no pickled code runs) and the result is validated
    like any load before anything is written.
    """
    opts = validated(
        ImportOfficialArgs, "arguments", sae=args.sae, aux=args.aux, out=args.out, topk=args.topk
    )
    source = validated(
        Source,
        "source",
        across="--site/--layer",
        model_id=args.model_id,
        site=args.site or ("layer" if args.layer is not None else None),
        layer=args.layer,
    )
    sae = import_official(
        opts.sae, opts.out, aux_file=opts.aux, k=opts.topk, source=source.model_dump()
    )
    print(summary(sae.config, opts.out))


def summary(config: SAEConfig, directory: Path) -> str:
    """A few aligned lines: what was written and where."""
    rows = {
        "architecture": config.architecture,
        "d_in": config.d_in,
        "n_concepts": config.n_concepts,
        "k": config.k,
    }
    if config.aux is not None:
        a = config.aux
        rows["aux"] = f"vision {a.d_vision} / text {a.d_text} -> {a.d_proj}"
    src = config.source
    where = {None: "site not recorded", "layer": f"layer {src.layer}"}.get(src.site, src.site)
    rows["source"] = f"{src.model_id or 'model not recorded'}, {where}"
    rows["out"] = directory.resolve()
    return "\n".join(f"{key:<13}{value}" for key, value in rows.items())


# --- info --------------------------------------------------------------------------------------


@subcommand(
    "info",
    "print a checkpoint's config as JSON",
    arg("checkpoint", metavar="DIR", help="checkpoint directory or Hub repo id (owner/name)"),
    arg("--check", action="store_true", help="also load and validate the weights"),
)
def info_command(args: argparse.Namespace) -> None:
    """Print config.json, validated; --check also loads the weights (names, shapes, NaNs)."""
    directory = resolve(args.checkpoint)
    config = load(directory).config if args.check else read_config(directory / CONFIG_NAME)
    print(config.model_dump_json(indent=2))


# --- demo --------------------------------------------------------------------------------------


@subcommand(
    "demo",
    "A/B run of the guard on a tiny LLaVA built here (offline, about a minute on a CPU)",
    arg("--images", type=int, default=24, help="generated images (3 questions each)"),
    arg("--seed", type=int, default=0),
    arg("--alpha", type=float, default=0.5),
    arg("--method", choices=["replace", "edit"], default="replace"),
    arg("--batch-size", type=int, default=8),
    arg("--out", type=Path, default=None, help="write results.json and answers.jsonl here"),
)
def demo_command(args: argparse.Namespace) -> None:
    """Build a tiny LLaVA, a VL-SAE fitted to it and POPE-style questions; answer with the
    guard off and on; print the POPE metrics of both arms and McNemar's p."""
    from . import demo

    result = demo.run(
        n_images=args.images,
        seed=args.seed,
        alpha=args.alpha,
        method=args.method,
        batch_size=args.batch_size,
        out=args.out,
    )
    sae = result["settings"]["sae"]
    print(
        f"tiny LLaVA + VL-SAE ({sae['n_concepts']} concepts, k={sae['k']}, "
        f"{sae['shared']} shared; explained variance vision "
        f"{sae['explained_variance_vision']:.2f}, text {sae['explained_variance_text']:.2f})"
    )
    print(f"guard: {args.method}, alpha={args.alpha}\n")
    print(demo.format_table(result))
    print("\n" + demo.DISCLAIMER)
    if args.out is not None:
        print(f"wrote {args.out / 'results.json'} and {args.out / 'answers.jsonl'}")


if __name__ == "__main__":
    sys.exit(main())
