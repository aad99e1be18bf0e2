"""What the POPE and CHAIR runners share: provenance, resumable batched A/B generation.

Order of a run (its settings already validated, see :mod:`.config`): resolve and hash the model
and SAE, open (and resume) the answer files, check that every image still needed exists (one
error listing the missing ones, before any model is loaded), then load the model once, ready
for every arm, and answer batch by batch, arm by arm (each arm is an inference method,
:mod:`vlsae_guard.methods`, attached to the model while its batches run). Answers are on disk
before the next batch starts.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .. import outputs, provenance
from ..backends import UnsupportedModelError, checkpoint_family, read_model_config
from ..core.fit import GuardFit
from ..core.intervention import GuardConfig
from ..methods import MODES
from ..scoring import report
from ..scoring.files import DataError
from . import generation
from .answers import AnswerLog
from .config import RunConfig


class BenchmarkError(RuntimeError):
    """The run cannot start as asked (arguments that do not fit together)."""


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

    def answer_settings(self, run: RunConfig, arm: str, extra: dict) -> dict:
        """What an arm's answers depend on (the answer files' sidecar)."""
        base = {
            "method": arm,
            "backend": run.backend,
            "model": run.model,
            "model_sha256": self.model_sha256,
            "dtype": run.dtype,
            "device": device(run).split(":")[0],
            "prompt_format": run.prompt_format,
            "image_aspect": run.image_aspect,
            "decoding": self.decoding.describe(),
            "seed": run.seed,
            **backend_record(run.backend, self.options),
            **extra,
        }
        if arm in MODES:
            base.update(sae_sha256=self.sae_sha256, guard=self.guard)
        elif arm != "none":
            base["method_settings"] = run.peer_settings()[arm]
        return base


def device(run: RunConfig) -> str:
    return run.device or ("cuda" if torch.cuda.is_available() else "cpu")


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


def setup(run: RunConfig) -> Setup:
    options: dict = {}
    if run.backend == "openai":
        local = run.model is not None and Path(run.model).expanduser().is_dir()
        model_dir = Path(run.model).expanduser().resolve() if local else None
        options = {
            "base_url": run.base_url,
            "served_model": generation.served_model(run.base_url, run.model),
            "concurrency": run.batch_size,
            # Without the weights here we cannot see the template; the server's default stays.
            "extra_body": generation.openai_extra_body(model_dir) if local else {},
        }
    else:
        model_dir = resolve_model(run.model)
        check_family(run.backend, model_dir)
        if run.backend == "vllm":
            options = {"engine_args": run.engine_args}
    sae_dir = sae_sha = None
    if run.sae:
        from ..core.checkpoint import resolve

        sae_dir = resolve(run.sae)
        sae_sha = provenance.sha256_dir(sae_dir)
    return Setup(
        model_dir=model_dir,
        model_sha256=None if model_dir is None else provenance.sha256_dir(model_dir),
        sae_dir=sae_dir,
        sae_sha256=sae_sha,
        config=run.guard,
        decoding=generation.Decoding(run.max_new_tokens, run.temperature, run.top_p, run.top_k),
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
    run: RunConfig,
    setup_: Setup,
    jobs: Sequence[Job],
    output_field: str,
    progress: bool = True,
) -> dict[str, float]:
    """Answer every pending item of every job, arm by arm, appending as batches finish; the
    seconds each arm generated for (arms with nothing pending: absent)."""
    todo = [job for job in jobs if job.pending()]
    if not todo:
        return {}
    guarded = any(job.arm in MODES for job in todo) and run.backend != "openai"
    model = run.model if setup_.model_dir is None else str(setup_.model_dir)
    generator = generation.load(
        run.backend,
        model,
        run.dtype,
        run.device,
        run.prompt_format,
        sae=setup_.sae_dir if guarded else None,
        config=setup_.config,
        seed=run.seed,
        options=setup_.options,
        arms={arm: run.settings_of(arm) for arm in run.arms},
        image_aspect=run.image_aspect,
    )
    seconds: dict[str, float] = {}
    try:
        for arm in run.arms:
            started = time.perf_counter()
            for job in (j for j in todo if j.arm == arm):
                _answer(generator, job, run, setup_, output_field, progress)
            if any(j.arm == arm for j in todo):
                seconds[arm] = round(time.perf_counter() - started, 3)
        if generator.fit is not None:  # kept for the results of this and of resumed runs
            outputs.write_text(run.out / FIT_FILE, json.dumps(generator.fit, indent=2) + "\n")
    finally:
        generator.close()
    return seconds


FIT_FILE = "guard_fit.json"


def recorded_fit(out: Path) -> dict | None:
    """The guard's placement check (explained variance at its site) measured by this run or the
    run it resumed; None if no guarded batch ran in this process (served backends log it)."""
    path = out / FIT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def fit_warnings(fit: dict | None) -> list[str]:
    """The placement check's problem, as a results warning."""
    if fit is None:
        return []
    problem = GuardFit(**fit).problem
    return [] if problem is None else [f"guard placement: {problem}"]


