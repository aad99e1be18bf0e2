"""The placement check: ``handle.fit``, the SAE's explained variance where it is used.

An SAE fitted to the tiny model's projector outputs on the demo's images is in place at the
projector, on other images of the same kind; the same weights read at a decoder layer, or random
weights, are not.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from vlsae_guard import VLSAE, GuardError, SAEConfig, Source, guard
from vlsae_guard.backends import detect
from vlsae_guard.core.fit import DEFAULT_MIN_FIT, GuardFit, GuardFitWarning
from vlsae_guard.lab import demo

QUESTIONS = ["Is there a dog in the image?", "What color is the large object?"]
LAYER = 0  # paper mode: the output of decoder layer 0 is collect's site "layer:1"


@pytest.fixture(scope="module")
def fitted(hf_model_and_processor):
    """A projector-site SAE fitted (closed form) to this model's projector outputs."""
    model, processor = hf_model_and_processor
    return demo.fit_sae(model, processor, demo.make_scenes(32, seed=1), 128, 8, seed=0)


@pytest.fixture(scope="module")
def images():
    """Images the fitted SAE has not seen, drawn like those it was fitted on."""
    return [scene.image for scene in demo.make_scenes(4, seed=2)]


@pytest.fixture(scope="module")
def random_sae():
    torch.manual_seed(0)
    return VLSAE(SAEConfig(d_in=64, n_concepts=64, k=8, shared_concepts=list(range(32)))).eval()


def relabelled(sae, **source):
    """A copy of ``sae`` whose checkpoint names another source (``with_config`` edits in place)."""
    return copy.deepcopy(sae).with_config(source=Source(**source))


def inputs(processor, images, questions=QUESTIONS):
    processor.tokenizer.padding_side = "left"
    prompts = [f"USER: <image>\n{q} ASSISTANT:" for q in questions]
    return dict(processor(images=images, text=prompts, return_tensors="pt", padding=True))


