"""The ``vlsae-guard`` command line (``python -m vlsae_guard.cli``)."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status. Imported lazily: the benchmarks share the guard
    flags (:mod:`.guard_flags`) without loading every command."""
    from .app import main as run

    return run(argv)
