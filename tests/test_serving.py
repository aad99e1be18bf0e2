"""The vLLM integration's parts that need no vLLM: settings, row routing, the serve command.

The engine itself is tested in ``test_vllm_*.py`` (``pytest -m vllm``, in ``.venv-vllm``).
"""

from __future__ import annotations

import base64
import io
import json
import shlex
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from vlsae_guard import VLSAE, SAEConfig, cli
from vlsae_guard.core.intervention import GuardConfig, ProjectorIntervention
from vlsae_guard.lab import tiny
from vlsae_guard.serving import client, plugin, routing
from vlsae_guard.serving.server import (
    DEFAULT_HOST,
    HOST_FLAG,
    TRUST_FLAG,
    ServeError,
    guarded_architecture,
    running_server,
    server_command,
)
from vlsae_guard.serving.settings import (
    ALLOW_FLAG,
    ENV_ALLOW,
    ENV_ALPHA,
    ENV_CONFIG,
    ENV_DEFAULT,
    ENV_METHOD,
    ENV_REWRITE,
    ENV_SAE,
    REQUEST_KEY,
    PluginConfigError,
    RequestKwargsError,
    ServeSettings,
)

HIDDEN = tiny.TinySizes().text_hidden


def make_sae(d_in=HIDDEN, **source) -> VLSAE:
    torch.manual_seed(0)
    config = SAEConfig(
        d_in=d_in, n_concepts=64, k=8, shared_concepts=list(range(0, 64, 2)), source=source
    )
    return VLSAE(config).eval()


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serving-sae")
    make_sae(site="projector").save_pretrained(directory)
    return directory


# --- settings --------------------------------------------------------------------------------


def test_no_environment_means_no_guard():
    settings = ServeSettings.from_env({"PATH": "/bin"})
    assert not settings.enabled
    assert settings.to_env() == {}
    assert settings.resolve_request(None) is False
    assert settings.resolve_request(False) is False


def test_a_guard_request_without_an_sae_is_refused():
    with pytest.raises(ValueError, match=ENV_SAE):
        ServeSettings().resolve_request(True)


def test_environment_variables_set_the_guard():
    settings = ServeSettings.from_env({ENV_SAE: "/sae", ENV_ALPHA: "0.3", ENV_REWRITE: "edit"})
    assert settings.enabled and settings.sae == "/sae"
    assert settings.guard == GuardConfig(alpha=0.3, rewrite="edit")
    assert settings.resolve_request(None) is True  # default on
    assert settings.resolve_request(False) is False


@pytest.mark.parametrize(("value", "expected"), [("off", False), ("0", False), ("on", True)])
def test_the_default_switch(value, expected):
    settings = ServeSettings.from_env({ENV_SAE: "/sae", ENV_DEFAULT: value})
    assert settings.resolve_request(None) is expected
    assert settings.resolve_request(True) is True


@pytest.mark.parametrize("value", ["yes", 1, "true", [True]])
def test_a_switch_must_be_a_json_bool(value):
    with pytest.raises(ValueError, match=f"{REQUEST_KEY}.*true or false"):
        ServeSettings(sae="/sae").resolve_request(value)


