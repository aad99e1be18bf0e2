"""The plugin's settings, read from the environment by every vLLM process.

vLLM runs the API server, the engine core and each worker in separate processes that inherit
the environment, so the settings travel as ``VLSAE_GUARD_*`` variables and each process
validates them itself. Without ``VLSAE_GUARD_SAE`` the plugin changes nothing.
"""

from __future__ import annotations

import json
import math
import os
import reprlib
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from ..core.cue_mask import object_map_path
from ..core.intervention import GuardConfig
from ..core.object_evidence import ObjectConcepts
from ..validation import FrozenSettings, describe_validation_error

PREFIX = "VLSAE_GUARD_"
ENV_SAE = PREFIX + "SAE"  # checkpoint directory or Hub id; enables the guard
ENV_CONFIG = PREFIX + "CONFIG"  # GuardConfig fields: inline JSON, or a .json/.yaml file
ENV_MODE = PREFIX + "MODE"
ENV_REWRITE = PREFIX + "REWRITE"
ENV_METHOD = PREFIX + "METHOD"  # deprecated name of ENV_REWRITE
ENV_ALPHA = PREFIX + "ALPHA"
ENV_DEFAULT = PREFIX + "DEFAULT"  # on|off: requests that do not say are guarded or not
ENV_DTYPE = PREFIX + "DTYPE"  # float32 (default) | model: the SAE's compute dtype
ENV_LOG = PREFIX + "LOG"  # append one JSON line per projector call (what the hook saw)
ENV_ALLOW = PREFIX + "ALLOW_REQUEST_KWARGS"  # on|off: clients may set other processor kwargs
KNOWN = (
    ENV_SAE, ENV_CONFIG, ENV_MODE, ENV_REWRITE, ENV_METHOD, ENV_ALPHA, ENV_DEFAULT, ENV_DTYPE,
    ENV_LOG, ENV_ALLOW,
)  # fmt: skip
_FIELD_ENV = {ENV_MODE: "mode", ENV_REWRITE: "rewrite", ENV_METHOD: "rewrite", ENV_ALPHA: "alpha"}

# The per-request switch: ``mm_processor_kwargs={"vlsae_guard": true|false}``.
REQUEST_KEY = "vlsae_guard"
# Cue masking: the object the prompt asks about, which the processor reads off the prompt and
# adds to the request's processor kwargs itself (never the client: a vlsae_* key is refused),
# so that it enters vLLM's multimodal hash and the caches keep one prompt's masked image
# features from another prompt about the same image.
ASKED_KEY = "vlsae_asked_object"
ALLOW_FLAG = "--vlsae-allow-request-kwargs"
# Settings a client might try to set per request -> how the operator sets them.
_FLAGS = (
    "alpha",
    "rewrite",
    "mode",
    "steer",
    "text_grounded",
    "layer",
    "site",
    "pre_zero",
    "keep_error",
    "search",
)
_SETTING_SOURCE = {
    **{f: ENV_CONFIG for f in GuardConfig.model_fields},
    **{f: "--vlsae-" + f.replace("_", "-") for f in _FLAGS},
    **{f: "--vlsae-" + f for f in ("default", "dtype", "log")},
    "sae": "--sae",
    "guard": "--sae and --vlsae-*",
    "allow_request_kwargs": ALLOW_FLAG,
}
_repr = reprlib.Repr()  # bounded: a request's value may be huge
_repr.maxstring = _repr.maxother = 40
_short = _repr.repr


class PluginConfigError(ValueError):
    """The ``VLSAE_GUARD_*`` settings are invalid; the message names the variables."""


class RequestKwargsError(ValueError):
    """A request's ``mm_processor_kwargs`` are refused (HTTP 400); the message names the key."""


