"""The peers' fusions and counterfactual inputs against hand computations: VCD (Leng et al.
2024) and M3ID (Favero et al. 2024), see vlsae_guard/decoding/fusions.py for the sources."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from vlsae_guard.decoding.counterfactuals import diffusion_noise, noise_schedule, without_image
from vlsae_guard.decoding.fusions import (
    FUSIONS,
    M3IDSettings,
    VCDSettings,
    m3id_weight,
    plausible,
)

INF = math.inf


def rows(*values) -> torch.Tensor:
    return torch.tensor([list(v) for v in values], dtype=torch.float32)


# --- VCD -------------------------------------------------------------------------------------


def test_vcd_defaults_are_the_released_evaluation_s():
    s = VCDSettings()
    assert (s.alpha, s.beta, s.noise_step) == (1.0, 0.1, 500)
    assert FUSIONS["vcd"] is VCDSettings and FUSIONS["m3id"] is M3IDSettings


def test_vcd_scores_equal_the_hand_computation():
    a = rows([2.0, 1.0, 0.0, -3.0])
    b = rows([1.0, 2.0, 0.0, -1.0])
    # cutoff log(0.1) + 2 = -0.3026: the last token (-3.0) is cut
    # alpha 1: 2a - b = [3, 0, 0, -]; alpha 0.5: 1.5a - 0.5b = [2.5, 0.5, 0, -]
    assert VCDSettings().fuse(a, b, 0).tolist() == [[3.0, 0.0, 0.0, -INF]]
    assert VCDSettings(alpha=0.5).fuse(a, b, 7).tolist() == [[2.5, 0.5, 0.0, -INF]]


def test_vcd_with_alpha_zero_is_arm_a_on_the_plausible_tokens():
    a = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    b = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    scores = VCDSettings(alpha=0.0, beta=0.5).fuse(a, b, 0)
    keep = scores > -INF
    assert torch.equal(scores[keep], a[keep]) and 0 < keep.sum() < a.numel()


def test_the_plausibility_cutoff_keeps_exactly_the_tokens_within_beta_of_the_top():
    # probabilities 0.5, 0.25, 0.2, 0.05 (shifted by +3: the cutoff is on p, not on logits):
    # ratios to the top 1, 0.5, 0.4, 0.1
    a = rows([math.log(p) + 3.0 for p in (0.5, 0.25, 0.2, 0.05)])
    assert plausible(a, 0.45).tolist() == [[True, True, False, False]]
    assert plausible(a, 0.3).tolist() == [[True, True, True, False]]
    assert plausible(a, 0.05 / 0.5 * 0.99).tolist() == [[True, True, True, True]]
    assert plausible(a, 1.0).tolist() == [[True, False, False, False]]


def test_the_cutoff_is_per_row_and_matches_the_softmax_definition():
    a = torch.randn(4, 200, generator=torch.Generator().manual_seed(3)) * 3
    a[1] += 40.0  # another scale on one row: its cutoff is its own
    p = torch.softmax(a, dim=-1)
    expected = p >= 0.1 * p.max(dim=-1, keepdim=True).values
    assert torch.equal(plausible(a, 0.1), expected)
    assert (VCDSettings().fuse(a, a, 0) > -INF).tolist() == expected.tolist()


def test_fp16_arms_give_float32_scores():
    a, b = rows([2.0, 1.0]).half(), rows([1.0, 2.0]).half()
    scores = VCDSettings().fuse(a, b, 0)
    assert scores.dtype == torch.float32 and scores.tolist() == [[3.0, 0.0]]


# --- M3ID ------------------------------------------------------------------------------------


def test_m3id_weight_follows_gamma_t_equal_exp_minus_lambda_t():
    # t = step + 1; (1 - gamma_t) / gamma_t with gamma_t = exp(-0.02 t)
    for step, hand in [(0, 0.0202013400), (1, 0.0408107742), (10, 0.2460767306)]:
        gamma = math.exp(-0.02 * (step + 1))
        assert m3id_weight(step, 0.02) == pytest.approx((1 - gamma) / gamma, rel=1e-12)
        assert m3id_weight(step, 0.02) == pytest.approx(hand, rel=1e-8)
    assert m3id_weight(5, 0.0) == 0.0
    with pytest.raises(ValueError, match="found -1"):
        m3id_weight(-1, 0.02)


def test_m3id_scores_equal_the_hand_computation():
    # arm a: p = 0.5, 0.3, 0.2 (logits shifted by +3); arm b: p = 0.2, 0.3, 0.5 (shifted by -1)
    a = rows([math.log(p) + 3.0 for p in (0.5, 0.3, 0.2)])
    b = rows([math.log(p) - 1.0 for p in (0.2, 0.3, 0.5)])
    # step 9 -> t = 10, w = e^0.2 - 1 = 0.2214028; l_c + w (l_c - l_u):
    # ln .5 + w ln 2.5 = -0.4902779;  ln .3 = -1.2039728;  ln .2 - w ln 2.5 = -1.8123072
    scores = M3IDSettings().fuse(a, b, 9)
    assert scores.tolist()[0] == pytest.approx([-0.4902779, -1.2039728, -1.8123072], abs=1e-6)
    # beta 0.5: ratios 1, 0.6, 0.4 to the top of arm a -> the last token is cut
    cut = M3IDSettings(beta=0.5).fuse(a, b, 9).tolist()[0]
    assert cut[:2] == pytest.approx([-0.4902779, -1.2039728], abs=1e-6) and cut[2] == -INF


def test_m3id_pulls_harder_towards_the_image_as_tokens_are_generated():
    a = rows([math.log(p) for p in (0.5, 0.3, 0.2)])
    b = rows([math.log(p) for p in (0.2, 0.3, 0.5)])
    gaps = [float(s[0, 0] - s[0, 2]) for s in (M3IDSettings().fuse(a, b, k) for k in (0, 10, 100))]
    assert gaps[0] < gaps[1] < gaps[2]
    assert M3IDSettings(lam=0.0).fuse(a, b, 50).tolist()[0] == pytest.approx(
        [math.log(0.5), math.log(0.3), math.log(0.2)], abs=1e-6
    )


@pytest.mark.parametrize("settings", [VCDSettings(), M3IDSettings()], ids=["vcd", "m3id"])
def test_fusions_refuse_arms_of_other_shapes_and_negative_steps(settings):
    a = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=r"\(2, 5\) and \(2, 4\)"):
        settings.fuse(a, torch.zeros(2, 4), 0)
    with pytest.raises(ValueError, match="both be"):
        settings.fuse(torch.zeros(5), torch.zeros(5), 0)
    with pytest.raises(ValueError, match="found -2"):
        settings.fuse(a, a, -2)


@pytest.mark.parametrize(
    ("model", "field", "value"),
    [
        (VCDSettings, "alpha", float("nan")),
        (VCDSettings, "alpha", -0.1),
        (VCDSettings, "beta", 0.0),
        (VCDSettings, "beta", 1.5),
        (VCDSettings, "beta", float("inf")),
        (VCDSettings, "noise_step", 1000),
        (VCDSettings, "noise_step", -1),
        (M3IDSettings, "lam", float("nan")),
        (M3IDSettings, "lam", -0.02),
        (M3IDSettings, "beta", 0.0),
        (M3IDSettings, "cd_alpha", 1.0),
    ],
)
def test_settings_refuse_non_finite_out_of_range_and_unknown_values(model, field, value):
    with pytest.raises(ValidationError, match=field):
        model(**{field: value})


def test_settings_are_frozen():
    with pytest.raises(ValidationError):
        VCDSettings().alpha = 2.0


# --- counterfactual inputs -------------------------------------------------------------------


def test_vcd_schedule_is_the_sigmoid_schedule_of_the_released_code():
    ab = noise_schedule()
    beta0 = 1 / (1 + math.exp(6)) * (0.005 - 1e-5) + 1e-5  # sigmoid(-6) scaled: 2.2338e-5
    assert ab.shape == (1000,) and ab[0].item() == pytest.approx(1 - beta0, abs=1e-7)
    assert torch.all(ab[1:] < ab[:-1])
    assert ab[500].item() == pytest.approx(0.7448, abs=1e-3)
    assert ab[999].item() == pytest.approx(0.0812, abs=1e-3)


def test_diffusion_noise_is_deterministic_given_the_seed():
    x = torch.rand(3, 8, 8)
    assert torch.equal(diffusion_noise(x, 500, seed=7), diffusion_noise(x, 500, seed=7))
    assert not torch.equal(diffusion_noise(x, 500, seed=7), diffusion_noise(x, 500, seed=8))


@pytest.mark.parametrize("step", [100, 500, 999])
def test_diffusion_noise_scales_mean_and_variance_as_the_schedule_says(step):
    x0 = torch.full((3, 224, 224), 2.0)
    alpha_bar = noise_schedule()[step].item()
    noised = diffusion_noise(x0, step, seed=0)
    # sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps: mean 2 sqrt(ab), std sqrt(1 - ab)
    assert noised.mean().item() == pytest.approx(2.0 * math.sqrt(alpha_bar), abs=5e-3)
    assert noised.std().item() == pytest.approx(math.sqrt(1.0 - alpha_bar), rel=1e-2)


def test_diffusion_noise_at_step_zero_leaves_the_image_almost_unchanged():
    x = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(4)).half()
    noised = diffusion_noise(x, 0, seed=1)
    assert noised.dtype == torch.float16 and noised.shape == x.shape
    assert (noised.float() - x.float()).abs().max().item() < 0.03  # sqrt(2.2e-5) * |eps|
    assert not torch.equal(noised, x)


def test_diffusion_noise_refuses_a_step_outside_the_schedule():
    with pytest.raises(ValueError, match="expected 0 .. 999, found 1000"):
        diffusion_noise(torch.zeros(3), 1000, seed=0)


def test_the_no_image_prompt_drops_only_the_placeholder():
    assert (
        without_image("USER: <image>\nWhat is here? ASSISTANT:")
        == "USER: \nWhat is here? ASSISTANT:"
    )
    assert without_image("<image><image>\nTwo? ASSISTANT:") == "\nTwo? ASSISTANT:"
    assert without_image("A [img] B", placeholder="[img]") == "A  B"
    with pytest.raises(ValueError, match="no image placeholder '<image>'"):
        without_image("USER: What is here? ASSISTANT:")