def test_config_inline_json_and_file_with_environment_overrides(tmp_path):
    inline = '{"alpha": 0.2, "steer": {"3": 1.5}, "shared_concepts": [1, 2]}'
    settings = ServeSettings.from_env({ENV_SAE: "/s", ENV_CONFIG: inline, ENV_ALPHA: "0.7"})
    assert settings.guard.alpha == 0.7  # the variable wins over the file
    assert settings.guard.steer == {3: 1.5} and settings.guard.shared_concepts == [1, 2]
    yaml_file = tmp_path / "guard.yaml"
    yaml_file.write_text("rewrite: edit\nalpha: 0.25\n")
    settings = ServeSettings.from_env({ENV_SAE: "/s", ENV_CONFIG: str(yaml_file)})
    assert (settings.guard.rewrite, settings.guard.alpha) == ("edit", 0.25)
    json_file = tmp_path / "guard.json"
    json_file.write_text('{"alpha": 0.1}')
    assert ServeSettings.from_env({ENV_SAE: "/s", ENV_CONFIG: str(json_file)}).guard.alpha == 0.1


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"VLSAE_GUARD_ALHPA": "0.5", ENV_SAE: "/s"}, "unknown environment variable.*ALHPA"),
        ({ENV_ALPHA: "0.5"}, f"{ENV_ALPHA} set but {ENV_SAE} is not"),
        ({ENV_SAE: "/s", ENV_ALPHA: "2"}, f"{ENV_ALPHA}: Input should be less than or equal"),
        ({ENV_SAE: "/s", ENV_REWRITE: "swap"}, f"{ENV_REWRITE}: Input should be 'replace'"),
        ({ENV_SAE: "/s", ENV_DEFAULT: "maybe"}, f"{ENV_DEFAULT}: Input should be a valid bool"),
        ({ENV_SAE: "/s", ENV_CONFIG: "/no/such/file"}, "expected a JSON/YAML file"),
        ({ENV_SAE: "/s", ENV_CONFIG: "{not json"}, "cannot parse"),
        ({ENV_SAE: "/s", ENV_CONFIG: '{"alpah": 1}'}, "alpah.*Extra inputs"),
        ({ENV_SAE: "/s", ENV_CONFIG: '{"mode": "paper", "layer": 3}'}, "mode 'paper'"),
        ({ENV_SAE: "/s", ENV_CONFIG: '{"text_grounded": true}'}, "text_grounded"),
    ],
)
def test_invalid_settings_name_the_variable(env, message):
    with pytest.raises(PluginConfigError, match=message):
        ServeSettings.from_env(env)


def test_to_env_round_trips():
    settings = ServeSettings(
        sae="/sae",
        guard=GuardConfig(rewrite="edit", alpha=0.4, steer={5: 2.0}, shared_concepts=[1, 7]),
        default=False,
        dtype="model",
        log="/tmp/log.jsonl",
        allow_request_kwargs=True,
    )
    env = settings.to_env()
    assert all(isinstance(v, str) for v in env.values())
    assert env[ENV_ALLOW] == "on"
    assert ServeSettings.from_env(env) == settings


def test_request_kwargs_are_refused_unless_allowed_by_default():
    env = ServeSettings(sae="/sae").to_env()
    assert env[ENV_ALLOW] == "off"
    assert ServeSettings.from_env(env).allow_request_kwargs is False
    assert ServeSettings.from_env({ENV_SAE: "/s"}).allow_request_kwargs is False
    with pytest.raises(PluginConfigError, match=f"{ENV_ALLOW}: Input should be a valid bool"):
        ServeSettings.from_env({ENV_SAE: "/s", ENV_ALLOW: "sometimes"})


# --- request kwargs ----------------------------------------------------------------------------

GUARDED = ServeSettings(sae="/sae", guard={"alpha": 0.3, "steer": {4: 1.0}})
ALLOWING = GUARDED.model_copy(update={"allow_request_kwargs": True})


def test_the_switch_is_the_only_request_kwarg_by_default():
    assert GUARDED.check_request({}) is True
    assert GUARDED.check_request({REQUEST_KEY: False}) is False
    assert GUARDED.model_copy(update={"default": False}).check_request({}) is False
    with pytest.raises(RequestKwargsError, match=f"'size'.*{ALLOW_FLAG}"):
        GUARDED.check_request({"size": {"shortest_edge": 56}, REQUEST_KEY: True})
    with pytest.raises(RequestKwargsError, match=f"media_io_kwargs.*image_mode.*{ALLOW_FLAG}"):
        GUARDED.check_request({}, {"image": {"image_mode": "L"}})


def test_the_operator_may_allow_other_processor_kwargs():
    assert ALLOWING.check_request({"size": {"shortest_edge": 56}, REQUEST_KEY: False}) is False
    assert ALLOWING.check_request({}, {"image": {"image_mode": "L"}}) is True
    # Without an SAE the classes are their parents: vLLM's own flag decides.
    assert ServeSettings().check_request({"size": {"shortest_edge": 56}}) is False


