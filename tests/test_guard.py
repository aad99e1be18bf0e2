"""guard() on the tiny models of every backend: exact when off, effective when on, removable."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from vlsae_guard import (
    VLSAE,
    GuardConfig,
    GuardError,
    SAEConfig,
    Source,
    UnsupportedModelError,
    guard,
)
from vlsae_guard.backends import detect
from vlsae_guard.core.intervention import ProjectorIntervention

HIDDEN = 64  # tiny.TinySizes.text_hidden
QUESTIONS = ["Is there a dog in the image?", "What color is the large object?"]
STEPS = 6


def make_sae(seed=0, d_in=HIDDEN, **config) -> VLSAE:
    torch.manual_seed(seed)
    config.setdefault("shared_concepts", list(range(0, 256, 3)))
    return VLSAE(SAEConfig(d_in=d_in, n_concepts=256, k=16, **config)).eval()


@pytest.fixture(scope="module")
def sae():
    return make_sae()


# --- one adapter per backend: build a batch, generate, count image tokens ---------------------


@dataclass
class Case:
    """A loaded tiny model with a batch of prompts for it."""

    model: torch.nn.Module
    inputs: dict
    image_tokens: int  # rows x tokens the projector emits for this batch

    def generate(self, runner=None, **kw):
        runner = runner or self.model.generate
        with torch.no_grad():
            out = runner(
                **self.inputs,
                max_new_tokens=STEPS,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                **kw,
            )
        return out.sequences, torch.stack(out.logits)


def hf_inputs(processor, images, questions):
    processor.tokenizer.padding_side = "left"
    prompts = [f"USER: <image>\n{q} ASSISTANT:" for q in questions]
    return dict(processor(images=images, text=prompts, return_tensors="pt", padding=True))


def next_image_tokens(model, inputs) -> int:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    crops = sum(
        image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        for size in inputs["image_sizes"].tolist()
    )
    return crops * (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2


def llava_inputs(model, tokenizer, images, questions):
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_images, tokenizer_image_token

    ids = [
        tokenizer_image_token(
            f"USER: <image>\n{q} ASSISTANT:", tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt"
        )
        for q in questions
    ]
    width = max(len(i) for i in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.stack([torch.cat([i.new_full((width - len(i),), pad), i]) for i in ids])
    mask = torch.stack([torch.arange(width) >= width - len(i) for i in ids]).long()
    pixels = process_images(images, model.get_vision_tower().image_processor, model.config)
    return {
        "inputs": input_ids,
        "attention_mask": mask,
        "images": pixels,
        "image_sizes": [im.size for im in images],
    }


@pytest.fixture(scope="module", params=["hf", "next", "llava"])
def case(request, tiny_images):
    images = tiny_images[: len(QUESTIONS)]
    if request.param == "hf":
        model, processor = request.getfixturevalue("hf_model_and_processor")
        inputs = hf_inputs(processor, images, QUESTIONS)
        n = int((inputs["input_ids"] == model.config.image_token_id).sum())
    elif request.param == "next":
        model, processor = request.getfixturevalue("next_model_and_processor")
        inputs = hf_inputs(processor, images, QUESTIONS)
        n = next_image_tokens(model, inputs)
    else:
        model, tokenizer = request.getfixturevalue("llava_model_and_tokenizer")
        inputs = llava_inputs(model, tokenizer, images, QUESTIONS)
        n = len(images) * model.get_vision_tower().num_patches
    return Case(model, inputs, n)


@pytest.fixture(scope="module")
def baseline(case):
    return case.generate()


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def assert_untouched(model):
    """No hook and no instance attribute of ours is left on the model.

    transformers installs output-capturing hooks of its own on first use; ours are the only
    ones that live on the projector, the decoder layers and the top-level model.
    """
    backend = detect(model)
    ours = [model, backend.projector(), backend.language_model(), *backend.decoder_layers()]
    for module in ours:
        assert not module._forward_hooks and not module._forward_pre_hooks, module
    assert "generate" not in vars(model)
    assert "prepare_inputs_labels_for_multimodal" not in vars(model)


# --- exactness when the guard does nothing ---------------------------------------------------


def test_disabled_alpha0_and_removed_are_bit_exact(case, baseline, sae):
    ids, logits = baseline
    with guard(case.model, sae, alpha=0.0) as handle:
        assert same(case.generate(), baseline)
        assert handle.stats.calls == 0
    handle = guard(case.model, sae, alpha=1.0)
    with handle.disabled():
        assert same(case.generate(), baseline)
    handle.remove()
    assert_untouched(case.model)
    assert same(case.generate(), baseline)


@pytest.mark.parametrize(
    "settings",
    [
        {"alpha": 1.0},
        {"rewrite": "edit", "alpha": 1.0},
        {"text_grounded": True, "alpha": 1.0},
        {"alpha": 0.0, "steer": {5: 3.0}},
    ],
    ids=["replace", "edit", "text-grounded", "steer"],
)
def test_enabled_changes_output_and_sees_exactly_the_image_tokens(case, baseline, sae, settings):
    with guard(case.model, sae, **settings) as handle:
        _, logits = case.generate()
        assert handle.stats.calls == 1  # images are projected once, at prefill
        assert handle.stats.image_tokens == case.image_tokens
    assert not torch.equal(logits[0], baseline[1][0])
    assert_untouched(case.model)


def test_toggle_inside_one_process(case, baseline, sae):
    with guard(case.model, sae, alpha=1.0) as handle:
        on = case.generate()
        handle.enabled = False
        off = case.generate()
        handle.enabled = True
        again = case.generate()
    assert torch.equal(off[1], baseline[1])
    assert torch.equal(on[1], again[1]) and not torch.equal(on[1], off[1])


# --- only image-feature tokens change --------------------------------------------------------


def lm_input_embeds(case, handle=None):
    """The language model's input embeddings at prefill."""
    seen = []
    lm = detect(case.model).language_model()

    def record(module, args, kwargs):
        if kwargs.get("inputs_embeds") is not None:
            seen.append(kwargs["inputs_embeds"].clone())

    hook = lm.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            case.generate()
    finally:
        hook.remove()
    return seen[0]


