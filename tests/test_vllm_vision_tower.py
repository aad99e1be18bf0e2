"""Steering at ``vision_tower:L`` under vLLM (CPU): the HF guard's answers, per request.

vLLM does not compile its CLIP encoder (only the language model), so a forward hook on the
encoder layer runs as in transformers; the per-request switch reaches it with the pixels.
"""

from __future__ import annotations

import pytest
import torch

from vlsae_guard import SAEConfig, Source, build
from vlsae_guard.lab import tiny

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.usefixtures("restored_environ"),
    pytest.mark.filterwarnings("ignore::vlsae_guard.GuardFitWarning"),
]
vllm = pytest.importorskip("vllm")


SIZES = tiny.TinySizes()
LAYER = SIZES.vision_layers - 2  # the layer the tiny LLaVA reads (vision_feature_layer -2)
STEER = {5: 100.0}
IMAGES = tiny.make_images(3, seed=31)


@pytest.fixture(scope="module")
def vision_sae_dir(tmp_path_factory):
    torch.manual_seed(0)
    n = 4 * SIZES.vision_hidden
    config = SAEConfig(architecture="matryoshka", d_in=SIZES.vision_hidden, n_concepts=n, k=8,
                       groups=[n // 4, 3 * n // 4],
                       source=Source(site="vision_tower", layer=LAYER))  # fmt: skip
    sae = build(config)
    sae.threshold.fill_(0.05)
    directory = tmp_path_factory.mktemp("vision-sae") / "sae"
    sae.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def reference(tiny_hf_dir, vision_sae_dir, vllm_case):
    """Greedy token ids per image, plain (False) and steered (True), from the HF guard."""
    site = f"vision_tower:{LAYER}"
    return vllm_case.hf_reference(tiny_hf_dir, IMAGES, vision_sae_dir, site=site, steer=STEER)


@pytest.fixture(scope="module")
def llm(tiny_hf_dir, vision_sae_dir, vllm_case):
    site = f"vision_tower:{LAYER}"
    yield from vllm_case.serve_offline(tiny_hf_dir, vision_sae_dir, site=site, steer=STEER)


def test_served_steering_equals_the_hf_guard_per_request(llm, reference, vllm_case):
    assert vllm_case.differs(reference) >= 2  # the clamp changes answers on the tiny model
    for on in (True, False, True):
        assert vllm_case.answers(llm, IMAGES, on) == reference[on], on
    mixed = vllm_case.answers(llm, IMAGES, [True, False, True])
    expected = [reference[True][0], reference[False][1], reference[True][2]]
    assert mixed == expected


def test_an_sae_for_another_site_is_refused_before_serving(tiny_hf_dir, tiny_sae_dir):
    from transformers import AutoConfig

    from vlsae_guard.serving.server import ServeError, check_sae
    from vlsae_guard.serving.settings import ServeSettings as Settings

    config = AutoConfig.from_pretrained(tiny_hf_dir)
    settings = Settings(sae=str(tiny_sae_dir), guard={"site": f"vision_tower:{LAYER}"})
    with pytest.raises(ServeError, match="trained at site 'projector'"):
        check_sae(settings.sae, config, settings.guard)
