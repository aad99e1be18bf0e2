"""The ``vlsae-guard`` command line.

Each subcommand is one function decorated with :func:`subcommand`, which declares its
arguments next to it; :func:`main` builds the parser from that registry and dispatches.
Expected failures (a broken checkpoint, invalid arguments, an unwritable path) print a message
to stderr and exit with status 2, without a traceback: tracebacks are reserved for bugs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    DirectoryPath,
    Field,
    FilePath,
    ValidationError,
    field_validator,
    model_validator,
)

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
from .harness.common import BenchmarkError
from .scoring.files import DataError

PROG = "vlsae-guard"
EXIT_ERROR = 2

Handler = Callable[[argparse.Namespace], None]
Arg = tuple[tuple[str, ...], dict[str, Any]]
M = TypeVar("M", bound=BaseModel)


class UsageError(Exception):
    """Arguments argparse accepted but the models reject; the message names the flags."""


_SUBCOMMANDS: dict[str, tuple[str, tuple[Arg, ...], Handler]] = {}
# Help of command groups ("score pope" registers subcommand pope of group score).
_GROUPS = {"score": "score answer/caption files that others produced (POPE, CHAIR)"}


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
    except (CheckpointError, UsageError, OSError, DataError, BenchmarkError) as e:
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
    "A/B POPE run of the guard on a tiny LLaVA built here (offline, under a minute on a CPU)",
    arg("--images", type=int, default=24, help="generated images (3 questions each)"),
    arg("--seed", type=int, default=0),
    arg("--alpha", type=float, default=0.5),
    arg("--method", choices=["replace", "edit"], default="replace"),
    arg("--batch-size", type=int, default=8),
    arg("--out", type=Path, default=Path("runs/demo"), help="output directory"),
)
def demo_command(args: argparse.Namespace) -> None:
    """Same as ``python benchmarks/pope.py --demo``: build a tiny LLaVA, a VL-SAE fitted to it,
    images and POPE questions; run the A/B harness; print both arms, deltas and McNemar's p."""
    from .harness import pope as harness

    bench = harness.parser().parse_args(
        ["--demo", "--out", str(args.out), "--seed", str(args.seed)]
        + ["--batch-size", str(args.batch_size)]
        + ["--vlsae-alpha", str(args.alpha), "--vlsae-method", args.method]
    )
    print(harness.run_demo(bench, n_images=args.images)[1])


# --- score -------------------------------------------------------------------------------------


@subcommand(
    "score pope",
    "score POPE answers (LLaVA's answer format) against question files",
    arg(
        "--questions",
        nargs="+",
        required=True,
        metavar="FILE",
        help="question files (JSON lines or array), or shipped names such as coco/random, "
        "coco_llava/adversarial, aokvqa/popular, gqa/random",
    ),
    arg(
        "--answers",
        nargs="+",
        required=True,
        metavar="FILE",
        help="answers (JSON lines with question_id and text): one file, or one per question file",
    ),
    arg("--strict", action="store_true", help="exact yes/no parser instead of LLaVA's"),
    arg(
        "--allow-missing",
        action="store_true",
        help="score questions without an answer as unanswered (wrong) instead of failing",
    ),
    arg(
        "--ignore-prompts",
        action="store_true",
        help="do not check that each answer's recorded prompt contains its question",
    ),
    arg("--out", type=Path, metavar="results.json", help="write the metrics as JSON"),
)
def score_pope_command(args: argparse.Namespace) -> None:
    """POPE metrics exactly as LLaVA's eval_pope.py computes them, in percent: accuracy,
    precision, recall, F1 (positive class yes), yes_ratio; with several question files also the
    mean F1 over them (LLaVA's reported number)."""
    from .scoring import pope, report

    result = pope.score_files(
        args.questions, args.answers, args.strict, args.allow_missing, not args.ignore_prompts
    )
    splits = result.get("splits") or {result["questions"][0]["name"]: result}
    rows = [
        report.Row(name, m, {"answers": v[m]}, {})
        for name, v in splits.items()
        for m in pope.METRICS
    ]
    if "mean_f1" in result:
        rows.append(report.Row("mean over splits", "f1", {"answers": result["mean_f1"]}, {}))
    print(report.text_table(rows))
    unanswered = sum(v["unanswered"] for v in splits.values())
    print(f"\nparser: {result['parser']}" + (f"; {unanswered} unanswered" if unanswered else ""))
    _write_json(args.out, result)