def _answer(generator, job: Job, run: RunConfig, setup_: Setup, field: str, progress: bool):
    pending = job.pending()
    seed_everything(run.seed)
    bar = tqdm(
        total=len(pending),
        desc=f"{job.split} [{job.arm}]",
        unit="item",
        disable=not progress,
        file=sys.stderr,
    )
    with bar:
        for start in range(0, len(pending), run.batch_size):
            batch = pending[start : start + run.batch_size]
            images = [_open(it.image) for it in batch]
            seeds = [item_seed(run.seed, it.key) for it in batch]
            prompts = [it.prompt for it in batch]
            texts = generator.answer(images, prompts, setup_.decoding, job.arm, seeds)
            job.log.append(
                {**it.record, "prompt": it.prompt, field: text, "arm": job.arm}
                for it, text in zip(batch, texts, strict=True)
            )
            bar.update(len(batch))


def item_seed(seed: int, key: str) -> int:
    """The sampling seed of one item: fixed by the run's seed and the item's id, so a sample
    draws the same tokens in any batch and after a resume (methods on the fused decoding engine;
    ``model.generate`` draws from one global stream)."""
    return zlib.crc32(f"{seed}:{key}".encode())


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def settings_record(run: RunConfig, setup_: Setup, extra: dict) -> dict:
    """The ``settings`` block of results.json."""
    return {
        "command": run.command,
        "backend": run.backend,
        "model": run.model,
        "model_dir": str(setup_.model_dir),
        "model_sha256": setup_.model_sha256,
        "dtype": run.dtype,
        "device": device(run),
        "prompt_format": run.prompt_format,
        "image_aspect": run.image_aspect,
        "preset": run.preset_record(),
        **backend_record(run.backend, setup_.options),
        "sae": run.sae,
        "sae_sha256": setup_.sae_sha256,
        "method": run.method,
        "arms": list(run.arms),
        "guard": setup_.guard,
        "method_settings": run.peer_settings(),
        "guard_fit": recorded_fit(run.out),
        "decoding": setup_.decoding.describe(),
        "seed": run.seed,
        "batch_size": run.batch_size,
        "limit": run.limit,
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
    """Where an arm's answers go: ``OUT/answers/METHOD``."""
    return out / "answers" / arm


def check_layout(out: Path) -> None:
    """Refuse to resume a directory written before arms were named by method (0.2): its answers
    would silently be answered again beside the old ones."""
    old = [d for d in ("guard-off", "guard-on") if (out / "answers" / d).is_dir()]
    if old:
        raise BenchmarkError(
            f"{out} holds answers from before arms were named by method in 0.2 ({', '.join(old)}); "
            f"to resume it, rename answers/guard-off to answers/none and answers/guard-on to "
            "answers/vlsae (answers/paper for paper mode), or write to a new --out"
        )


def safe_name(split: str) -> str:
    return re.sub(r"[^\w.-]+", "_", split)
