"""``presets.official``: the released VL-SAE scripts' protocol as field overrides."""

from __future__ import annotations

import pytest

from vlsae_guard import GuardConfig
from vlsae_guard.backends import IMAGE_ASPECTS
from vlsae_guard.harness import presets
from vlsae_guard.harness.config import ChairRunConfig, PopeRunConfig
from vlsae_guard.scoring import pope

# Overrides of fields the harness does not have yet (it adds them when it wires the preset).
NOT_YET_FIELDS = {"top_k", "image_aspect"}


@pytest.mark.parametrize(
    "benchmark, config, alpha, tokens",
    [("pope", PopeRunConfig, 0.8, 1024), ("chair", ChairRunConfig, 0.7, 512)],
)
def test_official_is_the_released_scripts_protocol(benchmark, config, alpha, tokens, tmp_path):
    preset = presets.official(benchmark)
    run, guard = presets.split(preset)
    assert guard == {
        "mode": "paper",
        "layer": 30,
        "point": "output",
        "alpha": alpha,
        "beta": 0.9,
        "c_alpha": 0.6,
        "c_beta": 0.8,
        "sae_dtype": "float16",
        "topk_ties": "official",
    }
    expected = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": 55, "dtype": "float16"}
    expected |= {"max_new_tokens": tokens, "image_aspect": "crop"}
    if benchmark == "pope":
        expected["prompt"] = "vcd"
    assert run == expected
    # Every value validates where it goes; only the fields the harness lacks are left over.
    settings = GuardConfig(**guard)
    known = {k: v for k, v in run.items() if k in config.model_fields}
    assert set(run) - set(known) <= NOT_YET_FIELDS
    built = config(model="m", sae="s", guard=settings, out=tmp_path, **known)
    assert built.guard == settings and built.max_new_tokens == tokens
    assert run["image_aspect"] in IMAGE_ASPECTS


def test_the_pope_prompt_is_the_scripts():
    style = presets.official("pope")["prompt"].value
    assert pope.build_prompt("Is there a dog?", style) == (
        "Is there a dog? Please answer this question with one word."
    )


def test_the_guard_differs_from_paper_modes_defaults_only_where_the_scripts_do():
    _, guard = presets.split(presets.official("chair"))
    ours = GuardConfig(mode="paper", layer=30).model_dump()
    theirs = GuardConfig(**guard).model_dump()
    assert {k for k in ours if ours[k] != theirs[k]} == {"alpha", "sae_dtype", "topk_ties"}


@pytest.mark.parametrize("benchmark", ["pope", "chair"])
def test_every_override_says_why_in_one_line(benchmark):
    for key, override in presets.official(benchmark).items():
        assert override.reason and "\n" not in override.reason, key


def test_unknown_benchmarks_are_refused():
    with pytest.raises(ValueError, match="expected 'pope' or 'chair'"):
        presets.official("mme")
