"""Paper mode: KV-cached generation vs the official recompute semantics vs the formulas by hand."""

from __future__ import annotations

import math

import pytest
import torch

from vlsae_guard import AuxConfig, GuardConfig, SAEConfig, build, guard
from vlsae_guard.backends import detect
from vlsae_guard.core.paper import PaperIntervention

LAYER, ALPHA, BETA, C_ALPHA, C_BETA = 1, 0.8, 0.9, 0.6, 0.8
STEPS = 5
QUESTION = "USER: <image>\nIs there a dog in the image? ASSISTANT:"


@pytest.fixture(scope="module")
def sae(layer_sae):
    return layer_sae


@pytest.fixture(scope="module")
def inputs(hf_model_and_processor, tiny_images):
    """Two prompts of equal length (no padding), so plain forward calls use the same positions
    as generate() does."""
    _, processor = hf_model_and_processor
    return dict(processor(images=tiny_images[:2], text=[QUESTION] * 2, return_tensors="pt"))


def paper_generate(model, sae, inputs, **settings):
    with (
        guard(
            model,
            sae,
            mode="paper",
            layer=LAYER,
            alpha=ALPHA,
            beta=BETA,
            c_alpha=C_ALPHA,
            c_beta=C_BETA,
            **settings,
        ) as handle,
        torch.no_grad(),
    ):
        out = handle.generate(
            **inputs,
            max_new_tokens=STEPS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return out.sequences, out.scores


def reference(model, sae, inputs):
    """The formulas as written, the official way: every step re-runs the full sequence twice."""
    ids, mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
    image_id = model.config.image_token_id
    layer = detect(model).decoder_layers()[LAYER]
    scores = []
    for _ in range(STEPS):
        positions = torch.arange(ids.shape[1])
        is_image = ids == image_id
        last = torch.where(is_image, positions, -1).max(-1).values
        is_text = positions > last[:, None]

        def shift(module, args, out, is_image=is_image, is_text=is_text):
            h = out.float()
            v_bar = (h * is_image[..., None]).sum(1) / is_image.sum(1, keepdim=True)
            t_bar = (h * is_text[..., None]).sum(1) / is_text.sum(1, keepdim=True)
            z = (1 - BETA) * sae.encode(t_bar, "text") + BETA * sae.encode(v_bar, "vision")
            t_rec = sae.decode(z, "text")
            t_new = (1 - ALPHA) * t_bar + ALPHA * t_rec
            return out + (t_new - t_bar)[:, None, :] * is_text[..., None]

        with torch.no_grad():
            plain = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[:, -1]
            hook = layer.register_forward_hook(shift)
            try:
                guarded = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
            finally:
                hook.remove()
        guarded = guarded[:, -1]
        fused = (1 - C_ALPHA) * plain + C_ALPHA * guarded
        cutoff = plain.max(-1, keepdim=True).values + math.log(C_BETA)
        fused = fused.masked_fill(plain < cutoff, -math.inf)
        scores.append(fused)
        ids = torch.cat([ids, fused.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids, scores


def assert_scores_close(a, b):
    finite = torch.isfinite(a)
    assert torch.equal(finite, torch.isfinite(b))
    torch.testing.assert_close(a[finite], b[finite], rtol=1e-4, atol=1e-4)


def test_exact_mode_equals_the_reference(hf_model_and_processor, sae, inputs):
    model, _ = hf_model_and_processor
    ids, scores = paper_generate(model, sae, inputs, exact=True)
    ref_ids, ref_scores = reference(model, sae, inputs)
    assert ids.tolist() == ref_ids.tolist()
    for ours, theirs in zip(scores, ref_scores, strict=True):
        assert_scores_close(ours, theirs)


def test_cached_first_token_equals_exact(hf_model_and_processor, sae, inputs):
    model, _ = hf_model_and_processor
    cached_ids, cached = paper_generate(model, sae, inputs)
    exact_ids, exact = paper_generate(model, sae, inputs, exact=True)
    assert_scores_close(cached[0], exact[0])
    assert cached_ids[:, -STEPS].tolist() == exact_ids[:, -STEPS].tolist()


def test_paper_mode_changes_output_and_removes_cleanly(hf_model_and_processor, sae, inputs):
    model, _ = hf_model_and_processor

    def plain_logits():
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=STEPS,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        return torch.stack(out.logits)

    plain = plain_logits()
    ids, scores = paper_generate(model, sae, inputs)
    assert not torch.equal(torch.stack(scores), plain)
    assert torch.equal(plain_logits(), plain)


def test_paper_mode_on_the_original_llava(llava_model_and_tokenizer, tiny_images, sae):
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_images, tokenizer_image_token

    model, tokenizer = llava_model_and_tokenizer
    ids = tokenizer_image_token(QUESTION, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    images = process_images(tiny_images[:1], model.get_vision_tower().image_processor, model.config)
    kwargs = dict(
        images=images,
        image_sizes=[tiny_images[0].size],
        max_new_tokens=STEPS,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        plain = model.generate(ids, **kwargs)
        with guard(model, sae, mode="paper", layer=LAYER) as handle:
            out = handle.generate(ids, **kwargs)
            seen = handle.paper.batch
    assert handle.stats.calls == STEPS  # one shifted layer call per generated token
    assert seen is None  # state is dropped after each generate()
    assert not torch.equal(torch.stack(out.scores), torch.stack(plain.scores))


def test_original_llava_layout_matches_where_features_are_spliced(
    llava_model_and_tokenizer, tiny_images
):
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_images, tokenizer_image_token

    model, tokenizer = llava_model_and_tokenizer
    prompts = [QUESTION, "USER: <image>\nDescribe it. ASSISTANT:"]
    ids = [
        tokenizer_image_token(p, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt") for p in prompts
    ]
    width = max(len(i) for i in ids)
    batch = torch.stack([torch.cat([i.new_full((width - len(i),), 0), i]) for i in ids])
    mask = torch.stack([torch.arange(width) >= width - len(i) for i in ids]).long()
    images = process_images(tiny_images[:2], model.get_vision_tower().image_processor, model.config)
    backend = detect(model)
    layouts, features, embeds = [], [], []
    undo = backend.capture_layout(lambda image_mask, attn: layouts.append(image_mask))
    hooks = [
        backend.projector().register_forward_hook(lambda m, a, out: features.append(out)),
        backend.language_model().register_forward_pre_hook(
            lambda m, a, kw: embeds.append(kw["inputs_embeds"]), with_kwargs=True
        ),
    ]
    try:
        with torch.no_grad():
            model(input_ids=batch, attention_mask=mask, images=images)
    finally:
        undo()
        for hook in hooks:
            hook.remove()
    (layout,), (feats,), (lm_in,) = layouts, features, embeds
    for i in range(2):
        assert torch.equal(lm_in[i][layout[i]], feats[i])


def test_input_point_shifts_the_layer_input(hf_model_and_processor, sae, inputs):
    """point="input" shifts what layer L reads, point="output" what it writes: the two
    hooks are really at different places."""
    model, _ = hf_model_and_processor
    _, at_output = paper_generate(model, sae, inputs)
    _, at_input = paper_generate(model, sae, inputs, point="input")
    assert not torch.equal(torch.stack(at_input), torch.stack(at_output))


def test_float16_sae_is_a_cast_copy_and_the_default_keeps_the_callers(
    hf_model_and_processor, inputs
):
    """sae_dtype="float16" (the official scripts' .half()) casts a copy, auxiliary AE included;
    by default the caller's float32 SAE itself is used."""
    model, _ = hf_model_and_processor
    aux = AuxConfig(d_vision=64, d_text=64, d_proj=64)
    sae = build(SAEConfig(d_in=64, n_concepts=128, k=8, aux=aux)).eval()
    settings = dict(mode="paper", layer=LAYER, min_fit=-1e6)
    with guard(model, sae, **settings) as handle:
        assert handle.intervention.sae is sae
    with guard(model, sae, sae_dtype="float16", topk_ties="official", **settings) as handle:
        used = handle.intervention.sae
        ids = handle.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert used is not sae and sae.dtype == torch.float32
    assert {p.dtype for p in used.parameters()} == {torch.float16}  # the aux AE's too
    assert used.aux.vision_projection.weight.dtype == torch.float16
    assert ids.shape[1] == inputs["input_ids"].shape[1] + 2 and handle.stats.calls > 0


def test_official_ties_reach_the_text_shift():
    """The shift encodes both pooled vectors with the configured TopK: on a wide float16 SAE
    "official" drops ties that "keep-k" keeps, so the two shifts differ."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # fixed weights: the suite's order must not decide the ties
        sae = build(SAEConfig(d_in=64, n_concepts=4096, k=64)).half().eval()
    gen = torch.Generator().manual_seed(0)
    v_bar, t_bar = torch.randn(2, 8, 64, generator=gen).half()
    shifts = {}
    for ties in ("keep-k", "official"):
        config = GuardConfig(mode="paper", layer=0, topk_ties=ties)
        shifts[ties] = PaperIntervention(sae, config).text_shift(v_bar, t_bar)
        with torch.no_grad():
            z_v, z_t = sae.encode(v_bar, "vision", ties), sae.encode(t_bar, "text", ties)
            by_hand = ALPHA * (sae.decode(torch.lerp(z_t, z_v, BETA), "text") - t_bar)
        assert torch.equal(shifts[ties], by_hand)
    assert not torch.equal(shifts["keep-k"], shifts["official"])