class ServeSettings(FrozenSettings):
    """What the guarded vLLM model does; ``sae=None`` means nothing at all."""

    sae: str | None = None
    guard: GuardConfig = Field(default_factory=GuardConfig)
    default: bool = True  # guard requests that do not set mm_processor_kwargs["vlsae_guard"]
    dtype: Literal["float32", "model"] = "float32"
    log: Path | None = None
    # Let requests set processor kwargs other than the switch (image size...: a memory risk).
    allow_request_kwargs: bool = False

    @model_validator(mode="after")
    def _check(self) -> ServeSettings:
        if self.guard.mode == "paper":
            raise ValueError(
                "mode 'paper' (decoder-layer shift with logit fusion) is not supported under "
                "vLLM: it is a two-arm method (a plain and a shifted sequence per request, their "
                "logits fused and one token fed to both each step), and vLLM 0.32 samples each "
                "sequence on its own, with logits processors that see rows, not pairs of "
                "requests (docs/serving.md, 'Methods under vLLM'); use mode 'projector' (the "
                "default), or paper mode with the transformers backend"
            )
        if self.guard.text_grounded:
            raise ValueError(
                "text_grounded is not supported under vLLM: its encoder cache keys projector "
                "outputs by image, not by prompt, so a prompt-dependent guard would be reused "
                "for other prompts"
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.sae is not None

    def object_map(self) -> ObjectConcepts | None:
        """Cue masking's object map (None in the other modes); a problem is a config error."""
        if self.guard.mode != "cue-mask" or not self.enabled:
            return None
        try:
            return ObjectConcepts.load(object_map_path(self.guard, self.sae))
        except ValueError as e:
            raise PluginConfigError(f"{self.sae}: {e}") from e

    def resolve_request(self, value: object) -> bool:
        """Whether a request's images are guarded, from its switch (``None``: it did not say)."""
        if value is None:
            return self.enabled and self.default
        if not isinstance(value, bool):
            raise RequestKwargsError(
                f"mm_processor_kwargs[{REQUEST_KEY!r}]: expected true or false, found "
                f"{_describe(value)}"
            )
        if value and not self.enabled:
            raise RequestKwargsError(
                f"mm_processor_kwargs[{REQUEST_KEY!r}] is true but this server has no guard: "
                f"start it with {ENV_SAE}=DIR (or `vlsae-guard serve MODEL --sae DIR`)"
            )
        return value

    def check_request(
        self, kwargs: Mapping[str, object], media_io_kwargs: Mapping[str, object] | None = None
    ) -> bool:
        """Refuse what a request may not set; return whether its images are guarded.

        A request may set only the switch, ``vlsae_guard: true|false``. The guard's settings
        are fixed when the server starts, so keys naming them are refused, not ignored (the
        client would believe it changed them). Other processor kwargs and ``media_io_kwargs``
        change preprocessing and its memory use (image size): refused unless the operator
        allows them (``--vlsae-allow-request-kwargs``) or runs no guard at all.
        """
        for key in kwargs:
            if key != REQUEST_KEY and (message := self._guard_key(str(key))) is not None:
                raise RequestKwargsError(message)
        if self.enabled and not self.allow_request_kwargs:
            foreign = next((k for k in kwargs if k != REQUEST_KEY), None)
            if foreign is not None:
                raise RequestKwargsError(
                    f"mm_processor_kwargs[{_short(foreign)}]: expected only {REQUEST_KEY!r}, "
                    f"found {_short(foreign)}; this server does not let requests set processor "
                    f"kwargs (the operator allows them with {ALLOW_FLAG}; offline, "
                    "allow_request_kwargs=True)"
                )
            if media_io_kwargs:
                raise RequestKwargsError(
                    f"media_io_kwargs: expected none, found {_short(dict(media_io_kwargs))}; "
                    "this server does not let requests change media loading (the operator "
                    f"allows it with {ALLOW_FLAG}; offline, allow_request_kwargs=True)"
                )
        if REQUEST_KEY in kwargs and kwargs[REQUEST_KEY] is None:  # said, but not a bool
            raise RequestKwargsError(
                f"mm_processor_kwargs[{REQUEST_KEY!r}]: expected true or false, found null"
            )
        return self.resolve_request(kwargs.get(REQUEST_KEY))

    def _guard_key(self, key: str) -> str | None:
        """Why ``key`` may not be set per request, when it names the guard or its settings."""
        name = key.strip().lower().replace("-", "_")
        if name == REQUEST_KEY:
            return (
                f"mm_processor_kwargs[{_short(key)}]: expected the switch spelled "
                f"{REQUEST_KEY!r}, found {_short(key)}"
            )
        bare = name.removeprefix("vlsae_guard_").removeprefix("vlsae_")
        bare = "rewrite" if bare == "method" else bare  # its deprecated name
        if bare not in _SETTING_SOURCE and not name.startswith("vlsae"):
            return None
        source = _SETTING_SOURCE.get(bare, "the serve flags --sae and --vlsae-*")
        current = ""  # guard settings only: paths (sae, log) are not the client's business
        if bare in GuardConfig.model_fields:
            current = f"; this server runs with {bare}={_short(getattr(self.guard, bare))}"
        elif bare == "default":
            current = f"; this server's default is {'on' if self.default else 'off'}"
        return (
            f"mm_processor_kwargs[{_short(key)}]: a server setting, fixed when the server "
            f"starts ({source}){current}; a request may set only {REQUEST_KEY!r}: true or false"
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServeSettings:
        """Read and validate the ``VLSAE_GUARD_*`` variables (``os.environ`` by default)."""
        env = {k: v for k, v in (os.environ if environ is None else environ).items() if v != ""}
        ours = {k: v for k, v in env.items() if k.startswith(PREFIX)}
        unknown = sorted(set(ours) - set(KNOWN))
        if unknown:
            raise PluginConfigError(
                f"unknown environment variable(s) {', '.join(unknown)}; known: {', '.join(KNOWN)}"
            )
        if ours and ENV_SAE not in ours:
            raise PluginConfigError(
                f"{', '.join(sorted(ours))} set but {ENV_SAE} is not: the guard needs the SAE "
                "checkpoint directory (without it the plugin changes nothing)"
            )
        if ENV_METHOD in ours:
            if ENV_REWRITE in ours:
                raise PluginConfigError(f"set {ENV_REWRITE} only ({ENV_METHOD} is its old name)")
            warnings.warn(f"{ENV_METHOD} is deprecated: use {ENV_REWRITE}", FutureWarning, 2)
        guard = _read_config(ours[ENV_CONFIG]) if ENV_CONFIG in ours else {}
        guard.update({field: ours[var] for var, field in _FIELD_ENV.items() if var in ours})
        values = {
            "sae": ours.get(ENV_SAE),
            "guard": guard,
            "default": ours.get(ENV_DEFAULT, True),
            "dtype": ours.get(ENV_DTYPE, "float32"),
            "log": ours.get(ENV_LOG),
            "allow_request_kwargs": ours.get(ENV_ALLOW, False),
        }
        try:
            return cls(**values)
        except ValidationError as e:
            names = {"sae": ENV_SAE, "default": ENV_DEFAULT, "dtype": ENV_DTYPE, "log": ENV_LOG}
            names["allow_request_kwargs"] = ENV_ALLOW
            names.update(
                {f"guard.{f}": f"{ENV_CONFIG} field {f}" for f in GuardConfig.model_fields}
            )
            names.update({f"guard.{f}": var for var, f in _FIELD_ENV.items() if var in ours})
            names["guard"] = ENV_CONFIG
            raise PluginConfigError(
                f"invalid {PREFIX}* settings\n{describe_validation_error(e, names)}"
            ) from e

    def to_env(self) -> dict[str, str]:
        """The variables that make :meth:`from_env` return these settings (all of them set)."""
        if not self.enabled:
            return {}
        env = {
            ENV_SAE: self.sae,
            ENV_CONFIG: self.guard.model_dump_json(exclude_unset=True),
            ENV_DEFAULT: "on" if self.default else "off",
            ENV_DTYPE: self.dtype,
            ENV_ALLOW: "on" if self.allow_request_kwargs else "off",
        }
        if self.log is not None:
            env[ENV_LOG] = str(self.log)
        return env


def _describe(value: object) -> str:
    """A found value in JSON's words; NaN and null are named, as encoders treat them apart."""
    if value is None:
        return "null"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    return _short(value)


def clean_env(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without any ``VLSAE_GUARD_*`` variable (for an unguarded engine)."""
    return {k: v for k, v in environ.items() if not k.startswith(PREFIX)}


def _read_config(value: str) -> dict:
    """GuardConfig fields from inline JSON (``{...}``) or a JSON/YAML file."""
    text, where = value, f"{ENV_CONFIG} (inline JSON)"
    if not value.lstrip().startswith("{"):
        path = Path(value)
        if not path.is_file():
            raise PluginConfigError(
                f"{ENV_CONFIG}={value}: expected a JSON/YAML file or inline JSON"
            )
        text, where = path.read_text(), f"{ENV_CONFIG} file {path}"
    import yaml

    try:
        data = yaml.safe_load(text) if where.endswith((".yaml", ".yml")) else json.loads(text)
    except (ValueError, yaml.YAMLError) as e:
        raise PluginConfigError(f"{where}: cannot parse: {e}") from e
    if not isinstance(data, dict):
        raise PluginConfigError(f"{where}: expected a mapping of guard settings, found {data!r}")
    return data