@pytest.mark.parametrize(
    ("key", "value", "flag", "current"),
    [
        ("alpha", float("nan"), "--vlsae-alpha", "alpha=0.3"),
        ("alpha", -1, "--vlsae-alpha", "alpha=0.3"),
        ("alpha", 1e308, "--vlsae-alpha", "alpha=0.3"),
        ("alpha", "abc", "--vlsae-alpha", "alpha=0.3"),
        ("steer", {str(i): 1.0 for i in range(200_000)}, "--vlsae-steer", "steer={4: 1.0}"),
        ("rewrite", "edit", "--vlsae-rewrite", "rewrite='replace'"),
        ("method", "edit", "--vlsae-rewrite", "rewrite='replace'"),
        ("mode", "paper", "--vlsae-mode", "mode='projector'"),
        ("shared_concepts", [1], ENV_CONFIG, "shared_concepts=None"),
        ("vlsae_alpha", 0.1, "--vlsae-alpha", "alpha=0.3"),
        ("VLSAE-GUARD-ALPHA", 0.1, "--vlsae-alpha", "alpha=0.3"),
        ("default", False, "--vlsae-default", "default is on"),
        ("sae", "/other", "--sae", ""),
        ("vlsae_strength", 1, "--vlsae-", ""),
        ("vlsae_asked_object", "kite", "--vlsae-", ""),  # cue masking's: the server sets it
        ("token_share", 0.5, ENV_CONFIG, "token_share=0.0"),
    ],
)
@pytest.mark.parametrize("settings", [GUARDED, ALLOWING], ids=["default", "allowing"])
def test_guard_settings_are_fixed_at_start(settings, key, value, flag, current):
    with pytest.raises(RequestKwargsError) as error:
        settings.check_request({key: value, REQUEST_KEY: True})
    message = str(error.value)
    assert f"[{key!r}]" in message and "server setting" in message and flag in message
    assert current in message and len(message) < 300
    assert "/sae" not in message  # paths are not the client's business


@pytest.mark.parametrize(
    ("value", "found"),
    [(float("nan"), "NaN"), (None, "null"), ("abc", "'abc'"), (1, "1"), ([True], "[True]")],
)
def test_the_switch_must_be_a_bool(value, found):
    with pytest.raises(RequestKwargsError) as error:
        GUARDED.check_request({REQUEST_KEY: value})
    assert str(error.value).endswith(f"[{REQUEST_KEY!r}]: expected true or false, found {found}")


def test_a_misspelled_switch_is_named():
    with pytest.raises(RequestKwargsError, match=f"spelled '{REQUEST_KEY}', found 'vlsae-guard'"):
        ALLOWING.check_request({"vlsae-guard": False})


# --- routing ------------------------------------------------------------------------------------


def test_crops_per_image_for_each_pixel_layout():
    assert routing.crops_per_image(torch.zeros(3, 3, 8, 8)) == [1, 1, 1]
    assert routing.crops_per_image(torch.zeros(2, 5, 3, 8, 8)) == [5, 5]
    assert routing.crops_per_image([torch.zeros(3, 8, 8)] * 2) == [1, 1]
    assert routing.crops_per_image([torch.zeros(5, 3, 8, 8), torch.zeros(3, 3, 8, 8)]) == [5, 3]
    assert routing.crops_per_image(None) is None
    assert routing.crops_per_image(torch.zeros(8, 8)) is None
    assert routing.crops_per_image([torch.zeros(3, 8, 8), torch.zeros(2, 3, 8, 8)]) is None


def test_image_flags_accepts_tensors_and_lists_and_checks_the_count():
    assert routing.image_flags(None, 3) is None
    flags = routing.image_flags(torch.tensor([1, 0, 1]), 3)
    assert flags.dtype == torch.bool and flags.tolist() == [True, False, True]
    listed = routing.image_flags([torch.tensor(True), torch.tensor(False)], None)
    assert listed.tolist() == [True, False]
    with pytest.raises(routing.ProjectorLayoutError, match="2 guard flags for 3 images"):
        routing.image_flags(torch.tensor([True, False]), 3)
    with pytest.raises(routing.ProjectorLayoutError, match="per-image guard flags"):
        routing.image_flags("yes", 1)


