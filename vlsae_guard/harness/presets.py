"""Presets: named sets of run and guard settings, each with the reason it has that value.

:func:`official` is the protocol of the VL-SAE paper's released evaluation scripts
(github.com/ssfgunner/VL-SAE, ``lvlms/VCD/experiments``: ``cd_scripts/llava1.5_{pope,chair}.sh``
and ``eval/inference_vlsae_llava_{pope,chair}.py``), for the released LLaVA-1.5-7B SAE. Keys are
:class:`~vlsae_guard.harness.config.RunConfig` field names, and ``guard.<field>`` for
:class:`~vlsae_guard.core.intervention.GuardConfig` ones; :func:`split` separates the two.
Nothing here reads flags or files: the benchmark scripts decide how a preset meets the user's
own flags.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

Benchmark = Literal["pope", "chair"]
SCRIPTS = "the released scripts (cd_scripts/llava1.5_{}.sh, eval/inference_vlsae_llava_{}.py)"


class Override(NamedTuple):
    """A preset's value for one field, and why (a source, in one line)."""

    value: Any
    reason: str


def official(benchmark: Benchmark) -> dict[str, Override]:
    """The official VL-SAE protocol's field overrides for ``benchmark`` ("pope" or "chair").

    ``top_k`` 0 means no top-k filtering; ``image_aspect`` is :func:`vlsae_guard.backends.load`'s
    option. Neither is a RunConfig field yet: the harness adds them.
    """
    if benchmark not in ("pope", "chair"):
        raise ValueError(f"benchmark {benchmark!r}: expected 'pope' or 'chair'")
    pope = benchmark == "pope"
    scripts = SCRIPTS.format(benchmark, benchmark)
    out = {
        "temperature": Override(1.0, f"sampling at temperature 1 ({scripts}: do_sample=True)"),
        "top_p": Override(1.0, "--top_p 1: nucleus filtering off"),
        "top_k": Override(
            0,
            "--top_k None reaches generate() as None: no top-k filtering (transformers' "
            "default would be 50)",
        ),
        "seed": Override(55, "seed=55 in the .sh scripts (transformers.set_seed)"),
        "max_new_tokens": Override(1024 if pope else 512, f"max_new_tokens in {scripts}"),
    }
    if pope:
        out["prompt"] = Override(
            "vcd",
            "the question + ' Please answer this question with one word.' (VCD's POPE prompt)",
        )
    out |= {
        "image_aspect": Override(
            "crop",
            "image_processor.preprocess(image): CLIP's resize and centre crop, not LLaVA-1.5's "
            "pad to a square",
        ),
        "dtype": Override("float16", "llava.model.builder.load_pretrained_model loads float16"),
        "guard.mode": Override("paper", "the paper's inference at a decoder layer, fused logits"),
        "guard.layer": Override(30, '--extract_layers "model.layers.30" (LLaVA-1.5-7B)'),
        "guard.point": Override(
            "output",
            "a forward hook on layer 30 edits its output (its collection read the layer's input)",
        ),
        "guard.alpha": Override(0.8 if pope else 0.7, f"modify_alpha in {scripts}"),
        "guard.beta": Override(0.9, "modify_beta=0.9 in the .sh scripts"),
        "guard.c_alpha": Override(0.6, "cd_alpha=0.6 in the .sh scripts"),
        "guard.c_beta": Override(0.8, "cd_beta=0.8 in the .sh scripts"),
        "guard.sae_dtype": Override("float16", "VL_SAE(...).half(), AuxiliaryAE(...).half()"),
        "guard.topk_ties": Override(
            "official",
            "--top_k_sae 256 by kthvalue threshold: a float16 tie at the k-th activation keeps "
            "fewer than 256",
        ),
    }
    return out


def split(preset: dict[str, Override]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(run fields, guard fields)`` of a preset, values only."""
    run = {k: o.value for k, o in preset.items() if not k.startswith("guard.")}
    guard = {k.removeprefix("guard."): o.value for k, o in preset.items() if k.startswith("guard.")}
    return run, guard
