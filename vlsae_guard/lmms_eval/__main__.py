"""``python -m vlsae_guard.lmms_eval --model vlsae_llava --model_args ... --tasks pope``:
lmms-eval's command line with the model registered first."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from lmms_eval.__main__ import cli_evaluate
    except ImportError as e:
        print(
            f"python -m vlsae_guard.lmms_eval: error: lmms-eval is not installed ({e}); "
            "pip install 'vlsae-guard[lmms]'",
            file=sys.stderr,
        )
        return 2
    from . import register

    register()
    cli_evaluate()
    write_provenance(sys.argv[1:])
    return 0


def write_provenance(argv: list[str]) -> None:
    """``OUTPUT_PATH/vlsae_llava.json``: what decided the answers of the vlsae_llava models of
    this run (lmms-eval's own results file records the model_args text only)."""
    import json
    from pathlib import Path

    from ..outputs import write_text
    from .model import PROVENANCE

    out = next((a.split("=", 1)[1] for a in argv if a.startswith("--output_path=")), None)
    if "--output_path" in argv[:-1]:
        out = argv[argv.index("--output_path") + 1]
    if out and PROVENANCE:
        write_text(Path(out) / "vlsae_llava.json", json.dumps(PROVENANCE, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
