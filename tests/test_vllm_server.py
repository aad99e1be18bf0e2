"""``vlsae-guard serve``: chat completions through the ``openai`` client.

One server for the module, started with the command users run (no ``--host``, so it binds
where ``serve`` does by default; torch.compile on, so vLLM's start-up profiling pushes a dummy
batch through the hook) and stopped at the end. Answers are compared with the HF guard's, image
by image; request kwargs the server refuses are probed with raw HTTP (NaN is not JSON to
the ``openai`` client).
"""

from __future__ import annotations

import json
import random
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from vlsae_guard.lab import tiny

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from _pope import run, texts, write_inputs  # noqa: E402

from vlsae_guard.serving.client import chat_messages, generate_openai, openai_client  # noqa: E402
from vlsae_guard.serving.server import running_server  # noqa: E402
from vlsae_guard.serving.settings import ALLOW_FLAG, REQUEST_KEY  # noqa: E402

SWITCHED = tiny.make_images(1, seed=20)  # on -> off -> on
DEFAULT = tiny.make_images(1, seed=21)
CONCURRENT = tiny.make_images(8, seed=22)
HIDDEN = tiny.TinySizes().text_hidden
# The tiny chat template has no BOS; the HF reference prompts (processor) start with one.
BOS = {"add_special_tokens": True}


@pytest.fixture(scope="module")
def served(tiny_hf_dir, tmp_path_factory, vllm_case):
    """(server, HF references by image set, guard log, log lines present at start-up)."""
    work = tmp_path_factory.mktemp("vllm-server")
    log = work / "guard.jsonl"
    refs = {
        name: vllm_case.hf_reference(tiny_hf_dir, images)
        for name, images in (("switched", SWITCHED), ("default", DEFAULT), ("many", CONCURRENT))
    }
    args = [
        "--sae", str(vllm_case.sae_dir), "--vlsae-alpha", str(vllm_case.alpha),
        "--vlsae-log", str(log),
        "--dtype", "float32", "--max-model-len", "512", "--seed", "0",
        "--kv-cache-memory-bytes", str(256 << 20), "--limit-mm-per-prompt", '{"image": 1}',
    ]  # fmt: skip
    with running_server(str(tiny_hf_dir), args, timeout=600, log=work / "server.log") as server:
        yield server, refs, log, vllm_case.read_log(log)


@pytest.fixture(scope="module")
def ask(vllm_case):
    """ask(server, images, guard, concurrency=1) -> greedy token ids per image."""

    def ask(server, images, guard, concurrency=1):
        answers = generate_openai(
            server.base_url,
            images,
            [vllm_case.question] * len(images),
            guard=guard,
            max_tokens=vllm_case.steps,
            concurrency=concurrency,
            timeout=120,
            extra_body=BOS,
        )
        return [a.token_ids for a in answers]

    return ask


def test_start_up_profiling_went_through_the_hook(served, vllm_case):
    _, _, _, at_start = served
    assert at_start, "no projector call during start-up"
    dummy = at_start[0]
    assert dummy["images"] > 1 and all(dummy["flags"])  # the server default: guarded
    assert (
        dummy["guarded_tokens"] == dummy["tokens"] == dummy["images"] * vllm_case.tokens_per_image
    )


def test_on_off_on_returns_the_matching_reference_each_time(served, vllm_case, ask):
    server, refs, log, _ = served
    ref = refs["switched"]
    assert vllm_case.differs(ref) == 1
    before = len(vllm_case.read_log(log))
    for on in (True, False, True, False):
        assert ask(server, SWITCHED, on) == [ref[on][0]], f"guard {'on' if on else 'off'}"
    new = vllm_case.read_log(log)[before:]
    # Each setting was projected once; the repeats came from the caches, keyed by the setting.
    assert sorted(r["flags"] == [True] for r in new) == [False, True]


def test_requests_that_do_not_say_are_guarded(served, ask):
    server, refs, _, _ = served
    assert ask(server, DEFAULT, None) == refs["default"][True]