@subcommand(
    "score chair",
    "score CHAIR on image descriptions (COCO 2014 images)",
    arg(
        "--captions",
        required=True,
        type=Path,
        metavar="FILE",
        help="JSON lines (or array) with image_id and caption",
    ),
    arg(
        "--coco-annotations",
        type=Path,
        metavar="DIR",
        help="COCO 2014 annotation directory (instances_/captions_val2014.json, train2014 "
        "too if present) to build the ground truth from (cached); default: the shipped table",
    ),
    arg("--image-id-key", default="image_id"),
    arg("--caption-key", default="caption"),
    arg(
        "--details",
        type=Path,
        metavar="FILE.jsonl",
        help="also write every caption's mentions, hallucinations and ground truth",
    ),
    arg("--out", type=Path, metavar="results.json", help="write the metrics as JSON"),
)
def score_chair_command(args: argparse.Namespace) -> None:
    """CHAIR as the standard chair.py computes it: CHAIR_s, CHAIR_i, Recall in percent and Len
    (tokens per caption)."""
    from .scoring import chair, report

    result, scores = chair.score_file(
        args.captions, args.coco_annotations, args.image_id_key, args.caption_key
    )
    rows = [report.Row("", m, {"captions": result[m]}, {}) for m in chair.METRICS]
    print(report.text_table(rows))
    print(
        f"\n{result['n']} captions of {result['images']} images; ground truth: "
        f"{result['ground_truth']['kind']} ({result['ground_truth']['path']})"
    )
    if args.details:
        args.details.write_text("".join(json.dumps(s.to_json()) + "\n" for s in scores))
    _write_json(args.out, result)


