"""Inference methods by name (vlsae_guard.methods): none is the model itself, the peers' first
fused step equals their formula on the two arms computed by hand, batches decode as each sample
alone, and bad requests are refused before anything is attached."""

from __future__ import annotations

import math

import pytest
import torch
from _decoding_support import alone, left_padded

from vlsae_guard import methods
from vlsae_guard.backends import detect
from vlsae_guard.decoding.counterfactuals import diffusion_noise
from vlsae_guard.methods import MethodError

PROMPTS = [
    "USER: <image>\nIs there a dog in the image? ASSISTANT:",
    "USER: <image>\nWhat is it? ASSISTANT:",
]


@pytest.fixture(scope="module")
def batch(hf_model_and_processor, tiny_images):
    return left_padded(hf_model_and_processor[1], tiny_images[:2], PROMPTS)


def last_logits(model, **inputs):
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # generate()'s position ids (left padding)
    with torch.no_grad():
        return model(**inputs, position_ids=positions).logits[:, -1].float()


def first_scores(model, method, inputs, **settings):
    with methods.attach(method, model, **settings) as handle:
        out = handle.generate(
            **inputs, max_new_tokens=1, output_scores=True, return_dict_in_generate=True
        )
    return out.scores[0]


def assert_scores(scores, expected):
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(scores), finite) and finite.sum(-1).min() >= 1
    torch.testing.assert_close(scores[finite], expected[finite], rtol=1e-4, atol=1e-4)


def test_none_is_the_model_itself(hf_model_and_processor, batch):
    model, _ = hf_model_and_processor
    want = model.generate(**batch, max_new_tokens=6, do_sample=False)
    with methods.attach("none", model) as handle:
        got = handle.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_vcd_first_step_is_its_formula_on_the_arms(hf_model_and_processor, batch):
    model, _ = hf_model_and_processor
    alpha, beta, step, seed = 1.0, 0.1, 500, 3
    noised = torch.cat([diffusion_noise(p[None], step, seed) for p in batch["pixel_values"]])
    a = last_logits(model, **batch)
    b = last_logits(model, **{**batch, "pixel_values": noised})
    assert not torch.allclose(a, b)
    expected = (1 + alpha) * a - alpha * b
    expected[a < a.max(-1, keepdim=True).values + math.log(beta)] = -math.inf
    scores = first_scores(model, "vcd", batch, alpha=alpha, beta=beta, noise_seed=seed)
    assert_scores(scores, expected)


