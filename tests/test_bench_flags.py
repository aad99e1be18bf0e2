"""The benchmark scripts' flags and the run configs the harness takes: one set of defaults, the
same checks, and errors that name the flags."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from vlsae_guard import GuardConfig
from vlsae_guard.cli import bench_flags
from vlsae_guard.cli.guard_flags import guard_config
from vlsae_guard.harness.common import BenchmarkError
from vlsae_guard.harness.config import ChairRunConfig, PopeRunConfig
from vlsae_guard.lab.demo import DemoConfig

ROOT = Path(__file__).resolve().parents[1]
NOT_FLAGS = {"guard", "command", "method_settings"}  # --vlsae-*, argv, --{method}-* flags


def field_flags(parser: argparse.ArgumentParser, config) -> dict[str, argparse.Action]:
    actions = {bench_flags.DESTS.get(a.dest, a.dest): a for a in parser._actions}
    return {name: actions[name] for name in config.model_fields if name in actions}


@pytest.mark.parametrize(
    "parser, config",
    [(bench_flags.pope_parser, PopeRunConfig), (bench_flags.chair_parser, ChairRunConfig)],
    ids=["pope", "chair"],
)
def test_every_field_has_a_flag_whose_default_is_the_fields(parser, config):
    flags = field_flags(parser(), config)
    assert set(flags) == set(config.model_fields) - NOT_FLAGS
    for name, action in flags.items():
        field = config.model_fields[name]
        expected = None if field.is_required() else field.get_default(call_default_factory=True)
        assert action.default == expected, name
    assert flags["max_new_tokens"].default == {PopeRunConfig: 128, ChairRunConfig: 512}[config]


def test_no_guard_flags_mean_the_guards_defaults():
    args = bench_flags.pope_parser().parse_args(["--out", "o"])
    assert guard_config(args) == GuardConfig()
    assert bench_flags.demo_config(args) == DemoConfig(out=Path("o"))
    assert bench_flags.demo_config(bench_flags.pope_parser().parse_args([])).out == Path(
        "runs/demo"
    )


def test_flags_and_fields_build_the_same_config(tmp_path):
    argv = ["--model", "m", "--sae", "s", "--ab", "--vlsae-alpha", "0.3", "--questions", "q"]
    argv += ["--batch-size", "2", "--limit", "5", "--out", str(tmp_path), "--strict"]
    from_flags = bench_flags.pope_config(bench_flags.pope_parser().parse_args(argv))
    typed = PopeRunConfig(
        model="m", sae="s", ab=True, guard=GuardConfig(alpha=0.3), questions=["q"],
        batch_size=2, limit=5, out=tmp_path, strict=True,
    )  # fmt: skip
    assert from_flags == typed
    assert typed.prompt_format == "llava" and typed.arms == ("none", "vlsae")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"ab": True}, "--ab compares none with a method"),
        ({"ab": ("vlsae", "paper"), "sae": "s"}, "one SAE method per run"),
        ({"method": "vlsae"}, "--method vlsae needs --sae DIR"),
        ({"method": "vcd", "sae": "s"}, "--sae is used by vlsae, paper, cue-mask, not by vcd"),
        ({"method": "vcd", "method_settings": {"vcd": {"alpha": -1}}}, "invalid vcd settings"),
        ({"method": "paper", "sae": "s", "guard": GuardConfig()}, "runs the guard in mode"),
        ({"guard": GuardConfig()}, "guard settings (--vlsae-*) need --sae DIR"),
        ({"engine_args": [1]}, "--engine-args: expected a JSON object, found [1]"),
        ({"backend": "llava", "prompt_format": "chat-template"}, "LLaVA's own conversation"),
        ({"backend": "vllm", "sae": "s", "guard": GuardConfig(text_grounded=True)}, "projector"),
    ],
)
def test_typed_configs_refuse_what_cannot_run(fields, message, tmp_path):
    with pytest.raises(ValidationError, match=re.escape(message)):
        PopeRunConfig(model="m", out=tmp_path, **fields)


def test_a_guarded_config_without_guard_settings_gets_the_defaults(tmp_path):
    config = ChairRunConfig(model=tmp_path, sae=tmp_path / "sae", out=tmp_path)
    assert config.guard == GuardConfig() and config.arms == ("vlsae",)
    assert config.model == str(tmp_path) and config.max_new_tokens == 512
    assert PopeRunConfig(backend="openai", base_url="http://x/v1", out=tmp_path).prompt_format == (
        "chat-template"
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "m", "--batch-size", "0", "--out", "o"], "--batch-size: Input should be"),
        (["--model", "m"], "--out is required"),
        (["--out", "o"], "--model is required"),
        (["--model", "m", "--out", "o", "--limit", "0"], "(found 0)"),
    ],
)
def test_flag_errors_name_the_flag(argv, message):
    with pytest.raises(BenchmarkError, match=re.escape(message)):
        bench_flags.pope_config(bench_flags.pope_parser().parse_args(argv))


@pytest.mark.parametrize("script", ["pope", "chair"])
def test_scripts_report_bad_flags_in_one_line_and_exit_2(script, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        f"flags_{script}", ROOT / f"benchmarks/{script}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--model", "m", "--out", str(tmp_path), "--sae", "s"]
    assert module.main([*argv, "--batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"benchmarks/{script}.py: error: --batch-size: Input should be")
    assert err.count("\n") == 1
    assert module.main([*argv, "--vlsae-alpha", "2"]) == 2  # the guard flags' own error
    err = capsys.readouterr().err
    assert "invalid --vlsae-* settings" in err and "--vlsae-alpha" in err
    assert "Traceback" not in err


def test_an_openai_ab_compares_the_servers_guard_without_an_sae_here(tmp_path):
    """The server holds the SAE (serve --sae): --ab alone is none vs vlsae, no guard settings."""
    config = PopeRunConfig(backend="openai", base_url="http://x/v1", ab=True, out=tmp_path)
    assert config.arms == ("none", "vlsae") and config.guard is None
    assert config.settings_of("vlsae") is None