def test_token_mask_for_stacked_and_flattened_outputs():
    flags = torch.tensor([True, False, True])
    crops = [2, 1, 3]
    stacked = routing.token_mask(flags, crops, (6, 4, 8))
    expected = [True] * 8 + [False] * 4 + [True] * 12
    assert stacked.tolist() == expected
    assert routing.token_mask(flags, crops, (24, 8)).tolist() == expected


@pytest.mark.parametrize(
    ("shape", "message"),
    [((5, 4, 8), "5 rows .* account for 6"), ((25, 8), "not a multiple"), ((8,), "found shape")],
)
def test_token_mask_refuses_outputs_that_do_not_fit(shape, message):
    with pytest.raises(routing.ProjectorLayoutError, match=message):
        routing.token_mask(torch.tensor([True, False, True]), [2, 1, 3], shape)


def test_guard_rows_changes_exactly_the_selected_rows():
    sae = make_sae()
    intervention = ProjectorIntervention.build(sae, GuardConfig(alpha=0.8))
    output = torch.randn(3, 4, HIDDEN)
    mask = routing.token_mask(torch.tensor([True, False, True]), [1, 1, 1], output.shape)
    out = routing.guard_rows(intervention, output, mask)
    assert out.shape == output.shape
    assert torch.equal(out[1], output[1])  # the plain image: bit for bit
    for i in (0, 2):
        torch.testing.assert_close(out[i], intervention(output[i]))
        assert not torch.allclose(out[i], output[i])


def test_guard_rows_uses_one_call_when_all_or_none_are_selected():
    calls = []

    def guard(x):
        calls.append(x)
        return x + 1

    output = torch.zeros(2, 3, 4)
    assert routing.guard_rows(guard, output, torch.zeros(6, dtype=torch.bool)) is None
    assert calls == []
    assert torch.equal(
        routing.guard_rows(guard, output, torch.ones(6, dtype=torch.bool)), output + 1
    )
    assert len(calls) == 1 and calls[0] is output


def test_an_sae_frozen_into_buffers_computes_the_same():
    sae = make_sae()
    intervention = ProjectorIntervention.build(sae, GuardConfig(alpha=0.8))
    x = torch.randn(5, HIDDEN)
    before = intervention(x)
    frozen = routing.freeze_into_buffers(sae)
    assert list(frozen.parameters()) == []
    assert {n for n, _ in frozen.named_buffers()} >= {"encoder", "vision_decoder.weight"}
    assert frozen.state_dict() == {}  # non-persistent: nothing for a loader to expect
    assert frozen.dtype == torch.float32 and frozen.device.type == "cpu"
    assert torch.equal(ProjectorIntervention.build(frozen, GuardConfig(alpha=0.8))(x), before)


# --- plugin registration ---------------------------------------------------------------------


def test_register_is_idempotent_and_imports_no_model_code(monkeypatch):
    registered = {}

    class Registry:
        @staticmethod
        def get_supported_archs():
            return registered.keys()

        @staticmethod
        def register_model(name, target):
            assert name not in registered, f"{name} registered twice"
            registered[name] = target

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(ModelRegistry=Registry))
    monkeypatch.delitem(sys.modules, plugin.MODEL_MODULE, raising=False)
    plugin.register()
    plugin.register()
    assert registered == {
        "VLSAEGuardLlavaForConditionalGeneration": (
            "vlsae_guard.serving.model:VLSAEGuardLlavaForConditionalGeneration"
        ),
        "VLSAEGuardLlavaNextForConditionalGeneration": (
            "vlsae_guard.serving.model:VLSAEGuardLlavaNextForConditionalGeneration"
        ),
    }
    assert plugin.MODEL_MODULE not in sys.modules


def test_the_entry_point_is_installed():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "vlsae_guard"]
    assert ep.load() is plugin.register


# --- serve -----------------------------------------------------------------------------------


def test_server_command_binds_localhost_unless_the_operator_names_a_host():
    cmd = server_command("m", "A", ["--port", "1"], python="py")
    assert cmd[cmd.index(HOST_FLAG) + 1] == DEFAULT_HOST == "127.0.0.1"
    for given in (["--host", "0.0.0.0"], ["--host=0.0.0.0"]):
        cmd = server_command("m", "A", [*given, "--port", "1"], python="py")
        assert DEFAULT_HOST not in cmd and cmd[-3:] == [*given, "--port", "1"][-3:]
        assert sum(a.startswith(HOST_FLAG) for a in cmd) == 1


