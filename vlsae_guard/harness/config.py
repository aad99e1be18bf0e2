"""What a benchmark run is asked to do, validated before anything is hashed or loaded.

:func:`vlsae_guard.harness.pope.run` and :func:`vlsae_guard.harness.chair.run` take these; the
scripts in ``benchmarks/`` build them from their flags (:mod:`vlsae_guard.cli.bench_flags`,
which reads each flag's default from the field here). Checks across fields name the flags,
since that is where users meet them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..core.intervention import GuardConfig
from ..scoring import chair, pope
from ..scoring.stats import DEFAULT_BOOTSTRAP
from ..validation import Settings
from .generation import BACKENDS, PROMPT_FORMATS, SERVED

DTYPES = ("auto", "float16", "bfloat16", "float32")
ARMS = ("off", "on")
CHAIR_SPLITS = ("chair500",)
# Set by the runner itself (--model, --dtype, --seed; the guarded architecture).
RUNNER_ENGINE_ARGS = frozenset({"model", "dtype", "seed", "hf_overrides"})


def _command() -> list[str]:
    return [Path(sys.argv[0]).name, *sys.argv[1:]]


def _as_str(value: object) -> object:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


class RunConfig(Settings):
    """Model, arms, data, batching, decoding and output of one A/B run (POPE or CHAIR)."""

    model: str | None = None  # directory or Hub id; --backend openai: the served name (optional)
    backend: Literal[BACKENDS] = "hf"
    base_url: str | None = None  # --backend openai only
    engine_args: dict[str, Any] = {}  # --backend vllm only: vllm.LLM keyword arguments
    dtype: Literal[DTYPES] = "auto"
    device: str | None = None  # None: cuda if available, else cpu
    prompt_format: Literal[PROMPT_FORMATS] | None = None  # None: the backend's (filled in)
    sae: str | None = None  # VL-SAE checkpoint (directory or Hub id): the guarded arm's
    guard: GuardConfig | None = None  # None with ``sae``: GuardConfig()'s defaults
    ab: bool = False  # both arms; else one: on with ``sae``, off without
    images: Path | None = None
    limit: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=8, ge=1)
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    seed: int = 0
    bootstrap: int = DEFAULT_BOOTSTRAP
    out: Path
    command: list[str] = Field(default_factory=_command)  # recorded in results.json

    @field_validator("model", "sae", mode="before")
    @classmethod
    def _path_to_str(cls, value: object) -> object:
        return _as_str(value)

    @field_validator("engine_args", mode="before")
    @classmethod
    def _engine_args_object(cls, value: object) -> object:
        if not isinstance(value, dict):
            raise ValueError(f"--engine-args: expected a JSON object, found {value!r}")
        return value

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        """The flag combinations that cannot run; fills in the backend's prompt format."""
        openai = self.backend == "openai"
        if self.model is None and not openai:
            raise ValueError("--model is required (or --demo)")
        if openai != (self.base_url is not None):
            raise ValueError("--base-url URL goes with --backend openai (and only with it)")
        if self.engine_args and self.backend != "vllm":
            raise ValueError("--engine-args goes with --backend vllm")
        owned = sorted(set(self.engine_args) & RUNNER_ENGINE_ARGS)
        if owned:
            raise ValueError(
                f"--engine-args: {', '.join(owned)} are set by this runner (--model, --dtype, "
                "--seed; the guarded architecture), not through --engine-args"
            )
        if self.backend in SERVED and self.device is not None:
            raise ValueError(f"--device does not apply to --backend {self.backend}: vLLM picks it")
        if self.prompt_format is None:
            self.prompt_format = "chat-template" if openai else "llava"
        if self.backend == "llava" and self.prompt_format != "llava":
            raise ValueError(
                "--backend llava builds LLaVA's own conversation (--prompt-format llava)"
            )
        if openai and self.prompt_format != "chat-template":
            raise ValueError(
                "--backend openai: the server applies its chat template (--prompt-format "
                "chat-template); for LLaVA's eval conversation use --backend vllm or hf"
            )
        if self.sae is None and self.guard is not None:
            raise ValueError("guard settings (--vlsae-*) need --sae DIR, the checkpoint to use")
        if self.sae is not None and self.guard is None:
            self.guard = GuardConfig()
        if (
            self.backend in SERVED
            and self.guard is not None
            and (self.guard.mode == "paper" or self.guard.text_grounded)
        ):
            raise ValueError(
                f"--backend {self.backend} runs the projector guard without text_grounded "
                "(vLLM caches projector outputs per image); use --backend hf for paper mode "
                "or --vlsae-text-grounded"
            )
        if self.ab and not self.sae and not openai:
            raise ValueError("--ab needs --sae DIR (the guard arm)")
        return self

    @property
    def arms(self) -> tuple[str, ...]:
        """Guard off then on with ``ab``; else on with ``sae``, off without."""
        if self.ab:
            return ARMS
        return ("on",) if self.sae else ("off",)


class PopeRunConfig(RunConfig):
    """POPE: the question sets and how answers are prompted and parsed."""

    max_new_tokens: int = 128  # llava/eval/model_vqa_loader's default
    dataset: Literal[tuple(pope.DATASETS)] = "coco"
    split: Literal[(*pope.SPLITS, "all")] = "all"
    questions: list[str] | None = None  # question files instead of dataset/split
    prompt: Literal[tuple(pope.PROMPTS)] = "llava"
    strict: bool = False  # the strict exact yes/no parser instead of LLaVA's

    @field_validator("questions", mode="before")
    @classmethod
    def _paths_to_str(cls, value: object) -> object:
        return [_as_str(v) for v in value] if isinstance(value, list | tuple) else value


class ChairRunConfig(RunConfig):
    """CHAIR: the images captioned, the prompt and the ground truth."""

    max_new_tokens: int = 512
    split: Literal[CHAIR_SPLITS] = "chair500"
    image_ids: Path | None = None  # a file of COCO image ids instead of ``split``
    prompt: str = chair.PROMPT
    coco_annotations: Path | None = None  # COCO 2014 annotations instead of the shipped table
