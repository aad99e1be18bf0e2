"""The plugin's settings, read from the environment by every vLLM process.

vLLM runs the API server, the engine core and each worker in separate processes that inherit
the environment, so the settings travel as ``VLSAE_GUARD_*`` variables and each process
validates them itself. Without ``VLSAE_GUARD_SAE`` the plugin changes nothing.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..core.intervention import GuardConfig
from ..validation import describe_validation_error

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
KNOWN = (
    ENV_SAE, ENV_CONFIG, ENV_MODE, ENV_REWRITE, ENV_METHOD, ENV_ALPHA, ENV_DEFAULT, ENV_DTYPE,
    ENV_LOG,
)  # fmt: skip
_FIELD_ENV = {ENV_MODE: "mode", ENV_REWRITE: "rewrite", ENV_METHOD: "rewrite", ENV_ALPHA: "alpha"}

# The per-request switch: ``mm_processor_kwargs={"vlsae_guard": true|false}``.
REQUEST_KEY = "vlsae_guard"


class PluginConfigError(ValueError):
    """The ``VLSAE_GUARD_*`` settings are invalid; the message names the variables."""


class ServeSettings(BaseModel):
    """What the guarded vLLM model does; ``sae=None`` means nothing at all."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sae: str | None = None
    guard: GuardConfig = Field(default_factory=GuardConfig)
    default: bool = True  # guard requests that do not set mm_processor_kwargs["vlsae_guard"]
    dtype: Literal["float32", "model"] = "float32"
    log: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> ServeSettings:
        if self.guard.mode == "paper":
            raise ValueError(
                "mode 'paper' (decoder-layer shift with logit fusion) is not supported under "
                "vLLM; use mode 'projector' (the default)"
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

    def resolve_request(self, value: object) -> bool:
        """Whether a request's images are guarded, from its ``mm_processor_kwargs`` value."""
        if value is None:
            return self.enabled and self.default
        if not isinstance(value, bool):
            raise ValueError(
                f"mm_processor_kwargs[{REQUEST_KEY!r}] must be true or false, got {value!r}"
            )
        if value and not self.enabled:
            raise ValueError(
                f"mm_processor_kwargs[{REQUEST_KEY!r}] is true but this server has no guard: "
                f"start it with {ENV_SAE}=DIR (or `vlsae-guard serve MODEL --sae DIR`)"
            )
        return value

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
        }
        try:
            return cls(**values)
        except ValidationError as e:
            names = {"sae": ENV_SAE, "default": ENV_DEFAULT, "dtype": ENV_DTYPE, "log": ENV_LOG}
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
        }
        if self.log is not None:
            env[ENV_LOG] = str(self.log)
        return env


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
