"""Validation errors as people read them: one line per problem, naming the field (or the flag or
variable a caller shows instead), what was expected and what was found."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import ValidationError


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
