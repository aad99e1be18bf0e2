"""PAI (Liu et al., ECCV 2024; vlsae_guard/methods/pai.py): arm a's logits equal an independent
implementation of the amplification (the model's own attention forward, its sdpa kernel swapped
for a hand-written last-row attention), the first fused step equals CFG.py's formula on the two
arms, the amplification acts only in the chosen layers, on image keys, while arm a runs, a batch
decodes as each sample alone, remove() restores the model, and the original llava backend
decodes as the transformers one on the same weights."""

from __future__ import annotations

import math

import pytest
import test_methods
import torch
from test_guard import llava_inputs
from test_methods import PROMPTS, alone, assert_scores, last_logits
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaAttention

from vlsae_guard import methods
from vlsae_guard.backends import detect
from vlsae_guard.decoding.fusions import FUSIONS, PAISettings
from vlsae_guard.lab import tiny
from vlsae_guard.methods import MethodError

INF = math.inf
batch = test_methods.batch  # the fixture: two prompts, left-padded, with their images
GREEDY = dict(do_sample=False, output_scores=True, output_logits=True, return_dict_in_generate=True)


def reference_logits(model, inputs, monkeypatch, alpha, layers, keys="image", prompt=None):
    """Arm a's last-position logits with PAI computed independently, in one forward without
    cache: the model's own attention forward runs, and in ``layers`` the rows of the prompt's
    last position (``prompt`` tokens long, default all) and of the tokens after it are
    recomputed by hand: ``s = q k / sqrt(d)`` over the keys up to the row, ``s + alpha |s|`` on
    the prompt's image keys (or on every key), padding keys ``-inf``, softmax, times the values."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    prompt = prompt or ids.shape[1]
    image = (ids == model.config.image_token_id) if keys == "image" else mask.clone()
    image[:, prompt:] = False
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def attention(module, query, key, value, attention_mask, **kwargs):
        out, weights = sdpa(module, query, key, value, attention_mask, **kwargs)
        if isinstance(module, LlamaAttention) and module.layer_idx in layers:
            groups = query.shape[1] // key.shape[1]
            k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
            out = out.clone()
            for row in range(prompt - 1, query.shape[2]):
                seen = slice(0, row + 1)
                s = torch.einsum("bhd,bhkd->bhk", query[:, :, row], k[:, :, seen])
                s = s * module.head_dim**-0.5
                s = torch.where(image[:, None, seen], s + alpha * s.abs(), s)
                p = s.masked_fill(~mask[:, None, seen], -INF).softmax(-1)
                out[:, row] = torch.einsum("bhk,bhkd->bhd", p, v[:, :, seen])
        return out, weights

    with monkeypatch.context() as patch:
        patch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", attention)
        return last_logits(model, **inputs)


def text_only(model, inputs):
    return detect(model).without_images(inputs)


def run(model, inputs, steps=1, use_cache=True, **settings):
    with methods.attach("pai", model, **settings) as handle:
        return handle.generate(**inputs, max_new_tokens=steps, use_cache=use_cache, **GREEDY)


def hooks_and_wrappers(model):
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return hooks, [m for m in model.modules() if "forward" in vars(m)]


# --- the fusion ------------------------------------------------------------------------------


def test_defaults_are_the_released_commands():
    s = PAISettings()
    assert (s.alpha, s.gamma, s.beta, s.start_layer, s.end_layer) == (0.2, 1.1, 0.1, 2, None)
    assert list(s.layers(32)) == list(range(2, 32)) and FUSIONS["pai"] is PAISettings
    assert methods.METHODS["pai"].arms == 2 and not methods.METHODS["pai"].needs_sae


def test_fusion_is_cfg_on_log_softmaxes_with_the_cutoff():
    a = torch.tensor([[math.log(p) for p in (0.6, 0.3, 0.05, 0.05)]])
    b = torch.tensor([[math.log(p) for p in (0.3, 0.6, 0.05, 0.05)]])
    # gamma 2: 2 (la - lb) + lb = 2 la - lb; beta 0.1 of 0.6 = 0.06 cuts the 0.05s
    want = [2 * math.log(0.6) - math.log(0.3), 2 * math.log(0.3) - math.log(0.6), -INF, -INF]
    assert PAISettings(gamma=2.0).fuse(a + 5.0, b - 1.0, 3).tolist()[0] == pytest.approx(want)
    # gamma 1: arm a's log-softmax, nothing cut (CFG.py returns early)
    plain = PAISettings(gamma=1.0).fuse(a + 5.0, b, 0)
    torch.testing.assert_close(plain, a.log_softmax(-1))


@pytest.mark.parametrize(
    "fields",
    [{"gamma": 0.5}, {"alpha": -0.1}, {"beta": 0.0}, {"start_layer": 3, "end_layer": 3}],
)
def test_settings_refuse_out_of_range_values(fields):
    with pytest.raises(MethodError, match="invalid pai settings"):
        methods.method_settings("pai", **fields)


# --- the amplification -----------------------------------------------------------------------


@pytest.mark.parametrize(("start", "end"), [(0, None), (1, None), (0, 1)])
def test_arm_a_is_the_independent_amplification_and_step_one_the_formula(
    hf_model_and_processor, batch, monkeypatch, start, end
):
    model, _ = hf_model_and_processor
    alpha, gamma, beta = 0.8, 1.5, 0.1
    layers = range(start, end or 2)
    a = reference_logits(model, batch, monkeypatch, alpha, layers)
    out = run(model, batch, alpha=alpha, gamma=gamma, start_layer=start, end_layer=end)
    torch.testing.assert_close(out.logits[0], a, rtol=1e-4, atol=1e-4)
    # the test can fail: amplifying every key, or no layer, gives other logits
    every_key = reference_logits(model, batch, monkeypatch, alpha, layers, keys="all")
    assert (every_key - a).abs().max() > 1e-2 and (
        last_logits(model, **batch) - a
    ).abs().max() > 1e-2
    la = a.log_softmax(-1)
    lb = last_logits(model, **text_only(model, batch)).log_softmax(-1)
    expected = gamma * (la - lb) + lb
    expected[la < la.max(-1, keepdim=True).values + math.log(beta)] = -INF
    assert_scores(out.scores[0], expected)


def test_each_step_amplifies_the_new_token_with_or_without_cache(
    hf_model_and_processor, batch, monkeypatch
):
    model, _ = hf_model_and_processor
    steps, length, mask = 4, batch["input_ids"].shape[1], batch["attention_mask"]
    out = run(model, batch, steps=steps, alpha=0.8, start_layer=0)
    for t in range(steps):
        so_far = {
            **batch,
            "input_ids": out.sequences[:, : length + t],
            "attention_mask": torch.cat([mask, mask.new_ones(mask.shape[0], t)], 1),
        }
        want = reference_logits(model, so_far, monkeypatch, 0.8, range(2), prompt=length)
        torch.testing.assert_close(out.logits[t], want, rtol=1e-4, atol=1e-4)
    # without the cache, every re-run amplifies the rows the cached run did, as it did them
    rerun = run(model, batch, steps=steps, use_cache=False, alpha=0.8, start_layer=0)
    assert torch.equal(rerun.sequences, out.sequences)
    for got, want in zip(rerun.logits, out.logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_alpha_zero_leaves_arm_a_the_plain_model(hf_model_and_processor, batch):
    model, _ = hf_model_and_processor
    plain = model.generate(**batch, max_new_tokens=6, **GREEDY)
    out = run(model, batch, steps=6, alpha=0.0, gamma=1.0, start_layer=0)
    assert torch.equal(out.sequences, plain.sequences)
    for got, want in zip(out.logits, plain.logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_a_padded_batch_decodes_as_each_sample_alone(hf_model_and_processor, batch, sampled):
    model, _ = hf_model_and_processor
    decoding = dict(max_new_tokens=8, do_sample=sampled)
    if sampled:
        decoding.update(top_k=0, temperature=1.5)
    with methods.attach("pai", model, alpha=1.0, start_layer=0) as handle:
        together = handle.generate(**batch, seed=5, **decoding)[:, batch["input_ids"].shape[1] :]
        for i in range(len(PROMPTS)):
            one = alone(batch, i)
            got = handle.generate(**one, seed=5 + i, **decoding)[0, one["input_ids"].shape[1] :]
            assert together[i, : len(got)].tolist() == got.tolist()
    plain = model.generate(**batch, max_new_tokens=8, do_sample=False)
    with methods.attach("pai", model, alpha=1.0, start_layer=0) as handle:
        assert not torch.equal(handle.generate(**batch, max_new_tokens=8, do_sample=False), plain)


def test_the_model_is_untouched_outside_arm_a_and_restored_by_remove(hf_model_and_processor, batch):
    model, _ = hf_model_and_processor
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before, (hooks, wrapped) = last_logits(model, **batch), hooks_and_wrappers(model)
    handle = methods.attach("pai", model, alpha=2.0, start_layer=0)
    try:
        attentions = [layer.self_attn for layer in detect(model).decoder_layers()]
        assert all("forward" in vars(attn) for attn in attentions)
        assert torch.equal(last_logits(model, **batch), before)  # attached, not generating
        handle.generate(**batch, max_new_tokens=3)
        assert torch.equal(last_logits(model, **batch), before)
    finally:
        handle.remove()
    handle.remove()  # a second remove is a no-op
    assert hooks_and_wrappers(model) == (hooks, wrapped) and wrapped == []
    assert torch.equal(last_logits(model, **batch), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_refusals(hf_model_and_processor, batch):
    model, _ = hf_model_and_processor
    untouched = hooks_and_wrappers(model)
    with pytest.raises(MethodError, match=r"layers 2 \.\. 1 .* 2 decoder layers"):
        methods.attach("pai", model)  # the released start layer 2 of a 2-layer model
    with pytest.raises(MethodError, match=r"layers 0 \.\. 4"):
        methods.attach("pai", model, start_layer=0, end_layer=5)
    assert hooks_and_wrappers(model) == untouched
    text = text_only(model, batch)
    with (
        methods.attach("pai", model, start_layer=0) as handle,
        pytest.raises(MethodError, match="no image placeholder"),
    ):
        handle.generate(**text, max_new_tokens=2)
    assert hooks_and_wrappers(model) == untouched


# --- the original llava package --------------------------------------------------------------


@pytest.mark.llava
def test_original_llava_decodes_as_transformers_and_as_each_sample_alone(
    llava_model_and_tokenizer, hf_model_and_processor, monkeypatch
):
    model, tokenizer = llava_model_and_tokenizer
    hf_model, processor = hf_model_and_processor
    side = tiny.TinySizes().image_size
    images = tiny.make_images(2, seed=3, size=(side, side))  # no crop or pad: same pixels
    questions = ["Is there a dog in the image?", "What is it?"]
    monkeypatch.setattr(model.config, "tokenizer_padding_side", "left")
    inputs = llava_inputs(model, tokenizer, images, questions)
    tok = processor.tokenizer
    monkeypatch.setattr(tok, "padding_side", "left")
    prompts = [f"USER: <image>\n{q} ASSISTANT:" for q in questions]
    hf_inputs = dict(processor(images=images, text=prompts, return_tensors="pt", padding=True))
    settings = dict(alpha=1.0, start_layer=0, steps=5)
    out = run(model, inputs, **settings)
    reference = run(hf_model, hf_inputs, **settings)
    width = hf_inputs["input_ids"].shape[1]
    assert torch.equal(out.sequences, reference.sequences[:, width:])
    for got, want in zip(out.scores, reference.scores, strict=True):
        assert_scores(got, want)
    for i in range(2):
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        keep = one["attention_mask"][0].bool()
        one.update(inputs=one["inputs"][:, keep], attention_mask=one["attention_mask"][:, keep])
        assert torch.equal(run(model, one, **settings).sequences[0], out.sequences[i])