def test_m3id_first_step_is_its_formula_on_the_arms(hf_model_and_processor, batch):
    model, _ = hf_model_and_processor
    lam, beta = 0.5, 0.1
    image = model.config.image_token_id
    rows = [
        r[(r != image) & m.bool()]
        for r, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    a = last_logits(model, **batch)
    b = last_logits(model, input_ids=ids, attention_mask=mask)
    la, lb = a.log_softmax(-1), b.log_softmax(-1)
    expected = la + (math.exp(lam) - 1) / 1.0 * (la - lb)  # (1 - g) / g, g = exp(-lam * 1)
    expected[a < a.max(-1, keepdim=True).values + math.log(beta)] = -math.inf
    assert_scores(first_scores(model, "m3id", batch, lam=lam, beta=beta), expected)


@pytest.mark.parametrize("method", ["vcd", "m3id", "dola"])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_a_padded_batch_decodes_as_each_sample_alone(
    hf_model_and_processor, batch, method, sampled
):
    model, _ = hf_model_and_processor
    decoding = dict(max_new_tokens=8, do_sample=sampled)
    if sampled:
        decoding.update(top_k=0, temperature=1.5)
    # DoLa: both tiny layers as candidates, so the per-sample selection is exercised.
    settings = {"layers": [0, 1]} if method == "dola" else {"beta": 0.02}
    with methods.attach(method, model, **settings) as handle:
        together = handle.generate(**batch, seed=5, **decoding)[:, batch["input_ids"].shape[1] :]
        for i in range(len(PROMPTS)):
            one = alone(batch, i)
            got = handle.generate(**one, seed=5 + i, **decoding)[0, one["input_ids"].shape[1] :]
            assert together[i, : len(got)].tolist() == got.tolist()


def test_methods_change_answers_and_none_does_not(hf_model_and_processor, batch):
    model, _ = hf_model_and_processor
    plain = model.generate(**batch, max_new_tokens=8, do_sample=False)
    for method in ("vcd", "m3id"):
        with (
            methods.attach(method, model, alpha=3.0)
            if method == "vcd"
            else methods.attach(method, model, lam=1.0) as handle
        ):
            out = handle.generate(**batch, max_new_tokens=8, do_sample=False)
        assert out.shape[0] == plain.shape[0] and not torch.equal(out, plain), method


def test_without_images_keeps_the_text_of_every_row(hf_model_and_processor, batch):
    model, _ = hf_model_and_processor
    text = detect(model).without_images(batch)
    assert set(text) == {"input_ids", "attention_mask"}
    image = model.config.image_token_id
    for i in range(len(PROMPTS)):
        want = batch["input_ids"][i][
            (batch["input_ids"][i] != image) & batch["attention_mask"][i].bool()
        ]
        row = text["input_ids"][i][text["attention_mask"][i].bool()]
        assert row.tolist() == want.tolist()
        assert text["attention_mask"][i, -1] == 1  # left-padded again
    with pytest.raises(ValueError, match="no image placeholder"):
        detect(model).without_images(text)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: methods.attach("beam", m), "unknown method 'beam'"),
        (lambda m: methods.attach("vcd", m, alpha=float("nan")), "invalid vcd settings"),
        (lambda m: methods.attach("vcd", m, gamma=1), "invalid vcd settings"),
        (lambda m: methods.attach("vcd", m, sae="x"), "uses no SAE"),
        (lambda m: methods.attach("paper", m, layer=1), "needs an SAE"),
        (lambda m: methods.attach("vlsae", m, sae="x", mode="paper"), "runs guard mode"),
        (lambda m: methods.attach("vcd", torch.nn.Linear(2, 2)), "method 'vcd'"),
    ],
)
def test_bad_requests_are_refused_before_attaching(hf_model_and_processor, call, message):
    model, _ = hf_model_and_processor
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(MethodError, match=message):
        call(model)
    assert hooks == sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_vcd_needs_an_image(hf_model_and_processor, batch):
    model, _ = hf_model_and_processor
    text_only = {k: v for k, v in batch.items() if k != "pixel_values"}
    with methods.attach("vcd", model) as handle, pytest.raises(MethodError, match="noised image"):
        handle.generate(**text_only, max_new_tokens=2)


def test_sae_methods_are_the_guard(hf_model_and_processor, tiny_sae_dir, batch):
    model, _ = hf_model_and_processor
    with methods.attach("vlsae", model, sae=tiny_sae_dir, alpha=0.5) as handle:
        assert handle.method == "vlsae" and handle.config.mode == "projector"
        guarded = handle.generate(**batch, max_new_tokens=4, do_sample=False)
    assert guarded.shape[0] == 2


def test_min_new_tokens_holds_eos_back_as_generate_does(hf_model_and_processor, batch):
    model, _ = hf_model_and_processor
    width = batch["input_ids"].shape[1]
    with methods.attach("vcd", model) as handle:
        first = handle.generate(**batch, max_new_tokens=1, do_sample=False)[:, width:]
        eos = int(first[0, 0])  # the token sample 0 would choose first: make it the eos
        stopped = handle.generate(**batch, max_new_tokens=6, eos_token_id=eos, do_sample=False)
        held = handle.generate(
            **batch, max_new_tokens=6, min_new_tokens=4, eos_token_id=eos, do_sample=False
        )
    assert int(stopped[0, width]) == eos  # without it, sample 0 ends at once
    assert eos not in held[0, width : width + 4].tolist()
