"""Pipeline commands: ``collect`` (activations into a store) and ``train`` (a VL-SAE on it).

Both read a YAML/JSON settings file that flags override (:func:`.app.settings`), so their flags
default to None and the help shows the config model's defaults.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ..pipeline.collect import CollectConfig
from ..pipeline.pairs import CocoData, HFData, JsonlData
from ..pipeline.train import AlignConfig, TrainConfig
from .app import Arg, UsageError, arg, field_arg, field_choices, settings, subcommand
from .checkpoints import summary

_CONFIG = arg("--config", type=Path, metavar="FILE", help="YAML/JSON settings; flags override them")
_NO_PROGRESS = arg("--no-progress", dest="progress", action="store_const", const=False)

# The data sources; the first flag of each chooses it (and replaces the file's data section).
_DATA_ARGS: dict[str, tuple[Arg, ...]] = {
    "coco": (
        field_arg(
            CocoData,
            "annotations",
            "--coco-annotations",
            type=Path,
            metavar="FILE",
            help="COCO captions_*.json",
        ),
        field_arg(
            CocoData, "images", "--coco-images", type=Path, metavar="DIR", help="its image folder"
        ),
        field_arg(
            CocoData,
            "captions",
            "--coco-captions",
            choices=field_choices(CocoData, "captions"),
            help="captions per image",
        ),
    ),
    "jsonl": (
        field_arg(
            JsonlData,
            "path",
            "--jsonl",
            type=Path,
            metavar="FILE",
            help='lines {"image": path, "caption": text}',
        ),
        field_arg(
            JsonlData,
            "image_root",
            "--image-root",
            type=Path,
            metavar="DIR",
            unset="the JSONL file's folder",
            help="base of relative JSONL image paths",
        ),
    ),
    "hf": (
        field_arg(
            HFData,
            "dataset",
            "--hf-dataset",
            metavar="NAME",
            help="Hugging Face dataset (Hub name or saved folder)",
        ),
        field_arg(HFData, "name", "--hf-name", metavar="CONFIG", help="dataset configuration name"),
        field_arg(HFData, "split", "--hf-split", metavar="SPLIT", help="split"),
        field_arg(HFData, "image_column", "--image-column", help="image column"),
        field_arg(HFData, "text_column", "--text-column", help="caption column"),
    ),
}


def _value(args: argparse.Namespace, a: Arg) -> Any:
    return getattr(args, a.kwargs.get("dest") or a.flags[0][2:].replace("-", "_"))


def _config_flags(
    args: argparse.Namespace, declared: tuple[Arg, ...], prefix: str = ""
) -> dict[str, tuple[str, Any]]:
    """``{prefix + field: (flag, value)}`` for flags declared with :func:`.app.field_arg`."""
    return {f"{prefix}{a.field[1]}": (a.flags[0], _value(args, a)) for a in declared if a.field}


def _same_name_flags(
    args: argparse.Namespace, model: type[BaseModel], exclude: set[str]
) -> dict[str, tuple[str, Any]]:
    """``{field: ("--field-name", value)}`` for the fields whose flag has the field's name."""
    return {
        f: (f"--{f.replace('_', '-')}", getattr(args, f))
        for f in model.model_fields
        if f not in exclude
    }


def _log_to_stderr() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


def _collect(name: str, *flags: str, **kwargs: Any) -> Arg:
    return field_arg(CollectConfig, name, *flags, **kwargs)


