"""The guard at ``vision_tower:L`` (Pach et al., 2025): reconstruction, clamps, removal, checks;
and collection at that site."""

from __future__ import annotations

import json

import pytest
import torch
from _support import one_thread  # noqa: F401
from test_collect import pairs_file, rows_by_pair, run  # noqa: F401 (pairs_file: a fixture)
from test_guard import Case, hf_inputs, llava_inputs, next_image_tokens, same

from vlsae_guard import GuardConfig, GuardError, SAEConfig, Source, build, guard
from vlsae_guard.backends import detect
from vlsae_guard.core.vision_tower import VisionTowerIntervention
from vlsae_guard.lab import tiny

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::vlsae_guard.GuardFitWarning"),  # random SAEs fit badly
]
QUESTIONS = ["Is there a dog in the image?", "What color is the large object?"]
WIDTH = tiny.TinySizes().vision_hidden
LAYER = tiny.TinySizes().vision_layers - 2  # the layer LLaVA reads (vision_feature_layer -2)


def vision_sae(architecture="matryoshka", seed=0, site="vision_tower", layer=LAYER, d_in=WIDTH):
    torch.manual_seed(seed)
    n = 4 * d_in
    groups = [n // 4, 3 * n // 4] if architecture == "matryoshka" else None
    source = Source(site=site, layer=layer)
    sae = build(
        SAEConfig(
            architecture=architecture, d_in=d_in, n_concepts=n, k=8, groups=groups, source=source
        )
    )
    sae.threshold.fill_(0.05)
    return sae.eval()


@pytest.fixture(scope="module")
def sae():
    return vision_sae()


@pytest.fixture(scope="module", params=["hf", "next", "llava"])
def case(request, tiny_images):
    images = tiny_images[: len(QUESTIONS)]
    if request.param == "llava":
        model, tokenizer = request.getfixturevalue("llava_model_and_tokenizer")
        return Case(model, llava_inputs(model, tokenizer, images, QUESTIONS), 0)
    name = "hf_model_and_processor" if request.param == "hf" else "next_model_and_processor"
    model, processor = request.getfixturevalue(name)
    inputs = hf_inputs(processor, images, QUESTIONS)
    return Case(model, inputs, next_image_tokens(model, inputs) if request.param == "next" else 0)


def vision_hooks(model) -> int:
    return sum(len(m._forward_hooks) for m in detect(model).vision_layers())


def test_steer_changes_answers_and_removal_restores_exactly(case, sae):
    baseline = case.generate()
    hooks = vision_hooks(case.model)  # transformers' own output-capturing hooks stay
    handle = guard(case.model, sae, site=f"vision_tower:{LAYER}", steer={5: 100.0})
    steered = case.generate(handle.generate)
    assert not torch.equal(steered[1], baseline[1])
    assert handle.stats.calls >= 1 and handle.fit.site == f"vision_tower:{LAYER}"
    with handle.disabled():
        assert same(case.generate(handle.generate), baseline)
    handle.remove()
    assert vision_hooks(case.model) == hooks
    assert same(case.generate(), baseline)


def test_the_layer_output_llava_reads_is_rewritten(hf_model_and_processor, tiny_images, sae):
    """LLaVA's image features come from the rewritten layer output: transformers records hidden
    states with hooks of its own, which must run after ours."""
    model, processor = hf_model_and_processor
    pixels = processor(images=tiny_images[:1], text=["<image>"], return_tensors="pt")
    pixels = pixels["pixel_values"]
    tower = detect(model).vision_tower()
    with torch.no_grad():
        tower(pixels, output_hidden_states=True)  # transformers installs its hooks first
        plain = tower(pixels, output_hidden_states=True).hidden_states[LAYER + 1]
        handle = guard(model, sae, site=f"vision_tower:{LAYER}")
        try:
            rewritten = tower(pixels, output_hidden_states=True).hidden_states[LAYER + 1]
        finally:
            handle.remove()
        expected = sae.decode(sae.encode_topk(plain))
    torch.testing.assert_close(rewritten, expected, rtol=1e-5, atol=1e-5)


def test_intervention_formulas(sae):
    x = torch.randn(2, 7, WIDTH)
    codes = sae.encode_topk(x)
    w, b = sae.decoder.weight, sae.decoder.bias

    def run(**settings):
        return VisionTowerIntervention(sae, GuardConfig(site="vision_tower:1", **settings))(x)

    torch.testing.assert_close(run(), sae.decode(codes))
    dense = codes.dense()
    clamped = dense.clone()
    clamped[..., 3] = 50.0
    torch.testing.assert_close(run(steer={3: 50.0}), clamped @ w + b, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(run(steer={3: 50.0}, pre_zero=True), (50.0 * w[3] + b).expand_as(x))
    with_error = run(steer={3: 50.0}, keep_error=True)
    torch.testing.assert_close(with_error, x + (clamped - dense) @ w, rtol=1e-5, atol=1e-4)
    both = run(steer={3: 50.0}, keep_error=True, pre_zero=True)
    torch.testing.assert_close(both, x - dense @ w + 50.0 * w[3], rtol=1e-5, atol=1e-4)
    assert GuardConfig(site="vision_tower:1", keep_error=True).is_identity
    assert not GuardConfig(site="vision_tower:1").is_identity


def test_threshold_codes_are_exact_and_variable_width():
    x = torch.randn(5, WIDTH, dtype=torch.float64)
    sae64 = vision_sae().double()
    f = torch.relu((x - sae64.decoder.bias) @ sae64.encoder.weight.T + sae64.encoder.bias)
    f = f * (f > sae64.threshold)
    codes = sae64.encode_topk(x)
    assert codes.values.shape[-1] == int((f > 0).sum(-1).max())
    torch.testing.assert_close(codes.dense(), f)
    torch.testing.assert_close(sae64.decode(codes), f @ sae64.decoder.weight + sae64.decoder.bias)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"site": f"vision_tower:{LAYER + 1}"}, "a later layer changes nothing"),
        ({"site": "vision_tower:0", "alpha": 0.5}, "do not apply at site"),
        ({"pre_zero": True}, "do not apply to mode 'projector'"),
        ({"site": "vision_tower:one"}, "expected 'projector' or 'vision_tower:L'"),
    ],
)
def test_refusals_leave_the_model_untouched(hf_model_and_processor, sae, settings, message):
    model, _ = hf_model_and_processor
    hooks = vision_hooks(model)
    with pytest.raises(GuardError, match=message):
        guard(model, sae, **settings)
    assert vision_hooks(model) == hooks


