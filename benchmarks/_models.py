"""Model sizes shared by the benchmark scripts (imported as a sibling: run them as scripts)."""

from __future__ import annotations

import argparse


def llava_shaped_sizes(args: argparse.Namespace) -> dict[str, int]:
    """``vlsae_guard.lab.tiny.build_hf_llava`` sizes from the common flags (head_dim 32)."""
    return dict(
        image_size=args.image_size,
        patch_size=args.patch_size,
        text_hidden=args.text_hidden,
        text_intermediate=4 * args.text_hidden,
        text_layers=args.text_layers,
        text_heads=args.text_hidden // 32,
    )
