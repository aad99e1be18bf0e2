"""DoLa (vlsae_guard.methods "dola"): every step's scores equal the method computed by hand from
the model's hidden states (batch == batch-1: tests/test_methods.py), the candidate layers
follow transformers' rule (< 4.53), and bad settings are refused before anything runs."""

from __future__ import annotations

import math

import pytest
import torch
from _decoding_support import left_padded

from vlsae_guard import methods
from vlsae_guard.decoding.dola import candidate_layers, layer_divergence, select_premature
from vlsae_guard.methods import MethodError

PROMPTS = [
    "USER: <image>\nIs there a dog in the image? ASSISTANT:",
    "USER: <image>\nWhat is it? ASSISTANT:",
]
STEPS = 12


@pytest.fixture(scope="module")
def batch(hf_model_and_processor, tiny_images):
    return left_padded(hf_model_and_processor[1], tiny_images[:2], PROMPTS)


@pytest.fixture(scope="module")
def own_model(tiny_hf_dir):
    """The tiny HF LLaVA again, for the by-hand forwards: after one with
    ``output_hidden_states=True`` transformers leaves its output-capturing hooks on the decoder
    layers, which the session model must not carry (test_guard checks it has no hooks)."""
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()


def hooks_and_flags(model):
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
    return hooks, sorted(k for m in model.modules() for k in vars(m) if "captur" in k)


def by_hand(out, head, layers, seen, penalty=1.2, relative_top=0.1):
    """DoLa's scores and premature layers from a full forward's ``out`` (hidden states)."""
    final = out.logits[:, -1].double()
    early = [head(out.hidden_states[layer][:, -1]).double() for layer in layers]
    p = final.softmax(-1)
    divergences = []
    for logits in early:  # as the released code: (KL(m || p) + KL(m || q)) / 2, vocab mean
        q = logits.softmax(-1)
        m = (p + q) / 2
        kl_p = (m * (m.log() - p.log())).mean(-1)
        kl_q = (m * (m.log() - q.log())).mean(-1)
        divergences.append((kl_p + kl_q) / 2)
    pick = torch.stack(divergences).argmax(0)
    premature = torch.stack([early[k][row] for row, k in enumerate(pick.tolist())])
    log_p, log_q = final.log_softmax(-1), premature.log_softmax(-1)
    keep = log_p >= log_p.max(-1, keepdim=True).values + math.log(relative_top)
    scores = torch.where(keep, log_p - log_q, -math.inf)
    for row, tokens in enumerate(seen):
        ids = sorted(tokens)
        s = scores[row, ids]
        scores[row, ids] = torch.where(s < 0, s * penalty, s / penalty)
    return scores.float(), [layers[k] for k in pick.tolist()]


def hf_forward(model, inputs, new):
    """The whole sequence (prompt + ``new``) in one forward, with its hidden states."""
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(new)], 1)
    with torch.no_grad():
        return model(
            input_ids=torch.cat([inputs["input_ids"], new], 1),
            attention_mask=mask,
            pixel_values=inputs["pixel_values"],
            position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
            output_hidden_states=True,
        )


def check_every_step(forward, head, layers, prompt, mask, out, chosen):
    """Each step's scores (sampled at temperature 1, no top-k/top-p: the scores are DoLa's
    after the penalty) and premature layers equal :func:`by_hand` on the prefix so far."""
    new_all = out.sequences[:, out.sequences.shape[1] - len(out.scores) :]
    picked = []
    for step, scores in enumerate(out.scores):
        new = new_all[:, :step]
        seen = [
            set(p[m.bool() & (p >= 0)].tolist()) | set(n.tolist())
            for p, m, n in zip(prompt, mask, new, strict=True)
        ]
        want, layers_by_hand = by_hand(forward(new), head, layers, seen)
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(scores), finite), step
        assert finite.sum(-1).min() >= 1
        torch.testing.assert_close(scores[finite], want[finite], rtol=1e-4, atol=1e-4)
        assert chosen[step].tolist() == layers_by_hand, step
        picked.append(layers_by_hand)
    return picked


