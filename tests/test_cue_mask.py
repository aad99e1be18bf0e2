"""Cue masking: object maps fitted from labelled images, and the guard mode that uses them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _cue_support import object_map

from vlsae_guard import GuardError, guard, methods
from vlsae_guard.backends import detect
from vlsae_guard.core.checkpoint import load as load_sae
from vlsae_guard.core.intervention import GuardConfig
from vlsae_guard.core.object_evidence import (
    QUANTILES,
    ObjectConcepts,
    ObjectEntry,
    fit_object_concepts,
    pool,
    pooled_codes,
)
from vlsae_guard.core.sae import Codes


def confounded_images(n: int = 3000, seed: int = 0):
    """Concepts 0/1/2 respond to ball/kite/dog; kite comes with 95% of balls (the cue)."""
    g = torch.Generator().manual_seed(seed)
    ball = torch.rand(n, generator=g) < 0.4
    kite = torch.where(ball, torch.rand(n, generator=g) < 0.95, torch.rand(n, generator=g) < 0.2)
    dog = torch.rand(n, generator=g) < 0.3
    labels = torch.stack([ball, kite, dog], 1)
    pooled = 0.1 * torch.rand(n, 6, generator=g)
    pooled[:, :3] += labels.float() * torch.tensor([3.0, 1.0, 2.0])
    return pooled, labels


def test_the_fit_credits_each_concept_to_its_own_object_not_to_its_companion():
    pooled, labels = confounded_images()
    names = ["ball", "kite", "dog"]
    fitted = fit_object_concepts(pooled, labels, names, top=1)
    assert {n: fitted.objects[n].concepts for n in names} == {"ball": [0], "kite": [1], "dog": [2]}
    # the naive route (mean activation of images naming the kite minus the others) picks the ball
    gap = pooled[labels[:, 1]].mean(0) - pooled[~labels[:, 1]].mean(0)
    assert int(gap.argmax()) == 0
    assert fitted.cues("kite", 0.8, 1.5) == ["ball"]  # P(kite | ball) ~ 0.95
    assert fitted.cues("ball", 0.8, 1.5) == []  # P(ball | kite) ~ 0.7: no cue
    assert fitted.cues("dog", 0.5, 1.0) == []


def test_thresholds_follow_the_recall_floor_and_the_map_round_trips(tmp_path):
    pooled, labels = confounded_images()
    fitted = fit_object_concepts(pooled, labels, ["ball", "kite", "dog"], top=2)
    kite = fitted.objects["kite"]
    assert kite.threshold(0.99) <= kite.threshold(0.9) <= kite.threshold(0.5)
    held = pooled[-1000:][labels[-1000:, 1]][:, kite.concepts] @ torch.tensor(kite.weights)
    assert (held >= kite.threshold(0.9)).float().mean() == pytest.approx(0.9, abs=0.01)
    path = fitted.save(tmp_path / "objects.json")
    assert ObjectConcepts.load(path) == fitted


def test_a_bad_object_map_is_named(tmp_path):
    path = tmp_path / "objects.json"
    path.write_text(json.dumps({"n_concepts": 4, "objects": {"kite": {"concepts": [9]}}}))
    with pytest.raises(ValueError, match="objects.json: not an object map") as e:
        ObjectConcepts.load(path)
    assert "objects.kite.weights" in str(e.value)
    entry = ObjectEntry(concepts=[7], weights=[1.0], positive_quantiles=[0.0] * QUANTILES,
                        n_positive=3)  # fmt: skip
    with pytest.raises(ValueError, match="concept 7 >= n_concepts 4"):
        ObjectConcepts(n_concepts=4, objects={"kite": entry})


def test_pooling_topk_codes_equals_pooling_dense_codes():
    g = torch.Generator().manual_seed(1)
    values = torch.rand(10, 3, generator=g)
    indices = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(10)])
    codes = Codes(values, indices, 8)
    owners = torch.tensor([0] * 4 + [1] * 6)
    dense = codes.dense()
    expected = torch.stack([pool(dense[:4]), pool(dense[4:])])
    assert torch.equal(pooled_codes(codes, owners, 2), expected)


# -- the guard mode on the tiny LLaVA --------------------------------------------------------


def projected(model, inputs, **guarded) -> torch.Tensor:
    """What the language model receives from the projector (after any guard hook)."""
    seen = []
    hook = detect(model).projector().register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return seen[0]


def inputs_for(processor, images, questions):
    processor.tokenizer.padding_side = "left"
    prompts = [f"USER: <image>\n{q} ASSISTANT:" for q in questions]
    return dict(processor(images=images, text=prompts, return_tensors="pt", padding=True))


def test_the_asked_objects_cue_is_masked_and_nothing_else(
    hf_model_and_processor, cue_sae_dir, tiny_images
):
    model, processor = hf_model_and_processor
    questions = ["Is there a kite in the image?", "Is there a dog in the image?"]
    inputs = inputs_for(processor, tiny_images[:2], questions)
    plain = projected(model, inputs)
    with guard(model, cue_sae_dir, method="cue-mask", tokenizer=processor.tokenizer) as handle:
        masked = projected(model, inputs)
        assert handle.method == "cue-mask" and handle.stats.calls == 1
    bias = load_sae(cue_sae_dir).decoder_for("vision").bias
    assert torch.allclose(masked[0], bias.expand_as(masked[0]))  # kite: its cue, the ball, gone
    assert torch.equal(masked[1], plain[1])  # dog has no cue: untouched, bit for bit
    assert torch.equal(projected(model, inputs), plain)  # removed: the model as it was


def test_an_undetected_cue_masks_nothing(
    hf_model_and_processor, cue_sae_dir, tiny_images, tmp_path
):
    model, processor = hf_model_and_processor
    sae = load_sae(cue_sae_dir)
    path = object_map(sae, present=1e6).save(tmp_path / "objects.json")  # no ball reaches it
    inputs = inputs_for(processor, tiny_images[:1], ["Is there a kite in the image?"])
    plain = projected(model, inputs)
    with guard(model, cue_sae_dir, method="cue-mask", objects=str(path),
               tokenizer=processor.tokenizer):  # fmt: skip
        assert torch.equal(projected(model, inputs), plain)


def test_cue_mask_is_a_method_and_refuses_before_attaching(
    hf_model_and_processor, tiny_sae_dir, cue_sae_dir
):
    model, processor = hf_model_and_processor
    hooks = dict(detect(model).projector()._forward_hooks)
    with pytest.raises(GuardError, match="objects.json: cannot read the object map"):
        guard(model, tiny_sae_dir, method="cue-mask", tokenizer=processor.tokenizer)
    with pytest.raises(methods.MethodError, match="do not apply to mode 'cue-mask'"):
        methods.attach("cue-mask", model, cue_sae_dir, alpha=0.5)
    with pytest.raises(GuardError, match="tokenizer= is read by mode 'cue-mask' only"):
        guard(model, cue_sae_dir, tokenizer=processor.tokenizer)
    assert dict(detect(model).projector()._forward_hooks) == hooks
    assert methods.METHODS["cue-mask"].needs_sae
    with pytest.raises(ValueError, match="runs mode 'cue-mask', not 'paper'"):
        GuardConfig(method="cue-mask", mode="paper")
    assert GuardConfig(method="cue-mask").mode == "cue-mask"


def test_an_object_map_is_built_from_labelled_images(tiny_hf_dir, tiny_sae_dir, tmp_path):
    from vlsae_guard.concepts.object_map import ObjectMapConfig, build_object_map
    from vlsae_guard.lab import tiny
    from vlsae_guard.outputs import OutputError

    rows = []
    for i, image in enumerate(tiny.make_images(12, seed=3)):
        image.save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "objects": ["Kite"] if i % 2 else ["kite", "dog"]})
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = ObjectMapConfig(model=str(tiny_hf_dir), sae=str(tiny_sae_dir), labels=labels,
                             images=tmp_path, out=tmp_path / "objects.json", top=4)  # fmt: skip
    fitted = ObjectConcepts.load(build_object_map(config))
    assert fitted.prevalence == {"dog": 0.5, "kite": 1.0}
    assert fitted.conditional["dog"]["kite"] == 1.0
    # the command line: the same map, written where guard(method="cue-mask") looks by default
    from vlsae_guard.cli import main

    sae_dir = tmp_path / "sae"
    shutil.copytree(tiny_sae_dir, sae_dir)
    argv = ["object-map", "--model", str(tiny_hf_dir), "--sae", str(sae_dir), "--labels",
            str(labels), "--images", str(tmp_path), "--top", "4"]  # fmt: skip
    assert main(argv) == 0
    assert ObjectConcepts.load(sae_dir / "objects.json") == fitted.model_copy(
        update={"fitted_on": {**fitted.fitted_on, "sae": str(sae_dir)}}
    )
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(OutputError, match="a-file/out: cannot write there"):  # before loading
        build_object_map(config.model_copy(update={"out": blocked / "out" / "objects.json"}))
    labels.write_text('{"image": "missing.png", "objects": ["kite"]}\n')
    with pytest.raises(ValueError, match=r"labels.jsonl:1: no image file .*missing.png"):
        build_object_map(config)
    labels.write_text('{"image": "0.png"}\n')
    assert main(argv) != 0
    with pytest.raises(ValueError, match=r"labels.jsonl:1: expected"):
        build_object_map(config)


def test_background_fill_is_the_mean_of_the_images_unmasked_tokens(
    hf_model_and_processor, cue_sae_dir, tiny_images, tmp_path
):
    model, processor = hf_model_and_processor
    sae = load_sae(cue_sae_dir)
    cue = object_map(sae, present=0.0)
    inputs = inputs_for(processor, tiny_images[:2], ["Is there a kite in the image?"] * 2)
    plain = projected(model, inputs)
    holds = [sae.encode_topk(p, "vision").indices for p in plain]  # tokens x k, per image
    # the ball: the concept of token 0 of image 0 that the fewest tokens hold
    ball = [min(holds[0][0].tolist(), key=lambda c: sum(int((h == c).sum()) for h in holds))]
    entry = cue.objects["ball"].model_copy(update={"concepts": ball, "weights": [1.0] * len(ball)})
    path = cue.model_copy(update={"objects": {**cue.objects, "ball": entry}}).save(
        tmp_path / "objects.json"
    )
    with guard(model, cue_sae_dir, method="cue-mask", objects=str(path), fill="background",
               tokenizer=processor.tokenizer):  # fmt: skip
        masked = projected(model, inputs)
    for i in range(2):
        hide = (holds[i] == ball[0]).any(-1)
        assert not hide.all() and (hide.any() or i == 1)  # image 0's token 0 holds the ball
        if not hide.any():  # the ball is not in this image: nothing to mask
            assert torch.equal(masked[i], plain[i])
            continue
        background = plain[i][~hide].mean(0)
        assert torch.allclose(masked[i][hide], background.expand(int(hide.sum()), -1), atol=1e-5)
        assert torch.equal(masked[i][~hide], plain[i][~hide])


@pytest.mark.parametrize("family", ["hf", "next", "llava"])
def test_each_family_masks_the_rows_of_the_sample_that_asks(
    request, family, cue_sae_dir, tiny_images
):
    """LLaVA-NeXT projects several crops per image and the original llava code splices the
    images itself: the masked rows are exactly those of the sample asking about the kite."""
    from test_guard import hf_inputs, llava_inputs

    questions = ["Is there a kite in the image?", "Is there a dog in the image?"]
    if family == "llava":
        model, tokenizer = request.getfixturevalue("llava_model_and_tokenizer")
        inputs = llava_inputs(model, tokenizer, tiny_images[:2], questions)
    else:
        fixture = "hf_model_and_processor" if family == "hf" else "next_model_and_processor"
        model, processor = request.getfixturevalue(fixture)
        tokenizer = processor.tokenizer
        inputs = hf_inputs(processor, tiny_images[:2], questions)

    def projected_rows() -> torch.Tensor:
        seen = []
        hook = detect(model).projector().register_forward_hook(lambda m, a, o: seen.append(o))
        try:
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=1, do_sample=False)
        finally:
            hook.remove()
        out = torch.cat(seen)  # the original code may project image by image
        return out.reshape(-1, out.shape[-2], out.shape[-1]) if out.dim() == 3 else out[None]

    plain = projected_rows()
    with guard(model, cue_sae_dir, method="cue-mask", tokenizer=tokenizer):
        masked = projected_rows()
    bias = load_sae(cue_sae_dir).decoder_for("vision").bias
    hidden = [bool(torch.allclose(row, bias.expand_as(row))) for row in masked]
    untouched = [bool(torch.equal(a, b)) for a, b in zip(masked, plain, strict=True)]
    half = len(plain) // 2  # the two images have one size: as many rows (crops) each
    assert half >= 1 and (family != "next" or half > 1)
    assert all(hidden[:half]) and all(untouched[half:]) and not any(hidden[half:])
    assert torch.equal(projected_rows(), plain)