def test_an_sae_of_another_site_or_width_is_refused(hf_model_and_processor):
    model, _ = hf_model_and_processor
    projector_sae = vision_sae(site="projector", layer=None, d_in=64)
    with pytest.raises(GuardError, match="trained at site 'projector'"):
        guard(model, projector_sae, site=f"vision_tower:{LAYER}")
    narrow = vision_sae(d_in=WIDTH // 2)
    with pytest.raises(GuardError, match="the vision tower outputs width"):
        guard(model, narrow, site=f"vision_tower:{LAYER}")
    with pytest.raises(GuardError, match="trained at site 'vision_tower'"):
        guard(model, vision_sae(d_in=64))  # a vision-tower SAE at the projector


# --- collection at vision_tower:L ------------------------------------------------------------


@pytest.mark.parametrize("family", ["hf", "next"])
def test_collect_reads_every_token_of_the_layer_output(family, request, pairs_file, tmp_path):  # noqa: F811
    """Rows are the layer's output for each image's crops, CLS first; batched equals one at a
    time; no text rows."""
    name = "hf_model_and_processor" if family == "hf" else "next_model_and_processor"
    directory = request.getfixturevalue("tiny_hf_dir" if family == "hf" else "tiny_next_dir")
    model, processor = request.getfixturevalue(name)
    site = f"vision_tower:{LAYER}"
    for bs in (1, 3):
        run((model, processor), directory, pairs_file, tmp_path / str(bs), batch_size=bs, site=site)
    one, three = rows_by_pair(tmp_path / "1"), rows_by_pair(tmp_path / "3")
    assert not one["text"] and not three["text"]
    tower = detect(model).vision_tower()
    images = tiny.make_images(7, seed=3)
    for i, image in enumerate(images):
        pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            states = tower(pixels.reshape(-1, *pixels.shape[-3:]), output_hidden_states=True)
        expected = states.hidden_states[LAYER + 1].reshape(-1, WIDTH)
        torch.testing.assert_close(one["vision"][i], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(three["vision"][i], expected, atol=1e-5, rtol=1e-5)
    manifest = (tmp_path / "1" / "manifest.json").read_text()
    assert '"site": "vision_tower"' in manifest and '"text": 0' in manifest


def test_collect_train_matryoshka_and_steer_end_to_end(
    hf_model_and_processor, tiny_hf_dir, tiny_images, tmp_path
):
    """The chain a user runs: collect at the vision tower, train a Matryoshka SAE there, steer
    with it; it fits where it was trained, the clamp changes the answer, removal restores it."""
    from vlsae_guard.cli import main
    from vlsae_guard.core.checkpoint import load

    lines = []
    for i, image in enumerate(tiny.make_images(32, seed=5)):
        image.save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": "an image", "id": str(i)}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    site = f"vision_tower:{LAYER}"
    store, out = tmp_path / "store", tmp_path / "sae"
    common = ["--no-progress", "--device", "cpu"]
    collect = ["collect", "--model", str(tiny_hf_dir), "--jsonl", str(tmp_path / "pairs.jsonl")]
    assert main([*collect, "--out", str(store), "--site", site, *common]) == 0
    train = ["train", "--store", str(store), "--out", str(out), "--arch", "matryoshka"]
    settings = ["--n-concepts", "256", "--k", "8", "--epochs", "6", "--batch-size", "64"]
    threshold = ["--threshold-start", "40", "--threshold-beta", "0.9", "--lr", "3e-3"]
    assert main([*train, *settings, *threshold, *common]) == 0
    sae = load(out)
    assert sae.config.architecture == "matryoshka" and sae.config.source.place == site
    assert float(sae.threshold) > 0 and sae.config.groups == [16, 32, 64, 144]
    assert sae.config.stats["explained_variance_vision"] > 0.5

    model, processor = hf_model_and_processor
    case = Case(model, hf_inputs(processor, tiny_images[:2], QUESTIONS), 0)
    baseline = case.generate()
    with guard(model, out, site=site, steer={0: 100.0}) as handle:
        steered = case.generate(handle.generate)
    assert handle.fit.problem is None  # in place: no warning
    assert not torch.equal(steered[1], baseline[1])
    assert same(case.generate(), baseline)