def test_server_command_adds_the_architecture_and_the_trust_flag():
    cmd = server_command("m", "Arch", ["--port", "1"], python="py")
    assert cmd[:5] == ["py", "-m", "vllm.entrypoints.openai.api_server", "--model", "m"]
    overrides = json.loads(cmd[cmd.index("--hf-overrides") + 1])
    assert overrides == {"architectures": ["Arch"]}
    assert cmd.count(TRUST_FLAG) == 1 and cmd[-2:] == ["--port", "1"]
    assert server_command("m", "A", [TRUST_FLAG], python="py").count(TRUST_FLAG) == 1


@pytest.mark.parametrize("form", ["separate", "equals"])
def test_server_command_merges_the_users_hf_overrides(form):
    value = '{"architectures": ["X"], "max_position_embeddings": 64}'
    args = ["--hf-overrides", value] if form == "separate" else [f"--hf-overrides={value}"]
    cmd = server_command("m", "Arch", [*args, "--port", "1"], python="py")
    assert cmd.count("--hf-overrides") == 1 and not any(
        a.startswith("--hf-overrides=") for a in cmd
    )
    merged = json.loads(cmd[cmd.index("--hf-overrides") + 1])
    assert merged == {"architectures": ["Arch"], "max_position_embeddings": 64}


def test_server_command_rejects_bad_hf_overrides():
    with pytest.raises(ServeError, match="JSON object"):
        server_command("m", "A", ["--hf-overrides", "[1]"])
    with pytest.raises(ServeError, match="needs a value"):
        server_command("m", "A", ["--hf-overrides"])


def test_guarded_architecture_by_checkpoint():
    def config(arch, vision="clip_vision_model"):
        return types.SimpleNamespace(
            architectures=[arch], vision_config=types.SimpleNamespace(model_type=vision)
        )

    assert guarded_architecture(config("LlavaForConditionalGeneration")) == (
        "VLSAEGuardLlavaForConditionalGeneration"
    )
    assert guarded_architecture(config("LlavaNextForConditionalGeneration")) == (
        "VLSAEGuardLlavaNextForConditionalGeneration"
    )
    with pytest.raises(ServeError, match="Pixtral"):
        guarded_architecture(config("LlavaForConditionalGeneration", "pixtral"))
    with pytest.raises(ServeError, match="found \\['LlamaForCausalLM'\\]"):
        guarded_architecture(config("LlamaForCausalLM"))


def dry_run(capsys, *argv):
    status = cli.main(["serve", *argv, "--dry-run"])
    captured = capsys.readouterr()
    return status, captured.out.strip().splitlines(), captured.err


def test_serve_dry_run_prints_the_environment_and_the_command(capsys, tiny_hf_dir, sae_dir):
    status, lines, _ = dry_run(
        capsys, str(tiny_hf_dir), "--port", "8001", "--sae", str(sae_dir),
        "--vlsae-alpha", "0.3", "--vlsae-default", "off", "--max-model-len", "512",
    )  # fmt: skip
    assert status == 0
    env = dict(line.split("=", 1) for line in lines[:-1])
    settings = ServeSettings.from_env({k: shlex.split(v)[0] for k, v in env.items()})
    assert settings.sae == str(sae_dir) and settings.guard.alpha == 0.3
    assert settings.resolve_request(None) is False
    command = shlex.split(lines[-1])
    assert command[command.index("--model") + 1] == str(tiny_hf_dir)
    overrides = json.loads(command[command.index("--hf-overrides") + 1])
    assert overrides["architectures"] == ["VLSAEGuardLlavaForConditionalGeneration"]
    assert command[-4:] == ["--port", "8001", "--max-model-len", "512"]  # vLLM's, in order
    assert "--sae" not in command and "--vlsae-alpha" not in command
    assert command[command.index(HOST_FLAG) + 1] == DEFAULT_HOST
    assert settings.allow_request_kwargs is False


