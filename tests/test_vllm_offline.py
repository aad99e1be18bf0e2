"""The plugin on a real offline vLLM engine (CPU): same answers as the HF guard, per request.

Three engines live for this module: plain vLLM (plugins disabled), the guarded architecture
without configuration, and the guarded architecture with an SAE. Each test uses images no
earlier test sent where caching could hide a bug, so every comparison recomputes what it checks.
"""

from __future__ import annotations

import os

import pytest

from vlsae_guard.lab import tiny

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("allow_inspection")]  # apply_model
vllm = pytest.importorskip("vllm")

from vlsae_guard.serving.client import generate_offline, load_llm  # noqa: E402
from vlsae_guard.serving.settings import PREFIX, REQUEST_KEY, ServeSettings  # noqa: E402

MIXED = tiny.make_images(6, seed=7)  # first seen by test_mixed_batch
FRESH = tiny.make_images(3, seed=8)  # first seen by the bit-identity tests, in every engine
HIDDEN = tiny.TinySizes().text_hidden


@pytest.fixture(scope="module")
def log_path(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm-log") / "guard.jsonl"


def _shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def plain_llm(tiny_hf_dir, vllm_case):
    """vLLM as it is: the checkpoint's own architecture, no plugin in the engine processes."""
    for key in [k for k in os.environ if k.startswith(PREFIX)]:
        del os.environ[key]
    os.environ["VLLM_PLUGINS"] = ""  # an allowlist that matches no plugin
    try:
        llm = vllm.LLM(model=str(tiny_hf_dir), **vllm_case.engine)
    finally:
        del os.environ["VLLM_PLUGINS"]
    yield llm
    _shutdown(llm)


@pytest.fixture(scope="module")
def unconfigured_llm(tiny_hf_dir, vllm_case):
    llm = load_llm(str(tiny_hf_dir), None, **vllm_case.engine)
    yield llm
    _shutdown(llm)


@pytest.fixture(scope="module")
def guarded_llm(tiny_hf_dir, log_path, vllm_case):
    guard = {"alpha": vllm_case.alpha}
    settings = ServeSettings(sae=str(vllm_case.sae_dir), guard=guard, log=log_path)
    llm = load_llm(str(tiny_hf_dir), settings, **vllm_case.engine)
    yield llm
    _shutdown(llm)


@pytest.fixture(scope="module")
def reference(tiny_hf_dir, tiny_images, vllm_case):
    return vllm_case.hf_reference(tiny_hf_dir, tiny_images)


@pytest.fixture(scope="module")
def mixed_reference(tiny_hf_dir, vllm_case):
    return vllm_case.hf_reference(tiny_hf_dir, MIXED)


@pytest.fixture(scope="module")
def ask(vllm_case):
    """ask(llm, images, guard) -> greedy token ids per image."""

    def ask(llm, images, guard):
        prompts = [vllm_case.prompt] * len(images)
        answers = generate_offline(llm, images, prompts, guard=guard, max_tokens=vllm_case.steps)
        return [a.token_ids for a in answers]

    return ask


@pytest.fixture(scope="module")
def exact(vllm_case):
    """exact(llm, images, guard=None) -> token ids and every top-5 logprob, to compare engines
    bit for bit."""

    def exact(llm, images, guard=None) -> list:
        params = vllm.SamplingParams(temperature=0, max_tokens=vllm_case.steps, logprobs=5)
        requests = [
            {"prompt": vllm_case.prompt, "multi_modal_data": {"image": im}} for im in images
        ]
        requests.append({"prompt": vllm_case.prompt.replace("<image>\n", "")})
        if guard is not None:
            for r in requests[:-1]:
                r["mm_processor_kwargs"] = {REQUEST_KEY: guard}
        outs = llm.generate(requests, params, use_tqdm=False)
        return [
            (
                o.outputs[0].token_ids,
                [{t: lp.logprob for t, lp in s.items()} for s in o.outputs[0].logprobs],
            )
            for o in outs
        ]

    return exact


def test_the_guard_changes_the_reference_answers(reference, mixed_reference, vllm_case):
    assert vllm_case.differs(reference) >= 2
    assert vllm_case.differs(mixed_reference) >= 3


def test_guarded_answers_equal_the_hf_guard(guarded_llm, reference, tiny_images, ask):
    assert ask(guarded_llm, tiny_images, True) == reference[True]


def test_unguarded_answers_equal_hf(guarded_llm, reference, tiny_images, ask):
    assert ask(guarded_llm, tiny_images, False) == reference[False]


def test_requests_that_do_not_say_are_guarded_by_default(guarded_llm, reference, tiny_images, ask):
    assert ask(guarded_llm, tiny_images, None) == reference[True]


def test_on_off_on_through_the_caches(guarded_llm, reference, tiny_images, ask):
    image = tiny_images[1:2]
    for on in (True, False, True, False):
        assert ask(guarded_llm, image, on) == [reference[on][1]]


def test_mixed_batch_guards_only_its_flagged_images(
    guarded_llm, mixed_reference, log_path, vllm_case, ask
):
    before = len(vllm_case.read_log(log_path))
    flags = [True, False, False, True, True, False]
    expected = [mixed_reference[on][i] for i, on in enumerate(flags)]
    assert ask(guarded_llm, MIXED, flags) == expected
    records = vllm_case.read_log(log_path)[before:]
    mixed = [r for r in records if r["flags"] and 0 < sum(r["flags"]) < len(r["flags"])]
    assert mixed, f"no projector call mixed guarded and plain images: {records}"
    for r in mixed:
        assert r["guarded_tokens"] == vllm_case.tokens_per_image * sum(r["flags"])


def test_the_hook_sees_image_tokens_only(guarded_llm, log_path, tiny_images, vllm_case, ask):
    ask(guarded_llm, tiny.make_images(2, seed=9), True)
    before = len(vllm_case.read_log(log_path))
    text_only = vllm.SamplingParams(temperature=0, max_tokens=vllm_case.steps)
    guarded_llm.generate([{"prompt": "USER: What color is the sky? ASSISTANT:"}], text_only)
    assert len(vllm_case.read_log(log_path)) == before  # no image, no projector call
    records = vllm_case.read_log(log_path)
    assert records
    for r in records:
        assert r["shape"][-1] == HIDDEN
        assert (
            r["tokens"]
            == r["images"] * vllm_case.tokens_per_image
            == r["crops"] * vllm_case.tokens_per_image
        )
        assert r["guarded_tokens"] == vllm_case.tokens_per_image * sum(r["flags"])


def test_unconfigured_plugin_is_bit_identical_to_plain_vllm(plain_llm, unconfigured_llm, exact):
    assert exact(unconfigured_llm, FRESH) == exact(plain_llm, FRESH)


def test_guard_off_is_bit_identical_to_plain_vllm(plain_llm, guarded_llm, exact):
    images = tiny.make_images(3, seed=10)
    assert exact(guarded_llm, images, guard=False) == exact(plain_llm, images)


def _inspect(model) -> dict:
    names = {n for n, _ in model.named_buffers() if n.startswith("vlsae_sae.")}
    return {
        "buffers": sorted(names),
        "persistent": sorted(k for k in model.state_dict() if k.startswith("vlsae_sae.")),
        "parameters": sorted(n for n, _ in model.named_parameters() if "vlsae" in n),
        "hooks": len(model.multi_modal_projector._forward_hooks),
        "class": type(model).__name__,
    }


def test_the_sae_lives_in_non_persistent_buffers(guarded_llm):
    (seen,) = guarded_llm.apply_model(_inspect)
    assert seen["class"] == "VLSAEGuardLlavaForConditionalGeneration"
    assert {"vlsae_sae.encoder", "vlsae_sae.vision_decoder.weight"} <= set(seen["buffers"])
    assert seen["persistent"] == [] and seen["parameters"] == []
    assert seen["hooks"] == 1


def test_without_configuration_nothing_is_attached(unconfigured_llm):
    (seen,) = unconfigured_llm.apply_model(_inspect)
    assert seen["class"] == "VLSAEGuardLlavaForConditionalGeneration"
    assert seen["buffers"] == [] and seen["hooks"] == 0


def test_a_guard_request_to_an_unconfigured_engine_is_refused(unconfigured_llm, tiny_images, ask):
    with pytest.raises(ValueError, match="no guard"):
        ask(unconfigured_llm, tiny_images[:1], True)


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"size": {"shortest_edge": 56}}, "expected only 'vlsae_guard'"),
        ({"alpha": float("nan")}, "a server setting, fixed when the server starts"),
        ({REQUEST_KEY: None}, "expected true or false, found null"),
    ],
    ids=["size", "alpha", "switch-null"],
)
def test_offline_requests_are_checked_as_the_server_checks_them(
    guarded_llm, vllm_case, kwargs, says
):
    """The offline engine refuses what the server refuses, and answers the next request."""
    from vlsae_guard.serving.settings import RequestKwargsError

    request = {
        "prompt": vllm_case.prompt,
        "multi_modal_data": {"image": FRESH[0]},
        "mm_processor_kwargs": kwargs,
    }
    with pytest.raises(RequestKwargsError, match=says):
        guarded_llm.generate([request], use_tqdm=False)
    answer = generate_offline(guarded_llm, FRESH[:1], [vllm_case.prompt], guard=False)
    assert answer[0].token_ids