def test_concurrent_mixed_requests_equal_their_single_request_references(served, vllm_case, ask):
    server, refs, _, _ = served
    ref = refs["many"]
    assert vllm_case.differs(ref) >= 4
    jobs = [(i, on) for i in range(len(CONCURRENT)) for on in (True, False)]
    random.Random(0).shuffle(jobs)
    answers = ask(server, [CONCURRENT[i] for i, _ in jobs], [on for _, on in jobs], 16)
    assert answers == [ref[on][i] for i, on in jobs]


def test_the_hook_sees_image_tokens_only(served, vllm_case):
    server, _, log, _ = served
    client = openai_client(server.base_url, timeout=120)
    before = len(vllm_case.read_log(log))
    response = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": "What color is the sky?"}],
        max_tokens=vllm_case.steps,
        temperature=0,
        extra_body={"mm_processor_kwargs": {REQUEST_KEY: True}},
    )
    assert response.choices[0].message.content is not None
    assert len(vllm_case.read_log(log)) == before  # a text-only request never reaches the projector
    for r in vllm_case.read_log(log):
        assert r["shape"][-1] == HIDDEN
        assert r["tokens"] == r["crops"] * vllm_case.tokens_per_image
        assert r["guarded_tokens"] == vllm_case.tokens_per_image * sum(r["flags"])


def test_a_switch_that_is_not_a_bool_is_a_client_error(served, vllm_case):
    server, _, _, _ = served
    client = openai_client(server.base_url, timeout=120)
    with pytest.raises(openai.BadRequestError, match=REQUEST_KEY):
        client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=chat_messages(SWITCHED[0], vllm_case.question),
            max_tokens=vllm_case.steps,
            extra_body={"mm_processor_kwargs": {REQUEST_KEY: "yes"}},
        )


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on ``port`` (Linux ``/proc/net/tcp*``)."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, _, state = line.split()[1:4]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(socket.inet_ntop(family, words))
    return found


def test_the_server_listens_on_localhost_only_by_default(served):
    server, _, _, _ = served
    assert "--host" not in server.process.args  # what serve did, not what the test asked
    command = Path(f"/proc/{server.process.pid}/cmdline").read_text().split("\0")
    assert "vllm.entrypoints.openai.api_server" in command  # serve replaced itself with it
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert listening_addresses(int(server.url.rsplit(":", 1)[1])) == {"127.0.0.1"}


def post_chat(server, case, **fields) -> tuple[int, str]:
    """(HTTP status, answer or error message) of one chat request, sent as raw JSON."""
    body = {
        "model": openai_client(server.base_url).models.list().data[0].id,
        "messages": chat_messages(SWITCHED[0], case.question), "max_tokens": case.steps,
        "temperature": 0, **fields,
    }  # fmt: skip
    request = urllib.request.Request(
        server.url + "/v1/chat/completions",
        data=json.dumps(body).encode(),  # NaN goes out as the bare token NaN
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())["choices"][0]["message"]["content"]
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["error"]["message"]


def health(server) -> int:
    with urllib.request.urlopen(server.url + "/health", timeout=30) as response:
        return response.status


FIXED = "a server setting, fixed when the server starts"
REFUSED = [  # (mm_processor_kwargs, what the message says)
    ({"size": {"shortest_edge": 56}}, ["['size']: expected only 'vlsae_guard'", ALLOW_FLAG]),
    (
        {"alpha": float("nan")},
        [f"['alpha']: {FIXED} (--vlsae-alpha)", "this server runs with alpha="],
    ),
    ({"alpha": -1}, [f"['alpha']: {FIXED} (--vlsae-alpha)"]),
    ({"alpha": "abc"}, [f"['alpha']: {FIXED} (--vlsae-alpha)"]),
    ({"vlsae_alpha": 0.1}, [f"['vlsae_alpha']: {FIXED} (--vlsae-alpha)"]),
    ({"steer": {str(i): 1.0 for i in range(200_000)}}, [f"['steer']: {FIXED} (--vlsae-steer)"]),
    ({REQUEST_KEY: float("nan")}, [f"['{REQUEST_KEY}']: expected true or false, found NaN"]),
    ({REQUEST_KEY: None}, [f"['{REQUEST_KEY}']: expected true or false, found null"]),
    ({REQUEST_KEY: "abc"}, [f"['{REQUEST_KEY}']: expected true or false, found 'abc'"]),
]