@pytest.mark.parametrize("final_norm", [False, True], ids=["head", "norm+head"])
def test_every_step_is_dola_by_hand(own_model, batch, final_norm):
    model = own_model
    layers = [0, 1]
    lm = model.model.language_model
    head = (lambda h: model.lm_head(lm.norm(h))) if final_norm else model.lm_head
    with methods.attach("dola", model, layers=layers, final_norm=final_norm) as handle:
        assert handle.layers == layers
        out = handle.generate(
            **batch, max_new_tokens=STEPS, do_sample=True, top_k=0, seed=3,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    picked = check_every_step(
        lambda new: hf_forward(model, batch, new),
        head, layers, batch["input_ids"], batch["attention_mask"], out, handle.chosen,
    )  # fmt: skip
    assert len(picked) == STEPS
    if not final_norm:  # the selection is exercised: per sample, and both layers win
        assert any(a != b for a, b in picked) and {x for p in picked for x in p} == {0, 1}
    no_tokens = batch["input_ids"][:, :0]
    plain = hf_forward(model, batch, no_tokens).logits[:, -1].log_softmax(-1)
    first = out.scores[0]
    finite = torch.isfinite(first)
    assert not torch.allclose(first[finite], plain[finite], atol=1e-2)  # DoLa is no plain decoding


def test_on_the_original_llava(load_llava, tiny_llava_dir, tiny_images):
    model, tokenizer = load_llava(tiny_llava_dir)  # its own: by-hand forwards leave hooks
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_images, tokenizer_image_token

    ids = tokenizer_image_token(PROMPTS[0], tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    images = process_images(tiny_images[:1], model.get_vision_tower().image_processor, model.config)
    sizes = [tiny_images[0].size]
    with methods.attach("dola", model, layers=[0, 1]) as handle:
        out = handle.generate(
            ids, images=images, image_sizes=sizes, max_new_tokens=6, do_sample=False,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip

    def forward(new):
        with torch.no_grad():
            return model(
                input_ids=torch.cat([ids, new], 1), images=images, image_sizes=sizes,
                output_hidden_states=True,
            )  # fmt: skip

    mask = torch.ones_like(ids)
    check_every_step(forward, model.lm_head, [0, 1], ids, mask, out, handle.chosen)


def test_without_cache_decodes_alike(hf_model_and_processor, batch):
    model, _ = hf_model_and_processor
    with methods.attach("dola", model, layers=[0, 1]) as handle:
        cached = handle.generate(**batch, max_new_tokens=6, do_sample=False)
        rerun = handle.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.tolist() == rerun.tolist()


def test_dola_changes_answers_costs_one_forward_and_leaves_the_model(hf_model_and_processor, batch):
    model, _ = hf_model_and_processor
    assert methods.METHODS["dola"].arms == 1
    before = hooks_and_flags(model)
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with methods.attach("dola", model) as handle:
            out = handle.generate(**batch, max_new_tokens=8, do_sample=False)
    finally:
        hook.remove()
    assert len(calls) == 8  # one forward per generated token: the prompt, then 7 feeds
    assert hooks_and_flags(model) == before  # no hook of ours nor of transformers' is left
    plain = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert out.shape[0] == 2 and not torch.equal(out, plain)


# N, tied, layers -> candidates: transformers' _dola_decoding rule spelled out.
RULE = [
    (32, False, "low", [0, 2, 4, 6, 8, 10, 12, 14]),
    (32, True, "low", [2, 4, 6, 8, 10, 12, 14]),
    (32, True, "high", [16, 18, 20, 22, 24, 26, 28, 30]),
    (40, False, "high", [20, 22, 24, 26, 28, 30, 32, 34, 36, 38]),
    (48, False, "low", [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]),
    (48, True, "low", [2, 4, 6, 8, 10, 12, 14, 16, 18]),
    (48, True, "high", [28, 30, 32, 34, 36, 38, 40, 42, 44, 46]),
    (4, True, "low", [2]),  # start layer 2 == N // 2
    (2, True, "low", [1]),  # 2-layer tied models start at layer 1
    (1, True, "low", [0]),
    (2, False, "low", [0]),  # the tiny models
    (2, False, "high", [1]),
    (32, False, (0, 16, 32), [0, 16]),  # the final layer is dropped
]


@pytest.mark.parametrize(("n", "tied", "layers", "want"), RULE)
def test_candidate_layers_follow_the_rule(n, tied, layers, want):
    assert candidate_layers(layers, n, tied) == want


def test_the_tiny_model_gets_the_rules_layers(hf_model_and_processor):
    model, _ = hf_model_and_processor
    text = model.config.get_text_config()
    assert (text.num_hidden_layers, text.tie_word_embeddings) == (2, False)
    for layers, want in (("low", [0]), ("high", [1])):
        with methods.attach("dola", model, layers=layers) as handle:
            assert handle.layers == want == candidate_layers(layers, 2, False)


def test_each_sample_picks_its_own_premature_layer():
    final = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    candidates = torch.stack([final.flip(0), final])  # layer 0 disagrees with both rows
    candidates[1, 1] = torch.tensor([4.0, 0.0, 0.0])  # layer 1 disagrees with row 1 more
    candidates[0, 1] = torch.tensor([0.0, 2.0, 0.0])
    assert select_premature(final, candidates).tolist() == [0, 1]
    same = layer_divergence(final, final[None])
    torch.testing.assert_close(same, torch.zeros_like(same))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"layers": "mid"}, "invalid dola settings"),
        ({"layers": []}, "invalid dola settings"),
        ({"layers": [-1]}, "invalid dola settings"),
        ({"relative_top": 1.5}, "invalid dola settings"),
        ({"repetition_penalty": 0.0}, "invalid dola settings"),
        ({"alpha": 1.0}, "invalid dola settings"),
        ({"layers": [0, 5]}, r"layers \[5\] are no layers"),
        ({"layers": [2]}, "final layer"),
    ],
)
def test_bad_settings_are_refused(hf_model_and_processor, settings, message):
    model, _ = hf_model_and_processor
    with pytest.raises(MethodError, match=message):
        methods.attach("dola", model, **settings)


def test_candidates_must_exist():
    with pytest.raises(ValueError, match="leaves no candidate"):
        candidate_layers("low", 3, True)  # start layer 2 > N // 2


def test_generate_refuses_its_own_repetition_penalty(hf_model_and_processor, batch):
    model, _ = hf_model_and_processor
    with (
        methods.attach("dola", model) as handle,
        pytest.raises(MethodError, match="setting of the method"),
    ):
        handle.generate(**batch, max_new_tokens=2, repetition_penalty=1.3)


def test_transformers_own_dola_needs_remote_code(hf_model_and_processor, batch):
    """Why DoLa is ours: transformers 5.19's dola_layers loads a Hub repository's code. If
    this fails, transformers may run DoLa again: compare it with ours."""
    model, _ = hf_model_and_processor
    with pytest.raises(ValueError, match="trust_remote_code"):
        model.generate(**batch, dola_layers="low", max_new_tokens=1)