def _write_json(path: Path | None, result: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


# --- collect / train ---------------------------------------------------------------------------


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


def _log_to_stderr() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


_DATA_FLAGS = {
    "coco": {"annotations": "--coco-annotations", "images": "--coco-images"},
    "jsonl": {"path": "--jsonl", "image_root": "--image-root"},
    "hf": {
        "dataset": "--hf-dataset",
        "name": "--hf-name",
        "split": "--hf-split",
        "image_column": "--image-column",
        "text_column": "--text-column",
    },
}


@subcommand(
    "collect",
    "collect paired vision/text activations of a LLaVA model into a sharded store",
    arg("--config", type=Path, metavar="FILE", help="YAML/JSON settings; flags override them"),
    arg("--model", help="LLaVA checkpoint folder or Hub id (transformers or original llava)"),
    arg("--out", type=Path, metavar="STORE", help="store folder (a rerun resumes it)"),
    arg("--coco-annotations", type=Path, metavar="FILE", help="COCO captions_*.json"),
    arg("--coco-images", type=Path, metavar="DIR", help="its image folder"),
    arg("--coco-captions", choices=["all", "first"], help="captions per image (default all)"),
    arg("--jsonl", type=Path, metavar="FILE", help='lines {"image": path, "caption": text}'),
    arg("--image-root", type=Path, metavar="DIR", help="base of relative JSONL image paths"),
    arg("--hf-dataset", metavar="NAME", help="Hugging Face dataset (Hub name or saved folder)"),
    arg("--hf-name", metavar="CONFIG", help="dataset configuration name"),
    arg("--hf-split", metavar="SPLIT", help="split (default train)"),
    arg("--image-column", help="image column (default image)"),
    arg("--text-column", help="caption column (default caption)"),
    arg("--site", metavar="SITE", help="projector (default) or layer:L"),
    arg("--pooling", choices=["token", "mean"], help="rows per token (default) or means"),
    arg("--tokens-per-image", type=int, metavar="K", help="random K image tokens per image"),
    arg("--batch-size", type=int, help="pairs per forward pass (default 16)"),
    arg("--pairs-per-shard", type=int, help="pairs per shard file (default by pooling)"),
    arg("--limit", type=int, metavar="N", help="only the first N pairs"),
    arg("--dtype", choices=["auto", "float32", "float16", "bfloat16"]),
    arg("--device", help="auto (default: GPU of this rank if any), cpu, cuda:1, ..."),
    arg("--seed", type=int),
    arg("--workers", type=int, help="image-decoding threads (default 4)"),
    arg("--prompt", help="layer site: template with <image> and {caption}"),
    arg("--conv-mode", help="original llava: conversation template (default llava_v1)"),
    arg("--no-progress", dest="progress", action="store_const", const=False),
)
def collect_command(args: argparse.Namespace) -> None:
    """Run image-caption pairs through a LLaVA model up to the site, in batches, stopping there,
    and write the rows to safetensors shards with a manifest. Killed, it resumes where it was
    when run again with the same settings. Multi-GPU: torchrun --nproc-per-node N -m
    vlsae_guard.cli collect ..."""
    from .collect import CollectConfig, collect
    from .data import SourceError
    from .store import StoreError

    flags = _same_name_flags(args, CollectConfig, exclude={"data", "hash_model"})
    # A source given by flags replaces the file's whole data section (formats differ in fields).
    given = [fmt for fmt, names in _DATA_FLAGS.items() if _flag_value(args, *names.values())]
    if len(given) > 1:
        raise UsageError("give one data source: --coco-annotations, --jsonl or --hf-dataset")
    for fmt in given:
        flags["data.format"] = (next(iter(_DATA_FLAGS[fmt].values())), fmt)
        for field, flag in _DATA_FLAGS[fmt].items():
            flags[f"data.{field}"] = (flag, _flag_value(args, flag))
        if fmt == "coco":
            flags["data.captions"] = ("--coco-captions", args.coco_captions)
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


def _same_name_flags(
    args: argparse.Namespace, model: type[BaseModel], exclude: set[str]
) -> dict[str, tuple[str, Any]]:
    """``{field: ("--field-name", value)}`` for the fields whose flag has the field's name."""
    return {
        f: (f"--{f.replace('_', '-')}", getattr(args, f))
        for f in model.model_fields
        if f not in exclude
    }


def _flag_value(args: argparse.Namespace, flag: str, *_: str) -> Any:
    """The value of ``--some-flag`` (the first one named)."""
    return getattr(args, flag[2:].replace("-", "_"))


@subcommand(
    "train",
    "train a VL-SAE (optionally with the auxiliary alignment AE) on a collected store",
    arg("--config", type=Path, metavar="FILE", help="YAML/JSON settings; flags override them"),
    arg("--store", type=Path, metavar="STORE", help="store written by `vlsae-guard collect`"),
    arg("--out", type=Path, metavar="DIR", help="checkpoint folder (a rerun resumes it)"),
    arg("--architecture", choices=["vl-sae", "sae-v", "sae-d"]),
    arg("--n-concepts", type=int, help="concepts (default expansion x d_in)"),
    arg("--expansion", type=int, help="concepts per input dimension (default 8)"),
    arg("--k", type=int, help="active concepts per row (default 128)"),
    arg("--epochs", type=int, help="default 10"),
    arg("--batch-size", type=int, help="rows per modality per step (default 512)"),
    arg("--lr", type=float, help="Adam learning rate (default 1e-4)"),
    arg("--weight-decay", type=float, help="Adam weight decay (default 0)"),
    arg("--warmup", type=float, help="share of steps with linear warm-up (default 0.2)"),
    arg("--val-fraction", type=float, help="held-out pairs (default 0.2)"),
    arg("--patience", type=int, help="epochs without improvement before stopping (10)"),
    arg("--aux-k", type=int, help="auxiliary-k dead concepts (default 2k; 0: off)"),
    arg("--dead-after", type=int, help="rows without firing that make a concept dead"),
    arg("--shared-threshold", type=float, help="min firing share per modality (1e-3)"),
    arg("--init", choices=["data", "random"]),
    arg("--window", type=int, help="shards loaded and shuffled together (default 4)"),
    arg("--align", action="store_const", const=True, help="run stage 1 (alignment AE) first"),
    arg("--d-proj", type=int, help="stage 1: projection width (default the text width)"),
    arg("--align-epochs", type=int, help="stage 1 epochs (default 50)"),
    arg("--align-lr", type=float, help="stage 1 AdamW learning rate (default 5e-5)"),
    arg("--align-batch-size", type=int, help="stage 1 pairs per step (default 2048)"),
    arg("--temperature", type=float, help="stage 1 InfoNCE temperature (default 0.07)"),
    arg("--seed", type=int),
    arg("--device", help="auto (default), cpu, cuda:0, ..."),
    arg("--amp", choices=["auto", "off", "bf16", "fp16"], help="mixed precision on CUDA"),
    arg("--checkpoint-every", type=int, metavar="STEPS", help="resume points within epochs"),
    arg("--no-progress", dest="progress", action="store_const", const=False),
)
def train_command(args: argparse.Namespace) -> None:
    """Train on a store: stage 1 (optional) aligns the modalities with an auxiliary AE, stage 2
    trains the SAE with a held-out split, best-validation checkpointing and early stopping; the
    shared-concept set is computed at the end and stored in the checkpoint's config. Rerun the
    same command to resume. Multi-GPU: torchrun --nproc-per-node N -m vlsae_guard.cli train ..."""
    from .store import StoreError
    from .train import TrainError, train
    from .train_config import TrainConfig

    flags = _same_name_flags(args, TrainConfig, exclude={"align", "aux_k_coef"})
    align = {
        "d_proj": "--d-proj",
        "epochs": "--align-epochs",
        "lr": "--align-lr",
        "batch_size": "--align-batch-size",
        "temperature": "--temperature",
    }
    flags["align"] = ("--align", {} if args.align else None)
    for field, flag in align.items():
        flags[f"align.{field}"] = (flag, _flag_value(args, flag))
    config = settings(TrainConfig, args.config, flags)
    _log_to_stderr()
    try:
        result = train(config)
    except (StoreError, TrainError) as e:
        raise UsageError(str(e)) from e
    if not result.is_main:
        return
    stats = result.sae.config.stats
    print(summary(result.sae.config, result.out))
    print(
        f"best epoch   {int(stats['epoch'])}: explained variance vision "
        f"{stats['explained_variance_vision']:.3f}, text {stats['explained_variance_text']:.3f}; "
        f"L0 {stats['l0_vision']:.1f}/{stats['l0_text']:.1f}; dead "
        f"{stats['dead_fraction']:.1%}; cross-modal overlap {stats['cross_modal_overlap']:.3f}"
    )
    print(f"shared       {len(result.sae.config.shared_concepts)} concepts")


# --- concepts: inspect / catalog / ms ----------------------------------------------------------


class InspectArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: FilePath | None = None
    text: str | None = None
    top: int = Field(ge=1)
    catalog: FilePath | None = None

    @model_validator(mode="after")
    def _something_to_inspect(self) -> InspectArgs:
        if self.image is None and self.text is None:
            raise ValueError("give --image FILE, --text TEXT or both")
        return self


class CatalogArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    store: DirectoryPath
    out: Path
    top_n: int = Field(ge=1)
    label_words: int = Field(ge=1)
    label_docs: int = Field(ge=1)
    image_root: DirectoryPath | None = None


class MSArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    store: DirectoryPath
    embeddings: FilePath
    out: Path
    bins: int = Field(ge=1)


_POOLING = arg(
    "--pooling",
    choices=["mean", "max"],
    default="mean",
    help="an image's activation of a concept: mean (default) or max over its tokens",
)


@contextmanager
def _concepts_usage() -> Iterator[None]:
    """The expected failures of the concept commands become usage errors (no traceback)."""
    from .concepts import ConceptsError
    from .store import StoreError

    try:
        yield
    except (ConceptsError, StoreError) as e:
        raise UsageError(str(e)) from e


@subcommand(
    "inspect",
    "top concepts of an image or a text, with labels and what the guard keeps or removes",
    arg("--sae", required=True, metavar="DIR", help="VL-SAE checkpoint directory or Hub id"),
    arg("--model", required=True, help="LLaVA checkpoint folder or Hub id"),
    arg("--image", type=Path, metavar="FILE", help="image to inspect"),
    arg("--text", metavar="TEXT", help="text to inspect (with --image: the prompt)"),
    arg("--top", type=int, default=10, help="concepts listed (default 10)"),
    _POOLING,
    arg("--catalog", type=Path, metavar="catalog.json", help="labels from `vlsae-guard catalog`"),
    arg("--method", choices=["replace", "edit"], default="replace", help="guard method"),
    arg(
        "--text-grounded",
        action="store_true",
        help="guard keeps only concepts --text activates too (the text as given, no template)",
    ),
    arg("--device", default="cpu", help="cpu (default), cuda, cuda:1, ..."),
    arg("--json", type=Path, metavar="FILE", help="also write the result as JSON"),
)
def inspect_command(args: argparse.Namespace) -> None:
    """Run the image (and/or text) through the model up to the SAE's site, encode its tokens
    and pool them per concept; list the strongest concepts with their labels. For an image and
    a projector-site SAE, also list which of its concepts the guard keeps (the shared set) and
    which it removes: what separates the guarded answer from the unguarded one."""
    from .backends.inputs import load_for_collection
    from .concepts.catalog import read_catalog
    from .concepts.inspect import format_inspection, inspect_rows, read_tokens
    from .intervention import GuardConfig

    opts = validated(
        InspectArgs,
        "arguments",
        image=args.image,
        text=args.text,
        top=args.top,
        catalog=args.catalog,
    )
    with _concepts_usage():
        labels = read_catalog(opts.catalog).labels() if opts.catalog else {}
        image = _open_image(opts.image) if opts.image else None
        sae = load(args.sae).eval()
        model, inputs = load_for_collection(args.model, device=args.device)
        sae = sae.to(args.device)
        rows = read_tokens(model, inputs, sae, image, opts.text)
        guard = None
        if sae.config.source.site in (None, "projector"):
            guard = GuardConfig(method=args.method, text_grounded=args.text_grounded)
        report = {}
        for modality, name in (("vision", str(opts.image)), ("text", repr(opts.text))):
            if modality not in rows:
                continue
            result = inspect_rows(
                sae,
                rows[modality],
                modality,
                pooling=args.pooling,
                top=opts.top,
                labels=labels,
                guard=guard if modality == "vision" else None,
                text_rows=rows.get("text"),
            )
            print(format_inspection(f"{modality} {name}", result, opts.top))
            report[modality] = result.to_json()
    _write_json(args.json, report)


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise UsageError(f"{path}: not readable as an image ({e})") from e


@subcommand(
    "catalog",
    "each concept's top images and captions in a store, labelled; JSON + static HTML",
    arg("--sae", required=True, metavar="DIR", help="VL-SAE checkpoint directory or Hub id"),
    arg("--store", required=True, type=Path, metavar="STORE", help="store of `collect`"),
    arg("--out", required=True, type=Path, metavar="DIR", help="catalog.json, index.html, thumbs"),
    arg("--top-n", type=int, default=8, help="images and captions per concept (default 8)"),
    _POOLING,
    arg("--concepts", type=int, nargs="+", metavar="K", help="only these concepts"),
    arg("--label-words", type=int, default=3, help="words per label (default 3)"),
    arg(
        "--label-docs",
        type=int,
        default=32,
        help="top images and captions whose captions the label reads (default 32)",
    ),
    arg("--image-root", type=Path, metavar="DIR", help="base of relative image paths"),
)
def catalog_command(args: argparse.Namespace) -> None:
    """Encode every image and caption of a store with the SAE, keep each concept's N strongest
    images and captions, label it with its most characteristic caption words (lift,
    stopwords removed), and write catalog.json plus index.html with thumbnails."""
    from .concepts.catalog import build_catalog, write_catalog
    from .store import ActivationStore

    opts = validated(
        CatalogArgs,
        "arguments",
        store=args.store,
        out=args.out,
        top_n=args.top_n,
        label_words=args.label_words,
        label_docs=args.label_docs,
        image_root=args.image_root,
    )
    with _concepts_usage():
        sae = load(args.sae).eval()
        catalog = build_catalog(
            ActivationStore(opts.store),
            sae,
            top_n=opts.top_n,
            pooling=args.pooling,
            concepts=args.concepts,
            label_size=opts.label_words,
            label_docs=opts.label_docs,
            sae_name=str(args.sae),
        )
    written = write_catalog(catalog, opts.out, opts.image_root)
    print(
        f"{len(catalog.concepts)} concepts of {catalog.n_concepts} over {catalog.images} images "
        f"and {catalog.captions} captions; {written['thumbnails']} thumbnails\n"
        f"wrote {written['json']}\nwrote {written['html']}"
    )


@subcommand(
    "ms",
    "monosemanticity score of the SAE's concepts over a store's images, vs raw neurons",
    arg("--sae", required=True, metavar="DIR", help="VL-SAE checkpoint directory or Hub id"),
    arg("--store", required=True, type=Path, metavar="STORE", help="store of `collect`"),
    arg(
        "--embeddings",
        required=True,
        type=Path,
        metavar="FILE",
        help="image embeddings of a separate encoder: .safetensors (tensor 'embeddings', "
        "metadata 'images' or 'ids') or .npz (arrays 'embeddings' and 'images' or 'ids')",
    ),
    _POOLING,
    arg("--out", type=Path, default=Path("runs/ms"), help="output folder (default runs/ms)"),
    arg("--bins", type=int, default=50, help="histogram bins (default 50)"),
    arg("--no-baseline", action="store_true", help="skip the raw-neuron baseline"),
)
def ms_command(args: argparse.Namespace) -> None:
    """MS_k = sum_{n<m} a_n a_m s_nm / sum_{n<m} a_n a_m (activations min-max normalised per
    concept, s = cosine similarity of the embeddings), in closed form, streamed over the
    store. Prints the distribution (mean, median, best, dead) for the SAE's concepts and for
    the model's raw neurons (the paper's baseline); writes ms.json and ms_histogram.png."""
    from .concepts.ms import MSResult, histogram, store_monosemanticity
    from .store import ActivationStore

    opts = validated(
        MSArgs,
        "arguments",
        store=args.store,
        embeddings=args.embeddings,
        out=args.out,
        bins=args.bins,
    )
    with _concepts_usage():
        sae = load(args.sae).eval()
        result = store_monosemanticity(
            ActivationStore(opts.store), sae, opts.embeddings, args.pooling, not args.no_baseline
        )
    summaries = {"sae": MSResult.summary(result.scores)}
    if result.baseline is not None:
        summaries["raw neurons"] = MSResult.summary(result.baseline)
    print(f"monosemanticity over {result.images} images ({args.pooling} pooling)")
    for name, s in summaries.items():
        best = s["best"]
        best_text = f"{best['score']:.4f} (#{best['unit']})" if best else "n/a"
        print(
            f"  {name:<12} units {s['units']:>6}  dead {s['dead']:>6}  mean {s['mean']:.4f}  "
            f"median {s['median']:.4f}  best {best_text}"
        )
    png = histogram(result, opts.out / "ms_histogram.png", opts.bins)
    scores = {"sae": result.scores.tolist()}
    if result.baseline is not None:
        scores["raw_neurons"] = result.baseline.tolist()
    record = {"images": result.images, "pooling": args.pooling, "summary": summaries}
    _write_json(opts.out / "ms.json", record | {"scores": _nan_to_none(scores)})
    print(f"wrote {png}")


def _nan_to_none(scores: dict[str, list[float]]) -> dict[str, list[float | None]]:
    """JSON has no NaN: dead units are written as null."""
    return {k: [None if v != v else v for v in vs] for k, vs in scores.items()}


# --- serve -------------------------------------------------------------------------------------


@subcommand(
    "serve",
    "vLLM's OpenAI-compatible server with the guard, switchable per request",
    arg("model", metavar="MODEL", help="LLaVA / LLaVA-NeXT checkpoint (llava-hf layout)"),
    arg("--sae", metavar="DIR", help="VL-SAE checkpoint directory or Hub id (required)"),
    arg("vllm_args", nargs=argparse.REMAINDER, metavar="...", help="guard flags and vLLM flags"),
)
def serve_command(args: argparse.Namespace) -> None:
    """Start `python -m vllm.entrypoints.openai.api_server` for MODEL with the guard.

    Guard flags (anywhere after MODEL): --sae DIR, --vlsae-method replace|edit, --vlsae-alpha A,
    --vlsae-steer JSON, --vlsae-default on|off (requests that do not say), --vlsae-dtype
    float32|model, --vlsae-log FILE, --vlsae-allow-request-kwargs (let clients set other
    processor kwargs and media_io_kwargs, e.g. image size: trusted clients only), --dry-run
    (print the command). Every other flag goes to vLLM.

    The server listens on 127.0.0.1 unless you pass --host; to expose it, pass --host 0.0.0.0
    with --api-key KEY (or VLLM_API_KEY=KEY); vLLM's key leaves some routes open
    (/invocations serves inference too), so put an authenticating proxy in front.
    Clients switch the guard per request with extra_body={"mm_processor_kwargs":
    {"vlsae_guard": false}}, the only request kwarg accepted by default; guard settings
    (alpha, steer, ...) are fixed at start, and requests that set them get HTTP 400.
    """
    from .serving.command import serve
    from .serving.server import ServeError
    from .serving.settings import PluginConfigError

    try:
        serve(args.model, args.sae, args.vllm_args)
    except (ServeError, PluginConfigError) as e:
        raise UsageError(str(e)) from e


if __name__ == "__main__":
    sys.exit(main())