def test_serve_carries_the_allow_flag_to_every_process(capsys, tiny_hf_dir, sae_dir):
    status, lines, _ = dry_run(capsys, str(tiny_hf_dir), "--sae", str(sae_dir), ALLOW_FLAG)
    assert status == 0 and f"{ENV_ALLOW}=on" in lines
    assert ALLOW_FLAG not in lines[-1]  # ours, not vLLM's


def test_serve_accepts_sae_before_the_model(capsys, tiny_hf_dir, sae_dir):
    status, lines, _ = dry_run(capsys, "--sae", str(sae_dir), str(tiny_hf_dir))
    assert status == 0 and any(line.startswith(ENV_SAE) for line in lines)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--sae DIR is required"),
        (["--sae", "{sae}", "--vlsae-mode", "paper", "--vlsae-layer", "1"], "mode 'paper'"),
        (["--sae", "{sae}", "--vlsae-text-grounded"], "text_grounded"),
        (
            ["--sae", "{sae}", "--vlsae-mode", "cue-mask"],
            "objects.json: cannot read the object map",
        ),
        (["--sae", "{sae}", "--vlsae-alpha", "3"], "alpha"),
        (["--sae", "/no/such/sae"], "no such directory"),
        (["--sae", "{narrow}"], "width 64, but the SAE expects d_in=32"),
        (["--sae", "{layer}"], "site 'layer'"),
    ],
)
def test_serve_refuses_what_cannot_work(capsys, tiny_hf_dir, sae_dir, tmp_path, extra, message):
    make_sae(d_in=32).save_pretrained(tmp_path / "narrow")
    make_sae(site="layer", layer=1).save_pretrained(tmp_path / "layer")
    dirs = {"sae": sae_dir, "narrow": tmp_path / "narrow", "layer": tmp_path / "layer"}
    args = [a.format(**dirs) for a in extra]
    status, _, err = dry_run(capsys, str(tiny_hf_dir), *args)
    assert status == 2
    assert message in err, err


def test_serve_refuses_a_model_that_is_not_llava_hf(capsys, tiny_llava_dir, sae_dir):
    status, _, err = dry_run(capsys, str(tiny_llava_dir), "--sae", str(sae_dir))
    assert status == 2 and "LlavaLlamaForCausalLM" in err


def test_running_server_reports_a_server_that_exits(tiny_hf_dir, tmp_path):
    with (
        pytest.raises(RuntimeError, match="(?s)exited with status 2.*no such directory"),
        running_server(
            str(tiny_hf_dir), ["--sae", str(tmp_path / "missing")], timeout=60,
            log=tmp_path / "server.log",
        ),
    ):  # fmt: skip
        pytest.fail("the server should not have started")


# --- client helpers --------------------------------------------------------------------------


def test_request_kwargs():
    assert client.request_kwargs(None) == {}
    assert client.request_kwargs(False) == {"mm_processor_kwargs": {REQUEST_KEY: False}}


def test_per_request_switches():
    assert client._per_request(True, 3) == [True, True, True]
    assert client._per_request([True, None], 2) == [True, None]
    with pytest.raises(ValueError, match="2 guard switches for 3 requests"):
        client._per_request([True, False], 3)


def test_image_url_is_lossless():
    (image,) = tiny.make_images(1, seed=3)
    url = client.image_url(image)
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(image))


def test_chat_messages_put_the_image_before_the_text():
    (image,) = tiny.make_images(1, seed=3)
    (user,) = client.chat_messages(image, "Is there a dog?")
    assert [part["type"] for part in user["content"]] == ["image_url", "text"]
    system, _ = client.chat_messages(image, "q", system="Be brief.")
    assert system == {"role": "system", "content": "Be brief."}


def test_the_old_method_variable_still_works_with_a_warning():
    with pytest.warns(FutureWarning, match=ENV_REWRITE):
        settings = ServeSettings.from_env({ENV_SAE: "/sae", ENV_METHOD: "edit"})
    assert settings.guard.rewrite == "edit"
    with pytest.raises(PluginConfigError, match=f"set {ENV_REWRITE} only"):
        ServeSettings.from_env({ENV_SAE: "/sae", ENV_METHOD: "edit", ENV_REWRITE: "edit"})
