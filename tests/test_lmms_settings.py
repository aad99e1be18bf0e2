"""vlsae_llava's --model_args and lmms-eval's generation_kwargs, read without lmms-eval."""

from __future__ import annotations

import pytest

from vlsae_guard.core.intervention import GuardConfig
from vlsae_guard.lmms_eval.settings import cut, decoding_of, read_model_args


def test_model_args_split_into_ours_and_the_methods():
    config, settings = read_model_args({"pretrained": "m", "sae": "s", "alpha": 0.25})
    assert config.arm == "vlsae" and isinstance(settings, GuardConfig) and settings.alpha == 0.25
    config, settings = read_model_args({"pretrained": "m", "sae": "s", "mode": "paper", "layer": 1})
    assert config.arm == "paper" and settings.layer == 1
    config, _ = read_model_args({"pretrained": "m"})
    assert config.arm == "none" and config.backend == "hf"
    config, settings = read_model_args({"pretrained": "m", "method": "vcd", "alpha": 2.0})
    assert config.arm == "vcd" and settings.alpha == 2.0
    # lmms-eval hands JSON values over as text
    steer = {"pretrained": "m", "sae": "s", "site": "vision_tower:0", "steer": '{"30": 131.5}'}
    _, settings = read_model_args(steer)
    assert settings.steer == {30: 131.5} and settings.site == "vision_tower:0"


@pytest.mark.parametrize(
    "args, message",
    [
        ({"pretrained": "m", "method": "vlsae"}, "method 'vlsae' needs sae=DIR"),
        ({"pretrained": "m", "alfa": 0.5}, "alfa"),  # none takes no settings: the typo is named
        ({"pretrained": "m", "sae": "s", "alpha": 7}, "less than or equal to 1"),
        ({"pretrained": "m", "method": "vcd", "backend": "vllm"}, "backend vllm runs"),
        ({"pretrained": "m", "backend": "tgi"}, "field backend"),
        ({"sae": "s"}, "field pretrained"),
        ({"pretrained": "m", "sae": "s", "steer": "{30: 1}"}, "steer: not valid JSON"),
    ],
)
def test_bad_model_args_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        read_model_args(args)


def test_generation_kwargs_become_the_harness_decoding():
    greedy, until = decoding_of(
        {"max_new_tokens": 16, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False}
    )
    assert greedy.kwargs() == {"do_sample": False, "num_beams": 1, "max_new_tokens": 16}
    assert until == []
    sampled, until = decoding_of(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "until": "\n\n"}
    )
    assert (sampled.temperature, sampled.top_p, sampled.top_k) == (0.7, 0.9, 5)
    assert until == ["\n\n"]
    with pytest.raises(ValueError, match="num_beams must be 1"):
        decoding_of({"num_beams": 3})
    with pytest.raises(ValueError, match=r"\['repetition_penalty'\]"):
        decoding_of({"repetition_penalty": 1.2})


def test_answers_stop_at_the_first_stop_string():
    assert cut("Yes.\n\nBecause", ["\n\n"]) == "Yes."
    assert cut("  No  ", []) == "No"
    assert cut("a</s>b", ["", "</s>"]) == "a"
