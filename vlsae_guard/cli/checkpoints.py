"""Checkpoint commands: ``import-official`` (the paper's files), ``import-sae`` (files of other
SAE libraries) and ``info``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from pydantic import Field, FilePath, field_validator

from ..core.checkpoint import (
    CONFIG_NAME,
    OFFICIAL_TOPK,
    import_official,
    load,
    read_config,
    resolve,
)
from ..core.dictionary_learning import import_dictionary_learning
from ..core.sae_config import SAEConfig, Source
from ..validation import Settings
from .app import Arg, arg, field_arg, field_choices, subcommand, validated, validated_flags

ImportFormat = Literal["dictionary_learning"]
IMPORTERS = {"dictionary_learning": import_dictionary_learning}


class ImportArgs(Settings):
    """What every import writes: a checkpoint directory, ``--out``."""

    out: Path

    @field_validator("out")
    @classmethod
    def _out_is_a_directory(cls, out: Path) -> Path:
        if out.exists() and not out.is_dir():
            raise ValueError("exists and is not a directory")
        return out


class ImportOfficialArgs(ImportArgs):
    """The files and k of ``import-official``; the source is validated by :class:`Source`."""

    sae: FilePath
    aux: FilePath | None = None
    topk: int = Field(default=OFFICIAL_TOPK, ge=1)  # as in the paper


class ImportSAEArgs(ImportArgs):
    """The file and format of ``import-sae``; k and the rest come from the file."""

    format: ImportFormat
    ckpt: FilePath


def source_args(model_help: str) -> tuple[Arg, ...]:
    """--model-id, --site, --layer, --point: where the SAE's training states were read."""
    return (
        field_arg(Source, "model_id", "--model-id", help=model_help),
        field_arg(
            Source,
            "site",
            "--site",
            choices=field_choices(Source, "site"),
            unset="not recorded",
            help="where the representations were read (vision_tower: the vision encoder's "
            "--layer output)",
        ),
        field_arg(Source, "layer", "--layer", type=int, help="layer index (implies --site layer)"),
        field_arg(
            Source,
            "point",
            "--point",
            choices=field_choices(Source, "point"),
            unset="not recorded",
            help="--layer: read at that layer's input or output (the paper's collection: input)",
        ),
    )


def source_flags(args: argparse.Namespace) -> dict:
    """The :class:`Source` the flags of :func:`source_args` describe, validated, as a dict."""
    return validated(
        Source,
        "source",
        across="--site/--layer/--point",
        model_id=args.model_id,
        site=args.site or ("layer" if args.layer is not None else None),
        layer=args.layer,
        point=args.point,
    ).model_dump()


OUT = field_arg(
    ImportArgs, "out", "--out", required=True, metavar="DIR", help="checkpoint directory to write"
)
OVERWRITE = arg("--overwrite", action="store_true", help="replace what a non-empty --out holds")


@subcommand(
    "import-official",
    "convert the paper's .pth (+ auxiliary .pt) into a checkpoint directory",
    field_arg(
        ImportOfficialArgs,
        "sae",
        "--sae",
        required=True,
        metavar="FILE.pth",
        help="official SAE state dict",
    ),
    field_arg(
        ImportOfficialArgs,
        "aux",
        "--aux",
        metavar="FILE.pt",
        help="official auxiliary autoencoder state dict",
    ),
    OUT,
    field_arg(
        ImportOfficialArgs,
        "topk",
        "--topk",
        type=int,
        metavar="K",
        fill=True,
        help="active concepts per token, as in the paper",
    ),
    *source_args("the LLaVA model whose representations the SAE was trained on"),
    OVERWRITE,
)
def import_official_command(args: argparse.Namespace) -> None:
    """Convert the checkpoints released with the VL-SAE paper into config.json + safetensors.

    The .pth/.pt files are read tensors-only (no pickled code runs) and the result is validated
    like any load before anything is written.
    """
    opts = validated_flags(ImportOfficialArgs, args)
    sae = import_official(
        opts.sae,
        opts.out,
        aux_file=opts.aux,
        k=opts.topk,
        source=source_flags(args),
        overwrite=args.overwrite,
    )
    print(summary(sae.config, opts.out))


@subcommand(
    "import-sae",
    "convert an SAE trained by another library (dictionary_learning) into a checkpoint directory",
    field_arg(
        ImportSAEArgs,
        "format",
        "--format",
        required=True,
        choices=field_choices(ImportSAEArgs, "format"),
        help="the library that wrote --ckpt",
    ),
    field_arg(
        ImportSAEArgs,
        "ckpt",
        "--ckpt",
        required=True,
        metavar="FILE",
        help="its checkpoint (dictionary_learning: ae.pt, BatchTopK or Matryoshka BatchTopK)",
    ),
    OUT,
    *source_args(
        "the model whose representations the SAE was trained on (dictionary_learning: "
        "config.json's lm_name beside --ckpt, if there)"
    ),
    OVERWRITE,
)
def import_sae_command(args: argparse.Namespace) -> None:
    """Convert another library's SAE checkpoint into config.json + safetensors.

    The architecture is told from the file's tensor names; the file is read tensors-only (no
    pickled code runs) and every tensor is validated before anything is written. A vision-tower
    SAE is recorded with --site vision_tower --layer L.
    """
    opts = validated_flags(ImportSAEArgs, args)
    importer = IMPORTERS[opts.format]
    sae = importer(opts.ckpt, opts.out, source=source_flags(args), overwrite=args.overwrite)
    threshold = getattr(sae, "threshold", None)
    print(summary(sae.config, opts.out, None if threshold is None else float(threshold)))


def summary(config: SAEConfig, directory: Path, threshold: float | None = None) -> str:
    """A few aligned lines: what was written and where (``threshold``: BatchTopK's, if known)."""
    rows = {
        "architecture": config.architecture,
        "d_in": config.d_in,
        "n_concepts": config.n_concepts,
        "k": config.k,
    }
    if config.groups is not None:
        rows["groups"] = ", ".join(map(str, config.groups)) + " (nested)"
    if threshold is not None:
        rows["threshold"] = f"{threshold:.6g}" + (
            " (never learned: keeps every positive activation)" if threshold < 0 else ""
        )
    if config.aux is not None:
        a = config.aux
        rows["aux"] = f"vision {a.d_vision} / text {a.d_text} -> {a.d_proj}"
    src = config.source
    layer = f"layer {src.layer}" + (f" ({src.point})" if src.point else "")
    where = {
        None: "site not recorded",
        "layer": layer,
        "vision_tower": f"vision tower layer {src.layer}",
    }.get(src.site, src.site)
    rows["source"] = f"{src.model_id or 'model not recorded'}, {where}"
    rows["out"] = directory.resolve()
    return "\n".join(f"{key:<13}{value}" for key, value in rows.items())


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