REFUSED_IDS = [
    "size", "alpha-nan", "alpha-negative", "alpha-abc", "vlsae_alpha", "steer-200k",
    "switch-nan", "switch-null", "switch-abc",
]  # fmt: skip


@pytest.mark.parametrize(("kwargs", "says"), REFUSED, ids=REFUSED_IDS)
def test_request_kwargs_the_guard_does_not_take_are_refused(served, vllm_case, kwargs, says):
    server, _, _, _ = served
    status, message = post_chat(server, vllm_case, mm_processor_kwargs=kwargs)
    assert status == 400 and all(part in message for part in says), message
    assert health(server) == 200


def test_media_io_kwargs_are_refused(served, vllm_case):
    server, _, _, _ = served
    status, message = post_chat(server, vllm_case, media_io_kwargs={"image": {"image_mode": "L"}})
    assert status == 400 and message.startswith("media_io_kwargs: expected none"), message
    assert ALLOW_FLAG in message and health(server) == 200


def test_after_the_refusals_requests_still_get_their_answers(served, vllm_case, ask):
    server, refs, _, _ = served
    assert post_chat(server, vllm_case)[0] == 200
    assert post_chat(server, vllm_case, mm_processor_kwargs={REQUEST_KEY: False})[0] == 200
    assert ask(server, SWITCHED, None) == [refs["switched"][True][0]]


def test_pope_runner_against_the_server_answers_as_the_hf_backend(
    served, tiny_hf_dir, tiny_images, tmp_path, vllm_case
):
    """``benchmarks/pope.py --backend openai``: both arms from one server, per request."""
    server, _, _, _ = served
    inputs = write_inputs(tmp_path / "inputs", tiny_images, n_questions=12)
    both = ["--ab", "--max-new-tokens", str(vllm_case.steps)]
    guard = ["--sae", str(vllm_case.sae_dir), "--vlsae-alpha", str(vllm_case.alpha)]
    chat = ["--prompt-format", "chat-template"]
    run(inputs, tiny_hf_dir, tmp_path / "hf", *both, *guard, *chat, "--batch-size", "1")
    out = tmp_path / "openai"
    url = ["--base-url", server.base_url, "--batch-size", "6"]
    results = run(inputs, tiny_hf_dir, out, *both, *url, backend="openai", device=None)

    reference = {arm: texts(tmp_path / "hf", arm) for arm in ("none", "vlsae")}
    assert reference["none"] != reference["vlsae"]
    assert {arm: texts(out, arm) for arm in ("none", "vlsae")} == reference
    settings = results["settings"]
    assert settings["served_model"] == str(tiny_hf_dir) and settings["model_sha256"]
    assert settings["extra_body"] == {"add_special_tokens": True}  # the template has no BOS
    assert settings["guard_configured_by"] == "the server" and settings["sae_sha256"] is None


def test_the_readme_client_snippet_switches_the_guard_per_request(
    served, readme_snippets, tiny_hf_dir, tmp_path, capsys, vllm_case
):
    """README.md's `<!-- test: server -->` block, as written, against this server."""
    server, _, log, _ = served
    (snippet,) = [s for s in readme_snippets if s.tag == "server"]
    image = tmp_path / "photo.jpg"
    tiny.make_images(1, seed=23)[0].save(image)  # an image no other test sent: no cache hits
    code = snippet.with_values(BASE_URL=server.base_url, MODEL=tiny_hf_dir, IMAGE=image)
    before = len(vllm_case.read_log(log))
    exec(compile(code, f"README.md:{snippet.line}", "exec"), {})
    # One projection per request, guard on then off: the switch reached the model.
    assert [r["flags"] for r in vllm_case.read_log(log)[before:]] == [[True], [False]]
    printed = capsys.readouterr().out  # the answers may hold newlines themselves
    assert re.findall(r"^guard (on|off):", printed, re.M) == ["on", "off"]