def generate(runner, batch):
    with torch.no_grad():
        out = runner(
            **batch,
            max_new_tokens=3,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences, torch.stack(out.logits)


def explained_variance(sae, x, modality):
    """Independent of the guard: float64, straight from the definition."""
    x = x.reshape(-1, x.shape[-1]).double()
    with torch.no_grad():
        recon = sae(x.float(), modality).double()
    return float(1 - (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def projector_outputs(model, batch):
    rows = []
    hook = (
        detect(model)
        .projector()
        .register_forward_hook(lambda m, a, out: rows.append(out.detach().clone()))
    )
    try:
        generate(model.generate, batch)
    finally:
        hook.remove()
    return rows[0]


def fit_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, GuardFitWarning)]


def test_fit_is_measured_once_on_the_first_guarded_batch(hf_model_and_processor, images, fitted):
    model, processor = hf_model_and_processor
    batch = inputs(processor, images[:2])
    tokens = projector_outputs(model, batch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with guard(model, fitted, text_grounded=True) as handle:
            assert handle.fit is None
            with handle.disabled():
                generate(handle.generate, batch)
            assert handle.fit is None  # an unguarded batch measures nothing
            generate(handle.generate, batch)
            fit = handle.fit
            generate(handle.generate, inputs(processor, images[2:]))
            assert handle.fit is fit  # measured once
    assert fit_warnings(record) == []
    ids, keep = batch["input_ids"], batch["attention_mask"].bool()
    keep &= ids != model.config.image_token_id
    with torch.no_grad():
        text = model.get_input_embeddings()(ids)[keep]
    assert fit.explained_variance_vision == pytest.approx(
        explained_variance(fitted, tokens, "vision"), abs=1e-5
    )
    assert fit.explained_variance_text == pytest.approx(
        explained_variance(fitted, text, "text"), abs=1e-5
    )
    assert fit.explained_variance_vision > 0.5  # in place
    assert fit.vision_vectors == tokens.numel() // tokens.shape[-1]
    assert fit.text_vectors == int(keep.sum())
    assert (fit.site, fit.trained_site, fit.min_fit) == ("projector", "projector", DEFAULT_MIN_FIT)
    assert GuardFit(**json.loads(json.dumps(fit.to_json()))) == fit


def test_without_text_grounding_no_text_is_measured(hf_model_and_processor, images, fitted):
    model, processor = hf_model_and_processor
    with guard(model, fitted) as handle:
        generate(handle.generate, inputs(processor, images[:2]))
    assert handle.fit.explained_variance_text is None and handle.fit.text_vectors == 0


def test_poor_fit_warns_once_and_a_good_fit_does_not(
    hf_model_and_processor, images, fitted, random_sae
):
    model, processor = hf_model_and_processor
    batch = inputs(processor, images[:2])
    cases = ((random_sae, DEFAULT_MIN_FIT, "an unrecorded site"), (fitted, 0.99, "projector"))
    for sae, min_fit, trained in cases:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            with guard(model, sae, min_fit=min_fit) as handle:
                generate(handle.generate, batch)
                generate(handle.generate, batch)
        (message,) = fit_warnings(record)  # once, not per batch
        assert handle.fit.explained_variance_vision < min_fit
        assert f"explains {handle.fit.explained_variance_vision:.3f} " in message
        assert f"below min_fit={min_fit:g} (trained at {trained})" in message


def test_an_sae_trained_at_the_projector_warns_at_a_layer(hf_model_and_processor, images, fitted):
    """The released VL-SAE's case the other way round: weights fitted at one site, read at
    another; once with its source (the sites differ), once imported (only the fit shows it)."""
    model, processor = hf_model_and_processor
    batch = inputs(processor, images[:4], QUESTIONS * 2)
    labelled = relabelled(fitted, site="layer", layer=LAYER)
    imported = relabelled(fitted)
    for sae, says in ((labelled, "but was trained at layer:0"), (imported, "an unrecorded site")):
        with (
            pytest.warns(GuardFitWarning, match=says),
            guard(model, sae, mode="paper", layer=LAYER) as handle,
        ):
            handle.generate(**batch, max_new_tokens=2, do_sample=False)
        assert handle.fit.site == "layer:1"
        assert handle.fit.explained_variance_vision < DEFAULT_MIN_FIT


def test_paper_mode_measures_the_pooled_states_it_encodes(hf_model_and_processor, images, fitted):
    model, processor = hf_model_and_processor
    batch = inputs(processor, images[:4], QUESTIONS * 2)
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[LAYER + 1]
    image = batch["input_ids"] == model.config.image_token_id
    positions = torch.arange(image.shape[1])
    last = torch.where(image, positions, -1).max(-1).values
    text = (positions > last[:, None]) & batch["attention_mask"].bool()
    v_bar = (hidden * image[..., None]).sum(1) / image.sum(1, keepdim=True)
    t_bar = (hidden * text[..., None]).sum(1) / text.sum(1, keepdim=True)
    sae = relabelled(fitted, site="layer", layer=LAYER + 1)  # where it is read
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with guard(model, sae, mode="paper", layer=LAYER, min_fit=-1e6) as handle:
            assert handle.fit is None
            handle.generate(**batch, max_new_tokens=2, do_sample=False)
    assert fit_warnings(record) == []  # the site named in the checkpoint and a low bar
    fit = handle.fit
    assert (fit.site, fit.trained_site, fit.trained_pooling) == ("layer:1", "layer:1", "token")
    assert (fit.vision_vectors, fit.text_vectors) == (4, 4)
    assert fit.explained_variance_vision == pytest.approx(
        explained_variance(sae, v_bar, "vision"), abs=1e-4
    )
    assert fit.explained_variance_text == pytest.approx(
        explained_variance(sae, t_bar, "text"), abs=1e-4
    )


def test_one_sample_in_paper_mode_cannot_be_measured(hf_model_and_processor, images, fitted):
    model, processor = hf_model_and_processor
    sae = relabelled(fitted, site="layer", layer=LAYER + 1)
    batch = inputs(processor, images[:1], QUESTIONS[:1])
    with (
        pytest.warns(GuardFitWarning, match="could not be measured"),
        guard(model, sae, mode="paper", layer=LAYER) as handle,
    ):
        handle.generate(**batch, max_new_tokens=1)
    assert handle.fit.explained_variance_vision is None and handle.fit.vision_vectors == 1


@pytest.mark.parametrize("mode", ["projector", "paper"])
def test_strict_refuses_before_changing_anything(hf_model_and_processor, images, random_sae, mode):
    model, processor = hf_model_and_processor
    batch = inputs(processor, images[:2])
    plain = generate(model.generate, batch)
    settings = {"mode": "paper", "layer": LAYER} if mode == "paper" else {}
    handle = guard(model, random_sae, strict=True, **settings)
    with pytest.raises(GuardError, match="strict=True: .*below min_fit"):
        generate(handle.generate, batch)
    assert not handle.attached and handle.stats.calls == 0
    assert handle.fit.explained_variance_vision < DEFAULT_MIN_FIT
    for runner in (model.generate, handle.generate):  # the model and the handle run unguarded
        after = generate(runner, batch)
        assert torch.equal(after[0], plain[0]) and torch.equal(after[1], plain[1])
    guard(model, random_sae).remove()  # nothing left attached: the model can be guarded again


def test_strict_lets_a_good_fit_guard(hf_model_and_processor, images, fitted):
    model, processor = hf_model_and_processor
    batch = inputs(processor, images[:2])
    plain = generate(model.generate, batch)
    with guard(model, fitted, strict=True, alpha=1.0) as handle:
        guarded = generate(handle.generate, batch)
    assert handle.stats.calls == 1 and not torch.equal(guarded[1], plain[1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_min_fit_must_be_finite(hf_model_and_processor, fitted, bad):
    model, _ = hf_model_and_processor
    with pytest.raises(GuardError, match="min_fit must be a finite"):
        guard(model, fitted, min_fit=bad)


def test_source_point_names_the_place_of_a_layer():
    assert Source(site="layer", layer=3, point="output").place == "layer:4"
    assert Source(site="layer", layer=3, point="input").place == "layer:3"
    assert Source(site="layer", layer=3).place == "layer:3"  # not recorded: collect's input
    assert Source(site="projector").place == "projector" and Source().place is None
    old = SAEConfig.model_validate_json(
        '{"d_in": 4, "n_concepts": 8, "k": 2, "source": {"site": "layer", "layer": 3}}'
    )  # a config.json written before the point was recorded
    assert old.source.point is None
    for bad in ({"point": "input"}, {"site": "projector", "point": "output"}):
        with pytest.raises(ValueError, match="point applies to site 'layer' only"):
            Source(**bad)


@pytest.mark.parametrize(
    "trained, settings, place",
    [  # the same residual-stream tensor, named from either side of the layer boundary
        ({"layer": LAYER, "point": "output"}, {"layer": LAYER}, "layer:1"),
        ({"layer": LAYER + 1, "point": "input"}, {"layer": LAYER}, "layer:1"),
        ({"layer": LAYER, "point": "output"}, {"layer": LAYER + 1, "point": "input"}, "layer:1"),
        ({"layer": LAYER, "point": "input"}, {"layer": LAYER, "point": "input"}, "layer:0"),
    ],
)
def test_paper_mode_at_the_trained_place_does_not_warn(
    hf_model_and_processor, images, fitted, trained, settings, place
):
    model, processor = hf_model_and_processor
    sae = relabelled(fitted, site="layer", **trained)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with guard(model, sae, mode="paper", min_fit=-1e6, **settings) as handle:
            handle.generate(**inputs(processor, images[:4], QUESTIONS * 2), max_new_tokens=1)
    assert fit_warnings(record) == []
    assert handle.fit.site == handle.fit.trained_site == place
    assert handle.fit.trained_point == trained["point"]


def test_paper_mode_at_another_point_warns_once_naming_both(hf_model_and_processor, images, fitted):
    """The official protocol's case: trained at the input of layer L, guarding its output."""
    model, processor = hf_model_and_processor
    batch = inputs(processor, images[:4], QUESTIONS * 2)
    for point, trained in (("input", "the input of decoder layer 0"), (None, "point not recorded")):
        sae = relabelled(fitted, site="layer", layer=LAYER, point=point)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            with guard(model, sae, mode="paper", layer=LAYER, min_fit=-1e6) as handle:
                handle.generate(**batch, max_new_tokens=2, do_sample=False)
                handle.generate(**batch, max_new_tokens=2, do_sample=False)
        (message,) = fit_warnings(record)  # once: the placement check is the only one
        assert message.startswith(
            "the SAE reads layer:1 (the output of decoder layer 0) but was trained at layer:0 ("
        )
        assert trained in message
        assert (handle.fit.point, handle.fit.trained_point) == ("output", point)
        assert GuardFit(**json.loads(json.dumps(handle.fit.to_json()))) == handle.fit
