"""Checkpoint commands: ``import-official`` (the paper's files) and ``info``."""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import Field, FilePath, field_validator

from ..core.checkpoint import (
    CONFIG_NAME,
    OFFICIAL_TOPK,
    import_official,
    load,
    read_config,
    resolve,
)
from ..core.sae_config import SAEConfig, Source
from ..validation import Settings
from .app import arg, field_arg, field_choices, subcommand, validated, validated_flags


class ImportOfficialArgs(Settings):
    """The files and k of ``import-official``; the source is validated by :class:`Source`."""

    sae: FilePath
    aux: FilePath | None = None
    out: Path
    topk: int = Field(default=OFFICIAL_TOPK, ge=1)  # as in the paper

    @field_validator("out")
    @classmethod
    def _out_is_a_directory(cls, out: Path) -> Path:
        if out.exists() and not out.is_dir():
            raise ValueError("exists and is not a directory")
        return out


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
    field_arg(
        ImportOfficialArgs,
        "out",
        "--out",
        required=True,
        metavar="DIR",
        help="checkpoint directory to write",
    ),
    field_arg(
        ImportOfficialArgs,
        "topk",
        "--topk",
        type=int,
        metavar="K",
        fill=True,
        help="active concepts per token, as in the paper",
    ),
    field_arg(
        Source,
        "model_id",
        "--model-id",
        help="the LLaVA model whose representations the SAE was trained on",
    ),
    field_arg(
        Source,
        "site",
        "--site",
        choices=field_choices(Source, "site"),
        unset="not recorded",
        help="where the representations were read",
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
    arg("--overwrite", action="store_true", help="replace what a non-empty --out holds"),
)
def import_official_command(args: argparse.Namespace) -> None:
    """Convert the checkpoints released with the VL-SAE paper into config.json + safetensors.

    The .pth/.pt files are read tensors-only (no pickled code runs) and the result is validated
    like any load before anything is written.
    """
    opts = validated_flags(ImportOfficialArgs, args)
    source = validated(
        Source,
        "source",
        across="--site/--layer/--point",
        model_id=args.model_id,
        site=args.site or ("layer" if args.layer is not None else None),
        layer=args.layer,
        point=args.point,
    )
    sae = import_official(
        opts.sae,
        opts.out,
        aux_file=opts.aux,
        k=opts.topk,
        source=source.model_dump(),
        overwrite=args.overwrite,
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
    layer = f"layer {src.layer}" + (f" ({src.point})" if src.point else "")
    where = {None: "site not recorded", "layer": layer}.get(src.site, src.site)
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