@subcommand(
    "collect",
    "collect paired vision/text activations of a LLaVA model into a sharded store",
    _CONFIG,
    _collect(
        "model",
        "--model",
        help="LLaVA checkpoint folder or Hub id (transformers or original llava)",
    ),
    _collect("out", "--out", type=Path, metavar="STORE", help="store folder (a rerun resumes it)"),
    *(a for source in _DATA_ARGS.values() for a in source),
    _collect("site", "--site", metavar="SITE", help="projector or layer:L"),
    _collect(
        "pooling",
        "--pooling",
        choices=field_choices(CollectConfig, "pooling"),
        help="rows per token, or their means",
    ),
    _collect(
        "tokens_per_image",
        "--tokens-per-image",
        type=int,
        metavar="K",
        help="random K image tokens per image",
    ),
    _collect("batch_size", "--batch-size", type=int, help="pairs per forward pass"),
    _collect(
        "pairs_per_shard",
        "--pairs-per-shard",
        type=int,
        unset="by pooling",
        help="pairs per shard file",
    ),
    _collect("limit", "--limit", type=int, metavar="N", help="only the first N pairs"),
    _collect("dtype", "--dtype", choices=field_choices(CollectConfig, "dtype")),
    _collect("device", "--device", help="auto (the GPU of this rank if any), cpu, cuda:1, ..."),
    _collect("seed", "--seed", type=int),
    _collect("workers", "--workers", type=int, help="image-decoding threads"),
    _collect("prompt", "--prompt", help="layer site: template with <image> and {caption}"),
    _collect("conv_mode", "--conv-mode", help="original llava: conversation template"),
    _NO_PROGRESS,
)
def collect_command(args: argparse.Namespace) -> None:
    """Run image-caption pairs through a LLaVA model up to the site, in batches, stopping there,
    and write the rows to safetensors shards with a manifest. Killed, it resumes where it was
    when run again with the same settings. Multi-GPU: torchrun --nproc-per-node N -m
    vlsae_guard.cli collect ..."""
    from ..pipeline.collect import collect
    from ..pipeline.pairs import SourceError
    from ..pipeline.store import StoreError

    flags = _same_name_flags(args, CollectConfig, exclude={"data", "hash_model"})
    # A source given by flags replaces the file's whole data section (formats differ in fields).
    given = [fmt for fmt, source in _DATA_ARGS.items() if _value(args, source[0])]
    if len(given) > 1:
        raise UsageError("give one data source: --coco-annotations, --jsonl or --hf-dataset")
    for fmt in given:
        flags["data.format"] = (_DATA_ARGS[fmt][0].flags[0], fmt)
        flags |= _config_flags(args, _DATA_ARGS[fmt], "data.")
    config = settings(CollectConfig, args.config, flags, replace=["data"] if given else [])
    _log_to_stderr()
    try:
        result = collect(config)
    except (SourceError, StoreError, ValueError) as e:
        raise UsageError(str(e)) from e
    m = result.manifest
    if m is None:  # ranks other than 0 print nothing
        return
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(m.counts.skipped_by_reason.items()))
    print(
        f"{'complete' if m.complete else 'INCOMPLETE'}: {m.counts.kept} pairs kept, "
        f"{m.counts.skipped} skipped{f' ({reasons})' if reasons else ''}; "
        f"{m.counts.vision_rows} vision rows x {m.dims['vision']}, "
        f"{m.counts.text_rows} text rows x {m.dims['text']} ({m.dtype}), "
        f"{len(m.shards)} shards in {config.out}"
    )
    print(
        f"this run: {result.pairs} pairs in {result.seconds:.1f} s "
        f"({result.pairs_per_second:.1f} pairs/s on rank 0)"
    )


def _train(name: str, *flags: str, **kwargs: Any) -> Arg:
    return field_arg(TrainConfig, name, *flags, **kwargs)


# Stage 1 (the alignment autoencoder): fields of TrainConfig.align.
_ALIGN_ARGS = (
    field_arg(
        AlignConfig,
        "d_proj",
        "--d-proj",
        type=int,
        unset="the text width",
        help="stage 1: projection width",
    ),
    field_arg(AlignConfig, "epochs", "--align-epochs", type=int, help="stage 1 epochs"),
    field_arg(AlignConfig, "lr", "--align-lr", type=float, help="stage 1 AdamW learning rate"),
    field_arg(
        AlignConfig, "batch_size", "--align-batch-size", type=int, help="stage 1 pairs per step"
    ),
    field_arg(
        AlignConfig, "temperature", "--temperature", type=float, help="stage 1 InfoNCE temperature"
    ),
)