def test_only_image_feature_positions_change(case, sae):
    plain = lm_input_embeds(case)
    with guard(case.model, sae, alpha=1.0):
        guarded = lm_input_embeds(case)
    changed = (plain != guarded).any(-1)
    newline = getattr(getattr(case.model, "model", None), "image_newline", None)
    if isinstance(newline, torch.nn.Parameter):
        is_newline = (plain == newline).all(-1)
        assert is_newline.any() and not changed[is_newline].any()
        assert int(changed.sum()) <= case.image_tokens
    else:
        assert int(changed.sum()) == case.image_tokens  # every image token, nothing else


# --- batching --------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [{"alpha": 1.0}, {"text_grounded": True, "alpha": 1.0}])
def test_batched_equals_batch_size_one(hf_model_and_processor, tiny_images, sae, settings):
    model, processor = hf_model_and_processor
    questions = ["Is there a dog in the image?", "Is there a red circle?", "Describe it."]
    batch = Case(model, hf_inputs(processor, tiny_images[:3], questions), 0)
    with guard(model, sae, **settings):
        ids, _ = batch.generate()
        for i, q in enumerate(questions):
            single = Case(model, hf_inputs(processor, tiny_images[i : i + 1], [q]), 0)
            one, _ = single.generate()
            assert ids[i, -STEPS:].tolist() == one[0, -STEPS:].tolist()


def test_mixed_batch_with_text_only_sample(hf_model_and_processor, tiny_images, sae):
    model, processor = hf_model_and_processor
    processor.tokenizer.padding_side = "left"
    prompts = ["USER: <image>\nIs there a dog? ASSISTANT:", "USER: Is there a dog? ASSISTANT:"]
    mixed = dict(processor(images=tiny_images[:1], text=prompts, return_tensors="pt", padding=True))
    text_only = dict(processor.tokenizer(prompts[1:], return_tensors="pt"))
    with guard(model, sae, text_grounded=True, alpha=1.0) as handle:
        ids, _ = Case(model, mixed, 0).generate()
        alone, _ = Case(model, text_only, 0).generate()
        assert handle.stats.image_tokens == model.config.image_seq_length
    assert ids[1, -STEPS:].tolist() == alone[0, -STEPS:].tolist()


def test_text_grounded_uses_the_prompts_own_concepts(hf_model_and_processor, tiny_images, sae):
    model, processor = hf_model_and_processor
    inputs = hf_inputs(processor, tiny_images[:2], QUESTIONS)
    projector = detect(model).projector()
    raw, guarded = [], []
    first = projector.register_forward_hook(lambda m, a, out: raw.append(out.clone()))
    with guard(model, sae, text_grounded=True, alpha=1.0) as handle:
        last = projector.register_forward_hook(lambda m, a, out: guarded.append(out.clone()))
        with torch.no_grad():
            model(**inputs)
        last.remove()
    first.remove()
    ids = inputs["input_ids"]
    text = (ids != model.config.image_token_id) & inputs["attention_mask"].bool()
    embeds = model.get_input_embeddings()(ids)
    inter = ProjectorIntervention.build(sae, handle.config)
    masks = inter.text_concepts([embeds[i][text[i]] for i in range(len(ids))])
    assert not torch.equal(masks[0], masks[1])  # the two questions differ
    owners = torch.arange(2).repeat_interleave(raw[0].shape[1])
    torch.testing.assert_close(guarded[0], inter(raw[0], owners, masks))


