"""Settings that people write, records the package writes, and validation errors as people read
them.

:class:`Settings` is the base of every settings model (flags, files, environment variables):
an unknown field is refused rather than ignored, and every number must be finite (NaN and inf
are typos, never settings). :class:`Record` is the base of the files the package writes.
:func:`describe_validation_error` gives one line per problem, naming the field (or the flag or
variable a caller shows instead), what was expected and what was found.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, ValidationError


class Settings(BaseModel):
    """Base of the settings models: unknown fields refused, numbers finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class FrozenSettings(Settings):
    """:class:`Settings` that cannot change once validated (hashable, safe to share)."""

    model_config = ConfigDict(frozen=True)


class Record(BaseModel):
    """Base of what the package writes and reads back (manifests, catalogs, checkpoint configs):
    unknown fields refused; a recorded statistic may be NaN where it is undefined."""

    model_config = ConfigDict(extra="forbid")


class FrozenRecord(Record):
    """A :class:`Record` that cannot change once validated."""

    model_config = ConfigDict(frozen=True)


def describe_validation_error(
    error: ValidationError, names: Mapping[str, str] | None = None
) -> str:
    """One line per problem: field path, what was expected, what was found.

    ``names`` renames dotted field paths ("" for the model itself) for the reader: the CLI
    shows its flags instead.
    """
    lines = []
    for err in error.errors():
        path = ".".join(str(p) for p in err["loc"])
        where = names[path] if names and path in names else f"field {path or '(top level)'}"
        found = err.get("input")
        found = "" if isinstance(found, dict) else f" (found {found!r})"
        lines.append(f"  {where}: {err['msg']}{found}")
    return "\n".join(lines)
