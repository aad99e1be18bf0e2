"""``vlsae-guard serve`` on 127.0.0.1: chat completions through the ``openai`` client.

One server for the module, started with the command users run (torch.compile on, so vLLM's
start-up profiling pushes a dummy batch through the hook) and stopped at the end. Answers are
compared with the HF guard's, image by image.
"""

from __future__ import annotations

import random

import pytest

from vlsae_guard.lab import tiny

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from _pope import run, texts, write_inputs  # noqa: E402
from _vllm import (  # noqa: E402
    ALPHA,
    QUESTION,
    STEPS,
    TOKENS_PER_IMAGE,
    differs,
    hf_reference,
    read_log,
    save_sae,
)

from vlsae_guard.serving.client import generate_openai, openai_client  # noqa: E402
from vlsae_guard.serving.server import running_server  # noqa: E402
from vlsae_guard.serving.settings import REQUEST_KEY  # noqa: E402

SWITCHED = tiny.make_images(1, seed=20)  # on -> off -> on
DEFAULT = tiny.make_images(1, seed=21)
CONCURRENT = tiny.make_images(8, seed=22)
HIDDEN = tiny.TinySizes().text_hidden
# The tiny chat template has no BOS; the HF reference prompts (processor) start with one.
BOS = {"add_special_tokens": True}


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    return save_sae(tmp_path_factory.mktemp("vllm-server-sae"))


@pytest.fixture(scope="module")
def served(tiny_hf_dir, sae_dir, tmp_path_factory):
    """(server, HF references by image set, guard log, log lines present at start-up)."""
    work = tmp_path_factory.mktemp("vllm-server")
    log = work / "guard.jsonl"
    refs = {
        name: hf_reference(tiny_hf_dir, images, QUESTION, sae_dir)
        for name, images in (("switched", SWITCHED), ("default", DEFAULT), ("many", CONCURRENT))
    }
    args = [
        "--sae", str(sae_dir), "--vlsae-alpha", str(ALPHA), "--vlsae-log", str(log),
        "--dtype", "float32", "--max-model-len", "512", "--seed", "0",
        "--kv-cache-memory-bytes", str(256 << 20), "--limit-mm-per-prompt", '{"image": 1}',
    ]  # fmt: skip
    with running_server(str(tiny_hf_dir), args, timeout=600, log=work / "server.log") as server:
        yield server, refs, log, read_log(log)


def ask(server, images, guard, concurrency=1):
    answers = generate_openai(
        server.base_url,
        images,
        [QUESTION] * len(images),
        guard=guard,
        max_tokens=STEPS,
        concurrency=concurrency,
        timeout=120,
        extra_body=BOS,
    )
    return [a.token_ids for a in answers]


def test_start_up_profiling_went_through_the_hook(served):
    _, _, _, at_start = served
    assert at_start, "no projector call during start-up"
    dummy = at_start[0]
    assert dummy["images"] > 1 and all(dummy["flags"])  # the server default: guarded
    assert dummy["guarded_tokens"] == dummy["tokens"] == dummy["images"] * TOKENS_PER_IMAGE


def test_on_off_on_returns_the_matching_reference_each_time(served):
    server, refs, log, _ = served
    ref = refs["switched"]
    assert differs(ref) == 1
    before = len(read_log(log))
    for on in (True, False, True, False):
        assert ask(server, SWITCHED, on) == [ref[on][0]], f"guard {'on' if on else 'off'}"
    new = read_log(log)[before:]
    # Each setting was projected once; the repeats came from the caches, keyed by the setting.
    assert sorted(r["flags"] == [True] for r in new) == [False, True]


def test_requests_that_do_not_say_are_guarded(served):
    server, refs, _, _ = served
    assert ask(server, DEFAULT, None) == refs["default"][True]


def test_concurrent_mixed_requests_equal_their_single_request_references(served):
    server, refs, _, _ = served
    ref = refs["many"]
    assert differs(ref) >= 4
    jobs = [(i, on) for i in range(len(CONCURRENT)) for on in (True, False)]
    random.Random(0).shuffle(jobs)
    answers = ask(server, [CONCURRENT[i] for i, _ in jobs], [on for _, on in jobs], 16)
    assert answers == [ref[on][i] for i, on in jobs]


def test_the_hook_sees_image_tokens_only(served):
    server, _, log, _ = served
    client = openai_client(server.base_url, timeout=120)
    before = len(read_log(log))
    response = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": "What color is the sky?"}],
        max_tokens=STEPS,
        temperature=0,
        extra_body={"mm_processor_kwargs": {REQUEST_KEY: True}},
    )
    assert response.choices[0].message.content is not None
    assert len(read_log(log)) == before  # a text-only request never reaches the projector
    for r in read_log(log):
        assert r["shape"][-1] == HIDDEN
        assert r["tokens"] == r["crops"] * TOKENS_PER_IMAGE
        assert r["guarded_tokens"] == TOKENS_PER_IMAGE * sum(r["flags"])


def test_a_switch_that_is_not_a_bool_is_a_client_error(served):
    server, _, _, _ = served
    client = openai_client(server.base_url, timeout=120)
    from vlsae_guard.serving.client import chat_messages

    with pytest.raises(openai.BadRequestError, match=REQUEST_KEY):
        client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=chat_messages(SWITCHED[0], QUESTION),
            max_tokens=STEPS,
            extra_body={"mm_processor_kwargs": {REQUEST_KEY: "yes"}},
        )


def test_pope_runner_against_the_server_answers_as_the_hf_backend(
    served, sae_dir, tiny_hf_dir, tiny_images, tmp_path
):
    """``benchmarks/pope.py --backend openai``: both arms from one server, per request."""
    server, _, _, _ = served
    inputs = write_inputs(tmp_path / "inputs", tiny_images, n_questions=12)
    both = ["--ab", "--max-new-tokens", str(STEPS)]
    guard = ["--sae", str(sae_dir), "--vlsae-alpha", str(ALPHA)]
    chat = ["--prompt-format", "chat-template"]
    run(inputs, tiny_hf_dir, tmp_path / "hf", *both, *guard, *chat, "--batch-size", "1")
    out = tmp_path / "openai"
    url = ["--base-url", server.base_url, "--batch-size", "6"]
    results = run(inputs, tiny_hf_dir, out, *both, *url, backend="openai", device=None)

    reference = {arm: texts(tmp_path / "hf", arm) for arm in ("off", "on")}
    assert reference["off"] != reference["on"]
    assert {arm: texts(out, arm) for arm in ("off", "on")} == reference
    settings = results["settings"]
    assert settings["served_model"] == str(tiny_hf_dir) and settings["model_sha256"]
    assert settings["extra_body"] == {"add_special_tokens": True}  # the template has no BOS
    assert settings["guard_configured_by"] == "the server" and settings["sae_sha256"] is None