# --- dtypes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_with_fp32_sae(hf_model_and_processor, tiny_images, sae, dtype):
    model, processor = hf_model_and_processor
    half = copy.deepcopy(model).to(dtype)
    inputs = hf_inputs(processor, tiny_images[:2], QUESTIONS)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        plain = half(**inputs).logits
        with guard(half, sae, alpha=1.0) as handle:
            guarded = half(**inputs).logits
    assert guarded.dtype == dtype and torch.isfinite(guarded).all()
    assert not torch.equal(plain, guarded) and handle.intervention.sae.dtype == torch.float32


# --- handle lifecycle and validation ---------------------------------------------------------


def test_guard_twice_is_refused_and_remove_twice_is_noop(hf_model_and_processor, sae):
    model, _ = hf_model_and_processor
    handle = guard(model, sae)
    with pytest.raises(GuardError, match="already guarded"):
        guard(model, sae)
    assert len(detect(model).projector()._forward_hooks) == 1
    handle.remove()
    handle.remove()
    assert_untouched(model)
    guard(model, sae).remove()  # guarding again after removal works


def test_context_manager_removes_on_exception(hf_model_and_processor, sae):
    model, _ = hf_model_and_processor
    with pytest.raises(RuntimeError, match="boom"), guard(model, sae, text_grounded=True):
        raise RuntimeError("boom")
    assert_untouched(model)


def text_only_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=HIDDEN,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=50,
        )
    )


@pytest.mark.parametrize(
    "build, kwargs, error, match",
    [
        (lambda: make_sae(d_in=32), {}, GuardError, "width 64, but the SAE expects d_in=32"),
        (lambda: make_sae(source=Source(site="layer", layer=1)), {}, GuardError, "site 'layer'"),
        (make_sae, {"alpha": 3.0}, GuardError, "alpha"),
        (make_sae, {"steer": {999: 1.0}}, GuardError, "out of range"),
        (make_sae, {"mode": "paper", "layer": 9}, GuardError, "has 2 layers"),
        (make_sae, {"config": GuardConfig(), "alpha": 1.0}, GuardError, "not both"),
    ],
    ids=["width", "site", "alpha", "concept", "layer", "config-and-kwargs"],
)
def test_failed_guard_leaves_model_untouched(hf_model_and_processor, build, kwargs, error, match):
    model, _ = hf_model_and_processor
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        guard(model, build(), **kwargs)
    assert_untouched(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_text_only_model_is_refused(sae):
    model = text_only_model()
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        guard(model, sae)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_guard_loads_a_checkpoint_directory(hf_model_and_processor, sae, tmp_path):
    model, _ = hf_model_and_processor
    sae.save_pretrained(tmp_path / "sae")
    with guard(model, tmp_path / "sae", rewrite="edit") as handle:
        assert handle.intervention.sae.config == sae.config


def guarded_projection(model, inputs):
    """(raw, guarded) projector outputs of one forward pass under a text-grounded guard."""
    projector = detect(model).projector()
    raw, guarded = [], []
    first = projector.register_forward_hook(lambda m, a, out: raw.append(out.clone()))
    try:
        with guard(model, make_sae(), text_grounded=True, alpha=1.0):
            last = projector.register_forward_hook(lambda m, a, out: guarded.append(out.clone()))
            try:
                with torch.no_grad():
                    model(**inputs)
            finally:
                last.remove()
    finally:
        first.remove()
    return raw[0], guarded[0]


def test_several_images_per_prompt_map_to_their_sample(hf_model_and_processor, tiny_images):
    model, processor = hf_model_and_processor
    processor.tokenizer.padding_side = "left"
    prompts = [
        "USER: <image>\nand <image>\nAre these the same? ASSISTANT:",
        "USER: <image>\nIs there a dog? ASSISTANT:",
    ]
    inputs = dict(
        processor(images=tiny_images[:3], text=prompts, return_tensors="pt", padding=True)
    )
    raw, guarded = guarded_projection(model, inputs)
    ids = inputs["input_ids"]
    text = (ids != model.config.image_token_id) & inputs["attention_mask"].bool()
    embeds = model.get_input_embeddings()(ids)
    inter = ProjectorIntervention.build(make_sae(), GuardConfig(text_grounded=True, alpha=1.0))
    masks = inter.text_concepts([embeds[i][text[i]] for i in range(2)])
    owners = torch.tensor([0, 0, 1]).repeat_interleave(raw.shape[1])
    torch.testing.assert_close(guarded, inter(raw, owners, masks))
    assert not torch.equal(inter(raw, owners, masks), inter(raw, owners.flip(0), masks))


def test_right_padding_gives_the_same_guarded_features(hf_model_and_processor, tiny_images):
    model, processor = hf_model_and_processor
    features = []
    for side in ("left", "right"):
        processor.tokenizer.padding_side = side
        inputs = dict(
            processor(
                images=tiny_images[:2],
                text=[f"USER: <image>\n{q} ASSISTANT:" for q in QUESTIONS],
                return_tensors="pt",
                padding=True,
            )
        )
        features.append(guarded_projection(model, inputs)[1])
    processor.tokenizer.padding_side = "left"
    torch.testing.assert_close(features[0], features[1])
