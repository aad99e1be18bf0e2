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
    return 0


if __name__ == "__main__":
    sys.exit(main())
