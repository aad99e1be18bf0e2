"""The screened top-k search served by vLLM (CPU): the HF guard's answers, per request."""

from __future__ import annotations

import pytest

from vlsae_guard import VLSAE
from vlsae_guard.lab import tiny

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.usefixtures("allow_inspection"),  # llm.apply_model(_screen_stats)
    pytest.mark.filterwarnings("ignore::vlsae_guard.GuardFitWarning"),
]
vllm = pytest.importorskip("vllm")

IMAGES = tiny.make_images(4, seed=41)


def _screen_stats(model) -> dict:
    stats = model.vlsae_intervention.search.stats
    return {"rows": stats.rows, "rescored": stats.rescored_per_row, "fell_back": stats.fell_back}


@pytest.fixture(scope="module")
def reference(tiny_hf_dir, vllm_case):
    """Greedy token ids per image from the HF guard with the full search, off and on."""
    return vllm_case.hf_reference(tiny_hf_dir, IMAGES)


@pytest.fixture(scope="module")
def llm(tiny_hf_dir, vllm_case):
    yield from vllm_case.serve_offline(
        tiny_hf_dir, vllm_case.sae_dir, alpha=vllm_case.alpha, search="screened"
    )


def test_served_screened_search_equals_the_hf_full_search(llm, reference, vllm_case):
    assert vllm_case.differs(reference) >= 1  # the guard changes answers on the tiny model
    for on in (True, False):
        assert vllm_case.answers(llm, IMAGES, on) == reference[on], on
    (seen,) = llm.apply_model(_screen_stats)  # the last guarded call was screened
    assert seen["rows"] > 0 and not seen["fell_back"]
    assert seen["rescored"] >= VLSAE.from_pretrained(vllm_case.sae_dir).k
