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
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ..backends import ImageAspect
from ..core.intervention import GuardConfig
from ..methods import METHODS, MODES, MethodError, method_settings
from ..scoring import chair, pope
from ..scoring.stats import DEFAULT_BOOTSTRAP
from ..validation import Settings
from . import presets
from .generation import BACKENDS, PROMPT_FORMATS, SERVED, SERVED_ARMS

DTYPES = ("auto", "float16", "bfloat16", "float32")
METHOD_NAMES = tuple(METHODS)
SERVED_METHODS = SERVED_ARMS  # issue 15: the two-arm methods cannot run under vLLM 0.32
CHAIR_SPLITS = ("chair500",)
# Set by the runner itself (--model, --dtype, --seed; the guarded architecture).
RUNNER_ENGINE_ARGS = frozenset({"model", "dtype", "seed", "hf_overrides"})


def _command() -> list[str]:
    return [Path(sys.argv[0]).name, *sys.argv[1:]]


def _as_str(value: object) -> object:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


PRESETS = {"official": presets.official}


class RunConfig(Settings):
    """Model, arms, data, batching, decoding and output of one A/B run (POPE or CHAIR)."""

    BENCHMARK: ClassVar[str | None] = None  # the preset's benchmark ("pope", "chair")

    model: str | None = None  # directory or Hub id; --backend openai: the served name (optional)
    backend: Literal[BACKENDS] = "hf"
    base_url: str | None = None  # --backend openai only
    engine_args: dict[str, Any] = {}  # --backend vllm only: vllm.LLM keyword arguments
    dtype: Literal[DTYPES] = "auto"
    device: str | None = None  # None: cuda if available, else cpu
    prompt_format: Literal[PROMPT_FORMATS] | None = None  # None: the backend's (filled in)
    sae: str | None = None  # VL-SAE checkpoint (directory or Hub id), for the SAE methods
    guard: GuardConfig | None = None  # the SAE method's settings; None with ``sae``: defaults
    # The inference method of the run (one arm) or of arm B; None: vlsae (paper with the guard's
    # mode "paper") with ``sae``, else none.
    method: Literal[METHOD_NAMES] | None = None
    # Two arms: True for (none, method); or the two methods (A, B), reported as B - A.
    ab: bool | tuple[Literal[METHOD_NAMES], Literal[METHOD_NAMES]] = False
    # The other methods' settings by name, e.g. {"vcd": {"alpha": 1.0}} (--vcd-alpha 1.0).
    method_settings: dict[str, dict[str, Any]] = {}
    images: Path | None = None
    limit: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=8, ge=1)
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    top_k: int | None = Field(default=None, ge=0)  # sampling; None: generate()'s 50, 0: off
    image_aspect: ImageAspect | None = (
        None  # hf/llava: pad to square or centre-crop; None: as the checkpoint
    )
    # Settings taken from a protocol (``presets``) unless given: "official", the VL-SAE release's
    preset: Literal[tuple(PRESETS)] | None = None
    seed: int = 0
    bootstrap: int = DEFAULT_BOOTSTRAP
    out: Path
    command: list[str] = Field(default_factory=_command)  # recorded in results.json

    @field_validator("model", "sae", mode="before")
    @classmethod
    def _path_to_str(cls, value: object) -> object:
        return _as_str(value)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: object) -> object:
        """The preset's settings under those given (``guard`` as a dict of fields to change)."""
        if not isinstance(data, dict) or data.get("preset") not in PRESETS:
            return data
        name = data["preset"]
        if cls.BENCHMARK is None:
            raise ValueError(f"--preset {name} needs a benchmark's config (POPE or CHAIR)")
        run, guard = presets.split(PRESETS[name](cls.BENCHMARK))
        given = data.get("guard") or {}
        if isinstance(given, GuardConfig):
            raise ValueError(
                f"--preset {name}: give guard as a dict of the settings that differ from the "
                "preset (a GuardConfig carries every default, so it would undo the preset)"
            )
        method = data.get("method")
        if method not in (None, "paper"):
            raise ValueError(f"--preset {name} is paper mode's protocol, not --method {method}")
        return {**run, **data, "guard": {**guard, **given}, "method": "paper"}

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
        self._settle_methods()
        return self

    def _settle_methods(self) -> None:
        """Fill in the method, check the arms against the SAE, the backend and the settings."""
        if self.sae is None and self.guard is not None:
            raise ValueError("guard settings (--vlsae-*) need --sae DIR, the checkpoint to use")
        guard_mode = None if self.guard is None else self.guard.mode
        if self.method is None:
            if self.sae is None:  # a server's guard is configured there (serve --sae)
                self.method = "vlsae" if self.backend == "openai" and self.ab is True else "none"
            else:
                by_mode = {mode: name for name, mode in MODES.items()}
                self.method = by_mode.get(guard_mode, "vlsae")
        if self.sae is not None and self.guard is None:
            self.guard = GuardConfig(mode=MODES.get(self.method, "projector"))
        arms = self.arms
        if self.ab is True and self.method == "none":
            raise ValueError("--ab compares none with a method: give --method M (or --sae DIR)")
        if len(set(arms)) != len(arms):
            raise ValueError(f"--ab compares two different methods, found {arms[0]} twice")
        guarded = [m for m in arms if m in MODES]
        if len(guarded) > 1:
            raise ValueError(
                "--ab vlsae paper: one --sae and one set of --vlsae-* settings serve one SAE "
                "method per run; compare each with none in its own run"
            )
        if guarded and self.sae is None and self.backend != "openai":
            raise ValueError(f"--method {guarded[0]} needs --sae DIR (the VL-SAE checkpoint)")
        if self.sae is not None and not guarded:
            raise ValueError(f"--sae is used by {', '.join(MODES)}, not by {' / '.join(arms)}")
        if guarded and self.guard is not None and self.guard.mode != MODES[guarded[0]]:
            raise ValueError(
                f"--method {guarded[0]} runs the guard in mode {MODES[guarded[0]]!r}, but "
                f"--vlsae-mode is {self.guard.mode!r}"
            )
        unused = sorted(set(self.method_settings) - set(arms))
        if unused:
            raise ValueError(f"settings for {', '.join(unused)}, which is not an arm of this run")
        for name, fields in self.method_settings.items():
            if name in MODES or name == "none":
                raise ValueError(f"{name} takes its settings from --vlsae-* flags")
            try:
                method_settings(name, **fields)
            except MethodError as e:
                raise ValueError(str(e)) from e
        if self.backend in SERVED:
            self._check_served(arms)

    def _check_served(self, arms: tuple[str, ...]) -> None:
        off_menu = [m for m in arms if m not in SERVED_METHODS]
        if off_menu:
            raise ValueError(
                f"--backend {self.backend} runs {', '.join(SERVED_METHODS)} only, not "
                f"{', '.join(off_menu)}: vLLM switches a single-pass guard per request, while a "
                "two-arm method needs two "
                "sequences per request and a fusion of their logits each step (see "
                "docs/serving.md); use --backend hf or llava"
            )
        if self.guard is not None and self.guard.text_grounded:
            raise ValueError(
                f"--backend {self.backend} runs the projector guard without text_grounded "
                "(vLLM caches projector outputs per image); use --backend hf"
            )
        if self.backend in SERVED and self.image_aspect is not None:
            raise ValueError(
                f"--image-aspect applies to --backend hf and llava; --backend {self.backend} "
                "preprocesses images as the checkpoint's processor says"
            )

    def preset_record(self) -> dict | None:
        """The preset, each of its settings with the reason and the value the run used (a
        different one: given on the command line)."""
        if self.preset is None:
            return None
        fields = {}
        for key, override in PRESETS[self.preset](self.BENCHMARK).items():
            owner, name = (self.guard, key[6:]) if key.startswith("guard.") else (self, key)
            used = getattr(owner, name)
            fields[key] = {"value": override.value, "reason": override.reason, "used": used}
        return {"name": self.preset, "fields": fields}

    def peer_settings(self) -> dict[str, dict]:
        """The settings of the arms that are neither none nor an SAE method, as JSON."""
        return {
            arm: self.settings_of(arm).model_dump(mode="json")
            for arm in self.arms
            if arm != "none" and arm not in MODES
        }

    def settings_of(self, method: str):
        """The validated settings of ``method`` in this run (None for none)."""
        if method == "none":
            return None
        if method in MODES:
            return self.guard
        return method_settings(method, **self.method_settings.get(method, {}))

    @property
    def arms(self) -> tuple[str, ...]:
        """The methods this run answers with: (A, B) with ``ab``, else the one method."""
        if isinstance(self.ab, tuple):
            return self.ab
        method = self.method or "none"
        return ("none", method) if self.ab else (method,)


class PopeRunConfig(RunConfig):
    """POPE: the question sets and how answers are prompted and parsed."""

    BENCHMARK: ClassVar[str] = "pope"

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

    BENCHMARK: ClassVar[str] = "chair"

    max_new_tokens: int = 512
    split: Literal[CHAIR_SPLITS] = "chair500"
    image_ids: Path | None = None  # a file of COCO image ids instead of ``split``
    prompt: str = chair.PROMPT
    coco_annotations: Path | None = None  # COCO 2014 annotations instead of the shipped table
