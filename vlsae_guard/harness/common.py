"""What the POPE and CHAIR runners share: flags, provenance, resumable batched A/B generation.

Order of a run: resolve and hash the model and SAE, open (and resume) the answer files, check
that every image still needed exists (one error listing the missing ones, before any model is
loaded), then load the model once, ready for both arms, and answer batch by batch: first the
arm with the guard off, then on. Answers are on disk before the next batch starts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .. import outputs, provenance
from ..backends import UnsupportedModelError, checkpoint_family, read_model_config
from ..cli.guard_flags import add_guard_flags, settings_from_args
from ..core.intervention import GuardConfig
from ..scoring import report
from ..scoring.files import DataError
from ..scoring.stats import DEFAULT_BOOTSTRAP
from . import generation
from .answers import AnswerLog

ARMS = ("off", "on")
DEMO_NOTE = (
    "NOTE: a tiny random-weight model built here; these numbers say nothing about real LLaVA "
    "models or about whether the guard reduces hallucination. They show that the A/B pipeline "
    "runs end to end."
)


class BenchmarkError(RuntimeError):
    """The run cannot start as asked (arguments that do not fit together)."""


def add_common_args(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """Model, arms, data, batching, decoding and output flags; the guard flags as everywhere."""
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model",
        help="model directory or Hub id (e.g. llava-hf/llava-1.5-7b-hf); for --backend openai "
        "the served model name (default: the server's only model; hashed when it is a directory)",
    )
    g.add_argument(
        "--backend",
        choices=generation.BACKENDS,
        default="hf",
        help="hf: transformers; llava: the original llava package; vllm: an offline vLLM engine "
        "serving both arms; openai: a running `vlsae-guard serve` at --base-url",
    )
    g.add_argument("--base-url", help="--backend openai: the server, e.g. http://host:8000/v1")
    g.add_argument(
        "--engine-args",
        type=json.loads,
        default={},
        metavar="JSON",
        help="--backend vllm: vllm.LLM keyword arguments, e.g. '{\"max_model_len\": 4096}'",
    )
    g.add_argument(
        "--dtype",
        choices=["auto", "float16", "bfloat16", "float32"],
        default="auto",
        help="auto: float16 on a GPU, float32 on a CPU",
    )
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument(
        "--prompt-format",
        choices=generation.PROMPT_FORMATS,
        default=None,
        help="llava: LLaVA-1.5's vicuna_v1 eval conversation (default; not --backend openai); "
        "chat-template: the processor's chat template (hf, vllm; the only one for openai, "
        "where the server applies it)",
    )
    g = parser.add_argument_group("A/B")
    g.add_argument(
        "--sae",
        dest="vlsae_guard",
        metavar="DIR",
        help="VL-SAE checkpoint (directory or Hub id); same as --vlsae-guard",
    )
    g.add_argument(
        "--ab",
        action="store_true",
        help="run both arms (guard off, then on); without it one arm runs: on when "
        "--sae is given, else off",
    )
    g = parser.add_argument_group("run")
    g.add_argument("--images", type=Path, help="image directory (COCO val2014 for COCO/CHAIR)")
    g.add_argument("--limit", type=int, default=None, help="first N items per split (smoke runs)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--bootstrap",
        type=int,
        default=DEFAULT_BOOTSTRAP,
        help="paired bootstrap replicates for the 95%% intervals",
    )
    g.add_argument("--out", type=Path, default=None, help="output directory")
    add_guard_flags(parser)


def arms(args: argparse.Namespace) -> tuple[str, ...]:
    if args.ab and not args.vlsae_guard and getattr(args, "backend", "hf") != "openai":
        raise BenchmarkError("--ab needs --sae DIR (the guard arm)")
    if args.ab:
        return ARMS
    return ("on",) if args.vlsae_guard else ("off",)


def check_args(args: argparse.Namespace) -> None:
    """Refuse flag combinations that cannot run (then an --out that cannot be written); fills
    in the backend's prompt format."""
    openai = args.backend == "openai"
    if args.model is None and not openai:
        raise BenchmarkError("--model is required (or --demo)")
    if args.out is None:
        raise BenchmarkError("--out DIR is required")
    if args.batch_size < 1:
        raise BenchmarkError("--batch-size must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise BenchmarkError("--limit must be >= 1")
    if openai != (args.base_url is not None):
        raise BenchmarkError("--base-url URL goes with --backend openai (and only with it)")
    if args.engine_args and args.backend != "vllm":
        raise BenchmarkError("--engine-args goes with --backend vllm")
    if not isinstance(args.engine_args, dict):
        raise BenchmarkError(f"--engine-args: expected a JSON object, found {args.engine_args!r}")
    owned = sorted(set(args.engine_args) & {"model", "dtype", "seed", "hf_overrides"})
    if owned:
        raise BenchmarkError(
            f"--engine-args: {', '.join(owned)} are set by this runner (--model, --dtype, --seed; "
            "the guarded architecture), not through --engine-args"
        )
    if args.backend in generation.SERVED and args.device is not None:
        raise BenchmarkError(f"--device does not apply to --backend {args.backend}: vLLM picks it")
    if args.prompt_format is None:
        args.prompt_format = "chat-template" if openai else "llava"
    if args.backend == "llava" and args.prompt_format != "llava":
        raise BenchmarkError(
            "--backend llava builds LLaVA's own conversation (--prompt-format llava)"
        )
    if openai and args.prompt_format != "chat-template":
        raise BenchmarkError(
            "--backend openai: the server applies its chat template (--prompt-format "
            "chat-template); for LLaVA's eval conversation use --backend vllm or hf"
        )
    if args.backend in generation.SERVED:
        config = settings_from_args(args)
        if config is not None and (config.mode == "paper" or config.text_grounded):
            raise BenchmarkError(
                f"--backend {args.backend} runs the projector guard without text_grounded "
                "(vLLM caches projector outputs per image); use --backend hf for paper mode "
                "or --vlsae-text-grounded"
            )
    outputs.check_writable(args.out)  # before hashing and loading: a late failure loses a batch


def resolve_model(model: str) -> Path:
    """A local directory for ``model``: itself, or the Hub snapshot (downloaded if needed)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model) is None:
        raise DataError(f"--model {model}: no such directory, and not a Hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # not cached yet: download, as from_pretrained would
        pass
    try:
        return Path(snapshot_download(model))
    except Exception as e:  # offline, unknown repo, gated model, ...
        raise DataError(
            f"--model {model}: no such directory, and not available from the Hub ({e})"
        ) from e


def check_family(backend: str, model_dir: Path) -> None:
    """Refuse, from config.json and before loading, a model this backend cannot guard."""
    family = checkpoint_family(read_model_config(str(model_dir)), f"{model_dir}/config.json")
    wanted = "llava" if backend == "llava" else "hf"
    if family != wanted:
        hint = {
            "llava": "an original-LLaVA checkpoint (LlavaLlamaForCausalLM): use --backend llava",
            "hf": "a transformers (llava-hf) checkpoint: use --backend hf or vllm",
        }[family]
        raise UnsupportedModelError(f"--backend {backend}: {model_dir} is {hint}")


@dataclass(frozen=True)
class Item:
    """One generation: the answer file key, the image, the user prompt, fields to record."""

    key: str
    image: Path
    prompt: str
    record: dict


@dataclass
class Job:
    """The items of one split for one arm, and the file their answers go to."""

    arm: str
    split: str
    items: list[Item]
    log: AnswerLog

    def pending(self) -> list[Item]:
        return [it for it in self.items if not self.log.done(it.key)]


@dataclass(frozen=True)
class Setup:
    """What was resolved before generation: recorded in every results file."""

    model_dir: Path | None  # None: a model behind --base-url that is no directory here
    model_sha256: str | None
    sae_dir: Path | None
    sae_sha256: str | None
    config: GuardConfig | None
    decoding: generation.Decoding
    options: dict  # the backend's own settings (engine arguments, server, request fields)

    @property
    def guard(self) -> dict | None:
        return None if self.config is None else self.config.model_dump(mode="json")

    def answer_settings(self, args: argparse.Namespace, arm: str, extra: dict) -> dict:
        """What an arm's answers depend on (the answer files' sidecar)."""
        base = {
            "backend": args.backend,
            "model": args.model,
            "model_sha256": self.model_sha256,
            "dtype": args.dtype,
            "device": (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[
                0
            ],
            "prompt_format": args.prompt_format,
            "decoding": self.decoding.describe(),
            "seed": args.seed,
            **backend_record(args.backend, self.options),
            **extra,
        }
        if arm == "on":
            base.update(sae_sha256=self.sae_sha256, guard=self.guard)
        return base


def backend_record(backend: str, options: dict) -> dict:
    """What of the backend's options decides answers (a server's address does not)."""
    if backend == "vllm":
        return {"engine_args": options["engine_args"]}
    if backend == "openai":  # the server's SAE and guard settings are its own (serve flags)
        return {
            "served_model": options["served_model"],
            "extra_body": options["extra_body"],
            "guard_configured_by": "the server",
        }
    return {}


def setup(args: argparse.Namespace) -> Setup:
    config = settings_from_args(args)
    options: dict = {}
    if args.backend == "openai":
        local = args.model is not None and Path(args.model).expanduser().is_dir()
        model_dir = Path(args.model).expanduser().resolve() if local else None
        options = {
            "base_url": args.base_url,
            "served_model": generation.served_model(args.base_url, args.model),
            "concurrency": args.batch_size,
            # Without the weights here we cannot see the template; the server's default stays.
            "extra_body": generation.openai_extra_body(model_dir) if local else {},
        }
    else:
        model_dir = resolve_model(args.model)
        check_family(args.backend, model_dir)
        if args.backend == "vllm":
            options = {"engine_args": args.engine_args}
    sae_dir = sae_sha = None
    if args.vlsae_guard:
        from ..core.checkpoint import resolve

        sae_dir = resolve(args.vlsae_guard)
        sae_sha = provenance.sha256_dir(sae_dir)
    return Setup(
        model_dir=model_dir,
        model_sha256=None if model_dir is None else provenance.sha256_dir(model_dir),
        sae_dir=sae_dir,
        sae_sha256=sae_sha,
        config=config,
        decoding=generation.Decoding(args.max_new_tokens, args.temperature, args.top_p),
        options=options,
    )


def check_images(jobs: Sequence[Job], out: Path) -> None:
    """One error listing every image still needed that is missing (full list in a file)."""
    needed = {it.image for job in jobs for it in job.pending()}
    missing = sorted(str(p) for p in needed if not p.is_file())
    if not missing:
        return
    listing = outputs.write_text(out / "missing_images.txt", "\n".join(missing) + "\n")
    shown = "\n  ".join(missing[:20])
    more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
    raise DataError(
        f"{len(missing)} of {len(needed)} images are missing (full list: {listing}):\n  "
        f"{shown}{more}"
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def generate(
    args: argparse.Namespace,
    setup_: Setup,
    jobs: Sequence[Job],
    output_field: str,
    progress: bool = True,
) -> None:
    """Answer every pending item of every job, arm by arm, appending as batches finish."""
    todo = [job for job in jobs if job.pending()]
    if not todo:
        return
    guarded = any(job.arm == "on" for job in todo) and args.backend != "openai"
    model = args.model if setup_.model_dir is None else str(setup_.model_dir)
    generator = generation.load(
        args.backend,
        model,
        args.dtype,
        args.device,
        args.prompt_format,
        sae=setup_.sae_dir if guarded else None,
        config=setup_.config,
        seed=args.seed,
        options=setup_.options,
    )
    try:
        for arm in ARMS:
            for job in (j for j in todo if j.arm == arm):
                _answer(generator, job, args, setup_, output_field, progress)
    finally:
        generator.close()


def _answer(generator, job: Job, args, setup_: Setup, field: str, progress: bool):
    pending = job.pending()
    seed_everything(args.seed)
    bar = tqdm(
        total=len(pending),
        desc=f"{job.split} [guard {job.arm}]",
        unit="item",
        disable=not progress,
        file=sys.stderr,
    )
    with bar:
        for start in range(0, len(pending), args.batch_size):
            batch = pending[start : start + args.batch_size]
            images = [_open(it.image) for it in batch]
            texts = generator.answer(images, [it.prompt for it in batch], setup_.decoding, job.arm)
            job.log.append(
                {**it.record, "prompt": it.prompt, field: text, "arm": job.arm}
                for it, text in zip(batch, texts, strict=True)
            )
            bar.update(len(batch))


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def settings_record(args: argparse.Namespace, setup_: Setup, extra: dict) -> dict:
    """The ``settings`` block of results.json."""
    return {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "backend": args.backend,
        "model": args.model,
        "model_dir": str(setup_.model_dir),
        "model_sha256": setup_.model_sha256,
        "dtype": args.dtype,
        "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        "prompt_format": args.prompt_format,
        **backend_record(args.backend, setup_.options),
        "sae": args.vlsae_guard,
        "sae_sha256": setup_.sae_sha256,
        "guard": setup_.guard,
        "decoding": setup_.decoding.describe(),
        "seed": args.seed,
        "batch_size": args.batch_size,
        "limit": args.limit,
        **extra,
        "environment": provenance.environment(),
    }


def write_outputs(
    out: Path, results: dict, rows: Sequence[report.Row], title: str, notes: Sequence[str] = ()
) -> str:
    """results.json, results.md and results.png; returns the terminal table."""
    outputs.write_text(
        out / "results.json", json.dumps(results, indent=2, default=_jsonable) + "\n"
    )
    md = [f"# {title}", "", report.markdown_table(rows), ""]
    md += [f"{n}\n" for n in notes]
    outputs.write_text(out / "results.md", "\n".join(md))
    report.plot(rows, out / "results.png", title)
    return report.text_table(rows)


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, (set, frozenset, tuple)):
        return list(x)
    if isinstance(x, os.PathLike):
        return str(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def empty_warnings(counts: dict[str, int], what: str, meaning: str) -> list[str]:
    """One warning per place (split and arm) where the model produced empty outputs."""
    return [f"{n} {what} empty ({where}): {meaning}" for where, n in counts.items() if n]


def answers_dir(out: Path, arm: str) -> Path:
    return out / "answers" / f"guard-{arm}"


def safe_name(split: str) -> str:
    return re.sub(r"[^\w.-]+", "_", split)


def fail(prog: str, error: Exception) -> int:
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2


EXPECTED_ERRORS: tuple[type[Exception], ...] = (
    DataError,
    BenchmarkError,
    UnsupportedModelError,
    generation.BackendUnavailable,
    generation.GenerationError,
    OSError,
)


def run_main(prog: str, body: Callable[[], int]) -> int:
    """Run a benchmark body; expected failures print one line and exit 2 (no traceback)."""
    from ..core.checkpoint import CheckpointError
    from ..core.guard import GuardError

    try:
        return body()
    except (*EXPECTED_ERRORS, CheckpointError, GuardError) as e:
        return fail(prog, e)