@subcommand(
    "train",
    "train a VL-SAE (optionally with the auxiliary alignment AE) or a vision-only SAE on a store",
    _CONFIG,
    _train(
        "store",
        "--store",
        type=Path,
        metavar="STORE",
        help="store written by `vlsae-guard collect`",
    ),
    _train("out", "--out", type=Path, metavar="DIR", help="checkpoint folder (a rerun resumes it)"),
    _train(
        "architecture",
        "--architecture",
        "--arch",
        choices=field_choices(TrainConfig, "architecture"),
        help="batchtopk, matryoshka: vision rows only",
    ),
    _train("n_concepts", "--n-concepts", type=int, unset="expansion x d_in", help="concepts"),
    _train("expansion", "--expansion", type=int, help="concepts per input dimension"),
    _train("k", "--k", type=int, help="active concepts per row"),
    _train("epochs", "--epochs", type=int, help="SAE epochs"),
    _train("batch_size", "--batch-size", type=int, help="rows per modality per step"),
    _train("lr", "--lr", type=float, help="Adam learning rate"),
    _train("weight_decay", "--weight-decay", type=float, help="Adam weight decay"),
    _train("warmup", "--warmup", type=float, help="share of steps with linear warm-up"),
    _train("val_fraction", "--val-fraction", type=float, help="held-out pairs"),
    _train("patience", "--patience", type=int, help="epochs without improvement before stopping"),
    _train("aux_k", "--aux-k", type=int, unset="2k", help="auxiliary-k dead concepts; 0: off"),
    _train(
        "dead_after",
        "--dead-after",
        type=int,
        help="rows without firing that make a concept dead",
    ),
    _train(
        "shared_threshold", "--shared-threshold", type=float, help="min firing share per modality"
    ),
    _train("init", "--init", choices=field_choices(TrainConfig, "init")),
    _train("window", "--window", type=int, help="shards loaded and shuffled together"),
    _train(
        "threshold_beta",
        "--threshold-beta",
        type=float,
        help="batchtopk/matryoshka: weight of the old threshold in its running mean",
    ),
    _train(
        "threshold_start",
        "--threshold-start",
        type=int,
        metavar="STEPS",
        help="batchtopk/matryoshka: steps before the threshold is updated",
    ),
    _train(
        "group_fractions",
        "--group-fractions",
        type=float,
        nargs="+",
        metavar="F",
        help="matryoshka: the nested groups' shares of the concepts (sum 1)",
    ),
    arg("--align", action="store_const", const=True, help="run stage 1 (alignment AE) first"),
    *_ALIGN_ARGS,
    _train("seed", "--seed", type=int),
    _train("device", "--device", help="auto, cpu, cuda:0, ..."),
    _train(
        "amp", "--amp", choices=field_choices(TrainConfig, "amp"), help="mixed precision on CUDA"
    ),
    _train(
        "checkpoint_every",
        "--checkpoint-every",
        type=int,
        metavar="STEPS",
        help="resume points within epochs",
    ),
    _NO_PROGRESS,
)
def train_command(args: argparse.Namespace) -> None:
    """Train on a store: stage 1 (optional) aligns the modalities with an auxiliary AE, stage 2
    trains the SAE with a held-out split, best-validation checkpointing and early stopping; the
    shared-concept set (SAEs of both modalities) is computed at the end and stored in the
    checkpoint's config. --arch batchtopk|matryoshka train on the vision rows only and learn an
    inference threshold. Rerun the same command to resume. Multi-GPU: torchrun --nproc-per-node
    N -m vlsae_guard.cli train ..."""
    from ..pipeline.store import StoreError
    from ..pipeline.train import TrainError, train

    flags = _same_name_flags(args, TrainConfig, exclude={"align", "aux_k_coef"})
    flags["align"] = ("--align", {} if args.align else None)
    flags |= _config_flags(args, _ALIGN_ARGS, "align.")
    config = settings(TrainConfig, args.config, flags)
    _log_to_stderr()
    try:
        result = train(config)
    except (StoreError, TrainError) as e:
        raise UsageError(str(e)) from e
    if not result.is_main:
        return
    config, modalities = result.sae.config, result.sae.modalities
    stats = config.stats
    print(summary(config, result.out))
    variance = ", ".join(f"{m} {stats[f'explained_variance_{m}']:.3f}" for m in modalities)
    l0 = "/".join(f"{stats[f'l0_{m}']:.1f}" for m in modalities)
    overlap = stats.get("cross_modal_overlap")
    print(
        f"best epoch   {int(stats['epoch'])}: explained variance {variance}; L0 {l0}; dead "
        f"{stats['dead_fraction']:.1%}"
        + ("" if overlap is None else f"; cross-modal overlap {overlap:.3f}")
    )
    if config.shared_concepts is not None:
        print(f"shared       {len(config.shared_concepts)} concepts")
    if "threshold" in stats:
        print(f"threshold    {stats['threshold']:.4g} (inference keeps activations above it)")
