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


def test_paper_mode_flags_set_every_paper_setting():
    argv = ["--vlsae-guard", "sae", "--vlsae-mode", "paper", "--vlsae-layer", "30"]
    config = settings_from_args(
        parse(
            *argv,
            *("--vlsae-point", "input", "--vlsae-beta", "0.5", "--vlsae-c-alpha", "0.4"),
            *("--vlsae-c-beta", "0.7", "--vlsae-exact", "--vlsae-sae-dtype", "float16"),
            *("--vlsae-topk-ties", "official"),
        )
    )
    assert config == GuardConfig(
        mode="paper",
        layer=30,
        point="input",
        beta=0.5,
        c_alpha=0.4,
        c_beta=0.7,
        exact=True,
        sae_dtype="float16",
        topk_ties="official",
    )
    # Unset flags leave GuardConfig's defaults (and set no field).
    assert settings_from_args(parse(*argv)).model_fields_set == {"mode", "layer", "alpha"}


PAPER = ["--vlsae-mode", "paper", "--vlsae-layer", "3"]


@pytest.mark.parametrize(
    "argv, match",
    [
        ([*PAPER, "--vlsae-beta", "1.5"], "--vlsae-beta: Input should be less than or equal"),
        ([*PAPER, "--vlsae-c-beta", "0"], "--vlsae-c-beta: Input should be greater than 0"),
        ([*PAPER, "--vlsae-c-alpha", "nan"], "--vlsae-c-alpha: "),
        (["--vlsae-topk-ties", "official"], r"\['topk_ties'\] do not apply to mode 'projector'"),
        (["--vlsae-sae-dtype", "float16"], r"\['sae_dtype'\] do not apply to mode 'projector'"),
        (["--vlsae-exact"], r"\['exact'\] do not apply to mode 'projector'"),
    ],
)
def test_paper_mode_flags_are_validated_by_guard_config(argv, match):
    with pytest.raises(GuardFlagsError, match=match):
        settings_from_args(parse("--vlsae-guard", "sae", *argv))


def test_paper_flag_help_shows_guard_configs_defaults():
    parser = argparse.ArgumentParser()
    add_guard_flags(parser)
    helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings}
    for field in ("point", "beta", "c_alpha", "c_beta", "topk_ties"):
        flag = "--vlsae-" + field.replace("_", "-")
        default = GuardConfig.model_fields[field].default
        assert helps[flag].startswith("paper mode: ")
        assert helps[flag].endswith(f"(default: {default:g})" if isinstance(default, float)
                                    else f"(default: {default})")  # fmt: skip
    assert helps["--vlsae-sae-dtype"].endswith("(default: as loaded)")
