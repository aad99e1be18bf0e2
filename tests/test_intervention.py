"""The guard's math on plain tensors, against the formulas written out densely in float64."""

import math

import pytest
import torch

from vlsae_guard import VLSAE, GuardConfig, SAEConfig
from vlsae_guard.core.intervention import ProjectorIntervention
from vlsae_guard.core.paper import FusionProcessor, PaperIntervention

D, N, K = 16, 64, 6
SHARED = list(range(0, N, 2))


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    return VLSAE(SAEConfig(d_in=D, n_concepts=N, k=K, shared_concepts=SHARED)).double().eval()


@pytest.fixture(scope="module")
def feats():
    torch.manual_seed(1)
    return torch.randn(3, 5, D, dtype=torch.float64)


def dense_terms(sae, x):
    """z, D(z * 1_S) and D(z) computed densely."""
    z = sae.encode(x)
    s = torch.zeros(N, dtype=torch.float64)
    s[SHARED] = 1
    dec = sae.vision_decoder
    return z, z * s @ dec.weight + dec.bias, z @ dec.weight + dec.bias


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_replace_formula(sae, feats, alpha):
    out = ProjectorIntervention.build(sae, GuardConfig(alpha=alpha))(feats)
    _, rec_s, _ = dense_terms(sae, feats)
    torch.testing.assert_close(out, (1 - alpha) * feats + alpha * rec_s)


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_edit_formula_keeps_error(sae, feats, alpha):
    out = ProjectorIntervention.build(sae, GuardConfig(rewrite="edit", alpha=alpha))(feats)
    _, rec_s, rec = dense_terms(sae, feats)
    torch.testing.assert_close(out, feats + alpha * (rec_s - rec))


def test_all_shared_edit_is_identity(sae, feats):
    cfg = GuardConfig(rewrite="edit", alpha=1.0, shared_concepts=list(range(N)))
    torch.testing.assert_close(ProjectorIntervention.build(sae, cfg)(feats), feats)


def test_steer_clamps_concept_and_keeps_error(sae, feats):
    z = sae.encode(feats)
    active = int(z[0, 0].nonzero()[0])  # one concept active on the first token
    inactive = int((z[0, 0] == 0).nonzero()[0])
    steer = {active: 1.7, inactive: 0.9}
    out = ProjectorIntervention.build(sae, GuardConfig(alpha=0.0, steer=steer))(feats)
    z_new = z.clone()
    z_new[..., active] = 1.7
    z_new[..., inactive] = 0.9
    w = sae.vision_decoder.weight
    torch.testing.assert_close(out, feats + (z_new - z) @ w)


def test_text_masks_restrict_per_sample(sae, feats):
    inter = ProjectorIntervention.build(sae, GuardConfig(alpha=1.0))
    masks = torch.zeros(2, N, dtype=torch.bool)
    masks[1] = True  # sample 1 keeps the shared set, sample 0 keeps nothing
    owners = torch.tensor([0] * 5 + [1] * 10)
    out = inter(feats, owners=owners, text_masks=masks)
    _, rec_s, _ = dense_terms(sae, feats)
    bias = sae.vision_decoder.bias
    torch.testing.assert_close(out[0], bias.expand(5, D))  # no concept kept: bias only
    torch.testing.assert_close(out[1:], rec_s[1:])


def test_text_concepts_are_the_union_of_text_token_concepts(sae):
    inter = ProjectorIntervention.build(sae, GuardConfig())
    text = torch.randn(4, D, dtype=torch.float64)
    mask = inter.text_concepts([text, text[:0]])
    expected = torch.zeros(N, dtype=torch.bool)
    expected[sae.encode_topk(text, "text").indices.flatten()] = True
    assert torch.equal(mask[0], expected) and not mask[1].any()


def test_no_shared_set_warns_and_uses_all(feats):
    sae = VLSAE(SAEConfig(d_in=D, n_concepts=N, k=K)).double()
    with pytest.warns(UserWarning, match="no shared-concept set"):
        inter = ProjectorIntervention.build(sae, GuardConfig())
    assert inter.shared.all()


def test_out_of_range_concepts_rejected(sae):
    with pytest.raises(ValueError, match="out of range"):
        ProjectorIntervention.build(sae, GuardConfig(steer={N: 1.0}))


def test_dtype_and_shape_preserved(sae):
    x = torch.randn(2, 3, D).to(torch.bfloat16)
    out = ProjectorIntervention.build(sae, GuardConfig())(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"mode": "paper"}, "needs layer"),
        ({"layer": 3}, "do not apply to mode 'projector'"),
        ({"mode": "paper", "layer": 1, "steer": {1: 1.0}}, "do not apply to mode 'paper'"),
        ({"alpha": 1.5}, "less than or equal"),
        ({"steer": {-1: 1.0}}, ">= 0"),
        ({"methd": "edit"}, "Extra inputs"),
    ],
)
def test_config_rejects(settings, match):
    with pytest.raises(ValueError, match=match):
        GuardConfig(**settings)


def test_alpha_default_depends_on_mode():
    assert GuardConfig().alpha == 0.5
    assert GuardConfig(mode="paper", layer=0).alpha == 0.8


def test_paper_text_shift_formula(sae):
    cfg = GuardConfig(mode="paper", layer=0, alpha=0.7, beta=0.9)
    v, t = torch.randn(2, D, dtype=torch.float64), torch.randn(2, D, dtype=torch.float64)
    shift = PaperIntervention(sae, cfg).text_shift(v, t)
    z = (1 - 0.9) * sae.encode(t) + 0.9 * sae.encode(v)
    t_rec = z @ sae.text_decoder.weight + sae.text_decoder.bias
    torch.testing.assert_close(shift, (1 - 0.7) * t + 0.7 * t_rec - t)


def test_fusion_processor():
    plain = torch.tensor([[2.0, 1.0, -3.0]])
    guarded = torch.tensor([[0.0, 4.0, 9.0]])
    out = FusionProcessor(c_alpha=0.6, c_beta=0.8)(None, torch.cat([plain, guarded]))
    cutoff = 2.0 + math.log(0.8)
    expected = torch.where(plain < cutoff, -math.inf, 0.4 * plain + 0.6 * guarded)
    torch.testing.assert_close(out, torch.cat([expected, expected]))
