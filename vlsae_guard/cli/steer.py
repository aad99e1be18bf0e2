"""``vlsae-guard steer-score``: the steering score of Pach et al. (2025) for a vision-encoder SAE
(:mod:`vlsae_guard.concepts.steer_score`), written with what decides its numbers."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..concepts.steer_score import SteerScoreConfig
from ..outputs import check_writable, refuse_non_empty
from .app import Arg, UsageError, field_arg, field_choices, subcommand, validated, write_json
from .checkpoints import OVERWRITE

RESULTS = "steer_score.json"


def _field(name: str, *flags: str, **kwargs) -> Arg:
    """A flag setting a :class:`SteerScoreConfig` field; omitted, the field's default holds."""
    return field_arg(SteerScoreConfig, name, *flags, **kwargs)


@subcommand(
    "steer-score",
    "how well clamping a vision-tower SAE concept makes LLaVA name its images (CLIP-scored)",
    _field("model", "--model", required=True, help="LLaVA checkpoint folder or Hub id"),
    _field("sae", "--sae", required=True, metavar="DIR", help="SAE trained at vision_tower:L"),
    _field("scorer", "--scorer", required=True, metavar="DIR",
           help="CLIP model folder (transformers CLIPModel, its tokenizer and image processor; "
           "the paper: openai/clip-vit-base-patch32)"),
    _field("images", "--images", required=True, type=Path, metavar="DIR|FILE",
           help='where each concept\'s top images are found: a folder of images (recursively) '
           'or JSON lines {"image": path[, "id": ...]}, paths relative to the file'),
    _field("steer_images", "--steer-images", type=Path, metavar="DIR|FILE",
           help="the images answered with and without steering", unset="--images"),
    _field("concepts", "--concepts", type=int, nargs="+", metavar="K", help="these concepts",
           unset="the --top most active"),
    _field("top", "--top", type=int,
           help="without --concepts: the concepts most active on the CLS token of --images"),
    _field("value", "--value", type=float, help="the clamped concept's activation"),
    _field("pre_zero", "--pre-zero", action="store_true", default=None,
           help="zero every other concept first (the paper's pre_zero)"),
    _field("keep_error", "--keep-error", action="store_true", default=None,
           help="add back the SAE's error, so only the clamp changes the tokens"),
    _field("site", "--site", metavar="vision_tower:L", help="where to steer",
           unset="the SAE's training site"),
    _field("prompt", "--prompt", help="the question; the answer's first word is scored"),
    _field("top_images", "--top-images", type=int, help="images that define a concept"),
    _field("max_new_tokens", "--max-new-tokens", type=int, help="greedy decoding"),
    _field("batch_size", "--batch-size", type=int),
    _field("dtype", "--dtype", choices=field_choices(SteerScoreConfig, "dtype")),
    _field("device", "--device", help="cpu, cuda, cuda:1, ..."),
    _field("seed", "--seed", type=int),
    _field("out", "--out", type=Path, metavar="DIR", help=f"where {RESULTS} goes"),
    OVERWRITE,
)  # fmt: skip
def steer_score_command(args: argparse.Namespace) -> None:
    """For each concept: its top images by activation on the CLS token at the SAE's site, and
    their mean CLIP image embedding r_j; each steer image answered "What is shown in this image?
    Use exactly one word!" with the concept clamped (the guard at vision_tower:L) and without.
    Score = mean cos(CLIP text embedding of the steered word, r_j) minus the same for the
    unsteered word, over concepts and images (Pach et al., 2025, steering_score.py)."""
    from ..concepts.pooled import ConceptsError
    from ..concepts.steer_score import steer_score
    from ..core.guard import GuardError

    given = {f: v for f in SteerScoreConfig.model_fields if (v := getattr(args, f)) is not None}
    config = validated(SteerScoreConfig, "arguments", across="--concepts/--top", **given)
    refuse_non_empty(config.out, args.overwrite)
    check_writable(config.out)
    try:
        result = steer_score(config)
    except (ConceptsError, GuardError) as e:
        raise UsageError(str(e)) from e
    for c in result.concepts:
        level = "" if c.group is None else f"  group {c.group}"
        word = max(set(c.words), key=c.words.count)
        print(
            f"concept {c.concept:>6}{level}  steered {c.cos_steered:.4f}  unsteered "
            f"{c.cos_unsteered:.4f}  difference {c.difference:+.4f}  most said {word!r}"
        )
    print(
        f"steering score {result.score:+.4f} over {len(result.concepts)} concepts and "
        f"{len(result.steer_images)} images (steered {result.cos_steered:.4f}, unsteered "
        f"{result.cos_unsteered:.4f})"
    )
    write_json(config.out / RESULTS, _record(config) | {"result": result.model_dump(mode="json")})


def _record(config: SteerScoreConfig) -> dict:
    """What decides the numbers: the checkpoints' hashes, the settings, decoding, versions."""
    from .. import provenance
    from ..core.checkpoint import resolve
    from ..harness.common import resolve_model

    return {
        "command": "steer-score",
        "paper": "Pach et al. (2025), Sparse Autoencoders Learn Monosemantic Features in "
        "Vision-Language Models (ExplainableML/sae-for-vlm, steering_score.py)",
        "settings": config.model_dump(mode="json"),
        "model_sha256": provenance.sha256_dir(resolve_model(config.model)),
        "sae_sha256": provenance.sha256_dir(resolve(config.sae)),
        "scorer_sha256": provenance.sha256_dir(config.scorer),
        "prompt": config.prompt,
        "decoding": config.decoding.describe(),
        "environment": provenance.environment(),
    }
