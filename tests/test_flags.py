"""Guard flags shared by the CLI, the benchmarks and the patched LLaVA scripts."""

import argparse

import pytest

from vlsae_guard import GuardConfig
from vlsae_guard.cli.guard_flags import (
    GuardFlagsError,
    add_guard_flags,
    guard_config,
    settings_from_args,
)


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
        "--vlsae-rewrite",
        "edit",
        "--vlsae-alpha",
        "0.3",
        "--vlsae-text-grounded",
        "--vlsae-steer",
        '{"7": 1.5}',
    )
    assert settings_from_args(args) == GuardConfig(
        rewrite="edit", alpha=0.3, text_grounded=True, steer={7: 1.5}
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
def test_bad_settings_raise_with_a_message(argv, match):
    with pytest.raises(GuardFlagsError, match=match):
        settings_from_args(parse("--vlsae-guard", "sae", *argv))


def test_invalid_flags_are_a_library_error_not_an_exit():
    with pytest.raises(ValueError) as error:  # GuardFlagsError is a ValueError, not SystemExit
        settings_from_args(parse("--vlsae-guard", "sae", "--vlsae-alpha", "2"))
    assert type(error.value) is GuardFlagsError
    assert str(error.value).startswith("invalid --vlsae-* settings\n  --vlsae-alpha: ")
    with pytest.raises(GuardFlagsError, match="--vlsae-alpha"):  # also without a checkpoint
        guard_config(parse("--vlsae-alpha", "2"))


def test_the_old_name_method_still_works_with_a_warning():
    with pytest.warns(FutureWarning, match="rewrite='edit'"):
        old = settings_from_args(parse("--vlsae-guard", "sae", "--vlsae-method", "edit"))
    assert old == GuardConfig(rewrite="edit")
    with pytest.warns(FutureWarning):
        assert GuardConfig(method="edit", alpha=0.2) == GuardConfig(rewrite="edit", alpha=0.2)
    with pytest.raises(ValueError, match="give rewrite= only"):
        GuardConfig(method="edit", rewrite="replace")
    assert "rewrite" in GuardConfig().model_dump() and "method" not in GuardConfig().model_dump()
