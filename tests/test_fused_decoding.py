"""Fused decoding (vlsae_guard.decoding) through paper mode: one prefix for both arms under
sampling, the first step's fusion by hand, batches as batch size 1, greedy ids unchanged."""

from __future__ import annotations

import math

import pytest
import torch
from _decoding_support import alone as rows
from _decoding_support import left_padded

from vlsae_guard import GuardConfig, guard
from vlsae_guard.backends import detect
from vlsae_guard.core.guard import GuardError
from vlsae_guard.core.paper import PaperIntervention
from vlsae_guard.decoding import DecodingOptions, SeparateArms, Stream, decode

LAYER = 1
PROMPTS = [
    "USER: <image>\nIs there a dog in the image? ASSISTANT:",
    "USER: <image>\nWhat is it? ASSISTANT:",
    "USER: <image>\nDescribe the picture in a few words please. ASSISTANT:",
]
# New tokens of greedy paper mode (layer 1, defaults, 8 steps) on PROMPTS, recorded with the
# doubled-batch model.generate implementation that the engine replaced (same for exact=True).
GREEDY_BEFORE = [
    [812, 837, 613, 296, 221, 359, 541, 199],
    [541, 621, 102, 207, 182, 509, 3, 546],
    [541, 199, 1, 793, 230, 617, 151, 51],
]


@pytest.fixture(scope="module")
def batch(hf_model_and_processor, tiny_images):
    """PROMPTS left-padded to one batch (their lengths differ), one image each."""
    out = left_padded(hf_model_and_processor[1], tiny_images[:3], PROMPTS)
    assert len(set(out["attention_mask"].sum(1).tolist())) == 3
    return out


def paper(model, sae, inputs, **kwargs):
    settings = {k: kwargs.pop(k) for k in ("exact", "c_beta") if k in kwargs}
    with guard(model, sae, mode="paper", layer=LAYER, **settings) as handle, torch.no_grad():
        return handle.generate(**inputs, **kwargs)


@pytest.mark.filterwarnings("ignore::vlsae_guard.GuardFitWarning")
def test_sampling_feeds_one_prefix_to_both_arms(hf_model_and_processor, layer_sae, batch):
    """Fails with the doubled-batch generate(): there each half sampled its own token."""
    model, _ = hf_model_and_processor
    fed = []  # (2B,) token ids the embedding layer saw at each decoding step

    def record(module, args):
        if args[0].shape[1] == 1:
            fed.append(args[0][:, 0].clone())

    hook = model.get_input_embeddings().register_forward_pre_hook(record)
    try:
        torch.manual_seed(0)
        # A loose plausibility cutoff leaves many tokens to sample from.
        out = paper(
            model, layer_sae, batch, c_beta=0.02, do_sample=True, max_new_tokens=16, top_k=0
        )
    finally:
        hook.remove()
    b, new = len(PROMPTS), out[:, batch["input_ids"].shape[1] :]
    assert len(fed) == new.shape[1] - 1 >= 8
    for step, tokens in enumerate(fed):
        assert tokens[:b].tolist() == tokens[b:].tolist(), f"the arms diverged at step {step + 1}"
        assert tokens[:b].tolist() == new[:, step].tolist()  # returned: what both arms were fed
    assert len({tuple(r) for r in new.tolist()}) == b


