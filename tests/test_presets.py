"""--preset official: the VL-SAE release's protocol fills what the command line leaves unset,
is recorded with its reasons, and runs through the harness (sampled, batch == batch size 1)."""

from __future__ import annotations

import pytest
from _pope import answers, run

from vlsae_guard.cli import bench_flags
from vlsae_guard.core.intervention import GuardConfig
from vlsae_guard.harness import presets
from vlsae_guard.harness.common import BenchmarkError
from vlsae_guard.harness.config import ChairRunConfig, PopeRunConfig

BASE = ["--model", "m", "--sae", "s", "--questions", "q", "--out", "out"]


def config(*argv):
    return bench_flags.pope_config(bench_flags.pope_parser().parse_args([*BASE, *argv]))


def test_the_preset_fills_what_the_flags_leave_unset():
    c = config("--preset", "official", "--vlsae-alpha", "0.5", "--temperature", "0.7")
    assert (c.method, c.arms, c.seed, c.top_k, c.top_p) == ("paper", ("paper",), 55, 0, 1.0)
    assert (c.max_new_tokens, c.prompt, c.image_aspect, c.dtype) == (1024, "vcd", "crop", "float16")
    assert c.temperature == 0.7 and c.guard.alpha == 0.5  # given: they win
    want = GuardConfig(mode="paper", layer=30, point="output", alpha=0.5, beta=0.9, c_alpha=0.6,
                       c_beta=0.8, sae_dtype="float16", topk_ties="official")  # fmt: skip
    assert c.guard == want
    record = c.preset_record()["fields"]
    assert record["temperature"]["value"] == 1.0 and record["temperature"]["used"] == 0.7
    assert record["guard.beta"] == {"value": 0.9, "reason": record["guard.beta"]["reason"],
                                    "used": 0.9}  # fmt: skip
    assert all(f["reason"] for f in record.values())


def test_a_flag_given_at_its_default_still_wins():
    """--temperature 0 is the flag's default; given explicitly it must not become the preset's 1."""
    assert config("--preset", "official", "--temperature", "0").temperature == 0.0
    assert config("--preset", "official").temperature == 1.0


def test_the_chair_preset_has_its_own_numbers(tmp_path):
    chair = ChairRunConfig(model="m", sae="s", out=tmp_path, preset="official")
    assert chair.max_new_tokens == 512 and chair.guard.alpha == 0.7
    pope = PopeRunConfig(model="m", sae="s", out=tmp_path, preset="official", guard={"layer": 1})
    assert pope.guard.layer == 1 and pope.guard.alpha == 0.8
    assert set(presets.official("chair")) == set(presets.official("pope")) - {"prompt"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "official", "--method", "vcd"], "paper mode's protocol, not --method vcd"),
        (["--preset", "official", "--vlsae-beta", "2"], "--vlsae-beta: Input should be less"),
        (
            ["--preset", "official", "--backend", "vllm"],
            "runs none, vlsae, cue-mask only, not paper",
        ),
    ],
)
def test_what_the_preset_cannot_run_is_refused(argv, message):
    with pytest.raises(BenchmarkError, match=message):
        config(*argv)


def test_a_guard_config_object_cannot_carry_a_preset(tmp_path):
    with pytest.raises(ValueError, match="give guard as a dict"):
        PopeRunConfig(model="m", sae="s", out=tmp_path, preset="official", guard=GuardConfig())


@pytest.mark.filterwarnings("ignore::vlsae_guard.GuardFitWarning")
def test_the_official_protocol_runs_sampled_and_batch_invariant(pope_inputs, tiny_hf_dir, tmp_path):
    """The tiny model has 2 layers and runs in float32 here; the rest is the preset's."""
    argv = ["--preset", "official", "--sae", str(pope_inputs / "sae"), "--vlsae-layer", "1",
            "--dtype", "float32", "--max-new-tokens", "6"]  # fmt: skip
    one = run(pope_inputs, tiny_hf_dir, tmp_path / "one", *argv, "--batch-size", "1")
    run(pope_inputs, tiny_hf_dir, tmp_path / "many", *argv, "--batch-size", "3")
    settings = one["settings"]
    assert settings["preset"]["name"] == "official" and settings["image_aspect"] == "crop"
    assert settings["decoding"]["strategy"] == "sampling" and settings["decoding"]["top_k"] == 0
    assert settings["guard"]["topk_ties"] == "official" and settings["seed"] == 55
    texts = {d: [a["text"] for a in answers(tmp_path / d, "paper")] for d in ("one", "many")}
    assert texts["one"] == texts["many"] and len(set(texts["one"])) > 1
