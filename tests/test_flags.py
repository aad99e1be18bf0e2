"""Guard flags shared by the CLI, the benchmarks and the patched LLaVA scripts."""

import argparse

import pytest

from vlsae_guard import GuardConfig
from vlsae_guard.flags import add_guard_flags, settings_from_args


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_guard_flags(parser)
    return parser.parse_args(argv)


def test_no_guard_without_a_checkpoint():
    assert settings_from_args(parse("--vlsae-alpha", "0.3")) is None


def test_flags_become_a_validated_config():
    args = parse(
        "--vlsae-guard",
        "sae",
        "--vlsae-method",
        "edit",
        "--vlsae-alpha",
        "0.3",
        "--vlsae-text-grounded",
        "--vlsae-steer",
        '{"7": 1.5}',
    )
    assert settings_from_args(args) == GuardConfig(
        method="edit", alpha=0.3, text_grounded=True, steer={7: 1.5}
    )


def test_paper_mode_flags_get_paper_defaults():
    config = settings_from_args(
        parse("--vlsae-guard", "sae", "--vlsae-mode", "paper", "--vlsae-layer", "30")
    )
    assert config.mode == "paper" and config.layer == 30 and config.alpha == 0.8


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--vlsae-alpha", "2"], "alpha"),
        (["--vlsae-mode", "paper"], "needs layer"),
        (["--vlsae-steer", "{not json"], "vlsae"),
    ],
)
def test_bad_settings_exit_with_a_message(argv, match):
    with pytest.raises(SystemExit, match=match):
        settings_from_args(parse("--vlsae-guard", "sae", *argv))