@pytest.mark.filterwarnings("ignore::vlsae_guard.GuardFitWarning")
def test_first_step_fusion_equals_the_arms_by_hand(hf_model_and_processor, layer_sae, batch):
    model, _ = hf_model_and_processor
    config = GuardConfig(mode="paper", layer=LAYER)
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # generate()'s position ids (left padding)
    is_image = batch["input_ids"] == model.config.image_token_id
    idx = torch.arange(mask.shape[1])
    last = torch.where(is_image, idx, -1).max(-1).values
    is_text = (idx > last[:, None]) & mask.bool()
    shift_of = PaperIntervention(layer_sae, config).text_shift

    def shift(module, args, out):
        v_bar = (out * is_image[..., None]).sum(1) / is_image.sum(1, keepdim=True)
        t_bar = (out * is_text[..., None]).sum(1) / is_text.sum(1, keepdim=True)
        return out + shift_of(v_bar, t_bar)[:, None, :] * is_text[..., None]

    with torch.no_grad():
        plain = model(**batch, position_ids=positions).logits[:, -1]
        hook = detect(model).decoder_layers()[LAYER].register_forward_hook(shift)
        try:
            guarded = model(**batch, position_ids=positions).logits[:, -1]
        finally:
            hook.remove()
    fused = (1 - config.c_alpha) * plain + config.c_alpha * guarded
    fused[plain < plain.max(-1, keepdim=True).values + math.log(config.c_beta)] = -math.inf
    assert not torch.allclose(plain, guarded)
    out = paper(
        model, layer_sae, batch, max_new_tokens=1, output_scores=True, return_dict_in_generate=True
    )
    (scores,) = out.scores
    finite = torch.isfinite(fused)
    assert torch.equal(torch.isfinite(scores), finite) and finite.sum(-1).min() >= 1
    torch.testing.assert_close(scores[finite], fused[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore::vlsae_guard.GuardFitWarning")
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_a_padded_batch_decodes_as_each_sample_alone(
    hf_model_and_processor, layer_sae, batch, sampled
):
    model, _ = hf_model_and_processor
    decoding = dict(max_new_tokens=10, c_beta=0.02)
    if sampled:
        decoding.update(do_sample=True, top_k=0, temperature=1.5)
    together = paper(model, layer_sae, batch, seed=7, **decoding)[:, batch["input_ids"].shape[1] :]
    for i in range(len(PROMPTS)):
        one = rows(batch, i)
        alone = paper(model, layer_sae, one, seed=7 + i, **decoding)[0, one["input_ids"].shape[1] :]
        assert together[i, : len(alone)].tolist() == alone.tolist()
        assert set(together[i, len(alone) :].tolist()) <= {model.generation_config.pad_token_id}


@pytest.mark.filterwarnings("ignore::vlsae_guard.GuardFitWarning")
@pytest.mark.parametrize("exact", [False, True], ids=["cached", "exact"])
def test_greedy_paper_mode_keeps_its_token_ids(hf_model_and_processor, layer_sae, batch, exact):
    model, _ = hf_model_and_processor
    out = paper(model, layer_sae, batch, exact=exact, max_new_tokens=8, do_sample=False)
    assert out[:, : batch["input_ids"].shape[1]].tolist() == batch["input_ids"].tolist()
    assert out[:, batch["input_ids"].shape[1] :].tolist() == GREEDY_BEFORE


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ({"num_beams": 2}, "one token per sample"),
        ({"repetition_penalty": 1.2}, "does not implement"),
    ],
)
def test_unsupported_generate_arguments_are_refused(
    hf_model_and_processor, layer_sae, batch, argument, message
):
    model, _ = hf_model_and_processor
    with pytest.raises(GuardError, match=message):
        paper(model, layer_sae, batch, max_new_tokens=2, **argument)


def test_each_arm_decodes_as_generate_does(hf_model_and_processor, batch):
    """Two streams with their own prompts (arm b: the text alone, other lengths): following
    either arm's logits reproduces model.generate on that arm's prompts."""
    model, processor = hf_model_and_processor
    tok = processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        text = dict(
            tok([p.replace("<image>\n", "") for p in PROMPTS], return_tensors="pt", padding=True)
        )
    finally:
        tok.padding_side = side
    options = DecodingOptions.resolve(model, max_new_tokens=6, do_sample=False)
    followed = {}
    with torch.no_grad():
        for arm, prompt in (("a", batch), ("b", text)):
            arms = SeparateArms(Stream(model, batch), Stream(model, text))
            follow = (lambda a, b, step: a) if arm == "a" else (lambda a, b, step: b)
            ours = decode(arms, follow, options)[:, batch["input_ids"].shape[1] :]
            theirs = model.generate(**prompt, max_new_tokens=6, do_sample=False)
            assert ours.tolist() == theirs[:, prompt["input_ids"].shape[1] :].tolist(), arm
            followed[arm] = ours.tolist()
    assert followed["a"] != followed["b"]
