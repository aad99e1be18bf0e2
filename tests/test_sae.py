"""The SAE math against the official-code formulas in :mod:`vlsae_guard.core.reference`.

Models run in float32, the reference in float64 on the same weights, so a mismatch beyond
rounding is a bug, not noise. Sizes are small but keep ``k << n_concepts`` like the paper.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlsae_guard import AuxConfig, AuxiliaryAE, Codes, SAEConfig, build
from vlsae_guard.core import reference

D, N, K = 32, 96, 8
ARCHS = ("vl-sae", "sae-v", "sae-d")
MODALITIES = ("vision", "text")
SHAPES = [(7, D), (2, 5, D)]
# Which parameters each architecture uses per modality (SAE-V shares both).
ENCODERS = {
    "vl-sae": {"vision": "encoder", "text": "encoder"},
    "sae-v": {"vision": "encoder", "text": "encoder"},
    "sae-d": {"vision": "vision_encoder", "text": "text_encoder"},
}
DECODERS = {
    "vl-sae": {"vision": "vision_decoder", "text": "text_decoder"},
    "sae-v": {"vision": "decoder", "text": "decoder"},
    "sae-d": {"vision": "vision_decoder", "text": "text_decoder"},
}


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def make(architecture: str, seed: int = 0):
    """A model with every parameter random, biases included, so a dropped bias shows up."""
    sae = build(SAEConfig(architecture=architecture, d_in=D, n_concepts=N, k=K))
    with torch.no_grad():
        for i, p in enumerate(sae.parameters()):
            p.copy_(randn(*p.shape, seed=seed * 100 + i))
    return sae.eval()


@pytest.fixture(scope="module", params=ARCHS)
def sae(request):
    return make(request.param)


@pytest.fixture(scope="module")
def vlsae():
    return make("vl-sae")


def expected_encode(sae, x: torch.Tensor, modality: str) -> torch.Tensor:
    """The official encoder in float64: cdist for the VL-SAE, top-k of ReLU(Linear) otherwise."""
    enc = getattr(sae, ENCODERS[sae.config.architecture][modality])
    rows = x.double().reshape(-1, D)
    if sae.config.architecture == "vl-sae":
        z = reference.encode(rows, enc.detach().double(), K)
    else:
        lin = F.linear(rows, enc.weight.detach().double(), enc.bias.detach().double())
        z = reference.sparsify(F.relu(lin), K)
    return z.reshape(*x.shape[:-1], N)


def expected_decode(sae, z: torch.Tensor, modality: str) -> torch.Tensor:
    dec = getattr(sae, DECODERS[sae.config.architecture][modality])
    return reference.decode(z.double(), dec.weight.detach().double(), dec.bias.detach().double())


def assert_close64(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("modality", MODALITIES)
def test_encode_matches_reference(sae, modality, shape):
    x = randn(*shape, seed=1)
    assert_close64(sae.encode(x, modality), expected_encode(sae, x, modality))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("modality", MODALITIES)
def test_decode_matches_reference(sae, modality, shape):
    z = randn(*shape[:-1], N, seed=2)
    assert_close64(sae.decode(z, modality), expected_decode(sae, z, modality))


@pytest.mark.parametrize("modality", MODALITIES)
def test_forward_matches_reference(sae, modality):
    x = randn(2, 5, D, seed=3)
    expected = expected_decode(sae, expected_encode(sae, x, modality), modality)
    assert_close64(sae(x, modality), expected)


@pytest.mark.parametrize("modality", MODALITIES)
def test_sparse_decode_equals_dense_decode(sae, modality):
    x = randn(2, 5, D, seed=4)
    codes = sae.encode_topk(x, modality)
    assert isinstance(codes, Codes)
    torch.testing.assert_close(
        sae.decode(codes, modality), sae.decode(sae.encode(x, modality), modality)
    )


def test_modalities_use_the_right_parameters(sae):
    """SAE-D has one encoder and decoder per modality; the VL-SAE and SAE-V share the encoder."""
    x, z = randn(9, D, seed=5), randn(9, N, seed=6)
    arch = sae.config.architecture
    same_encoder = ENCODERS[arch]["vision"] == ENCODERS[arch]["text"]
    same_decoder = DECODERS[arch]["vision"] == DECODERS[arch]["text"]
    assert torch.equal(sae.encode(x, "vision"), sae.encode(x, "text")) == same_encoder
    assert torch.equal(sae.decode(z, "vision"), sae.decode(z, "text")) == same_decoder


def test_topk_keeps_k_distinct_concepts_per_row(sae):
    codes = sae.encode_topk(randn(3, 4, D, seed=7))
    assert codes.indices.shape == codes.values.shape == (3, 4, K)
    assert all(len(set(row.tolist())) == K for row in codes.indices.reshape(-1, K))


def test_vlsae_exactly_k_nonzeros_in_0_2(vlsae):
    # Inputs parallel (activation 2) and antiparallel to concepts stress the clamp at the ends.
    w = vlsae.encoder.detach()
    x = torch.cat([randn(50, D, seed=8), 3 * w[:10], -w[10:20]])
    z = vlsae.encode(x)
    assert ((z != 0).sum(-1) == K).all()
    assert z.min() >= 0 and z.max() <= 2
    # At cos = 1 the square root turns fp32 rounding (~1e-7) into ~sqrt(1e-7): 2 within 1e-3.
    parallel = z[torch.arange(50, 60), torch.arange(10)]
    torch.testing.assert_close(parallel, torch.full((10,), 2.0), rtol=0, atol=1e-3)


def test_vlsae_float64_model_matches_reference_tightly(vlsae):
    x = randn(6, D, seed=9)
    model64 = make("vl-sae").double()
    torch.testing.assert_close(model64.encode(x), expected_encode(vlsae, x, "vision"))


def test_vlsae_encoder_scale_is_irrelevant():
    """Only concept directions matter: rescaling encoder rows leaves the activations alone."""
    sae, x = make("vl-sae"), randn(6, D, seed=10)
    before = sae.encode(x)
    sae.encoder.data.mul_(2)
    sae.encoder.data[:5].mul_(7)
    torch.testing.assert_close(sae.encode(x), before)


def _copy_data(w, new):
    w.data.copy_(new)


def _assign_data(w, new):
    w.data = new.clone()


def _no_grad_copy(w, new):
    with torch.no_grad():
        w.copy_(new)


def _data_rows(w, new):
    w.data[: N // 2] = new[: N // 2]


@pytest.mark.parametrize("modify", [_copy_data, _assign_data, _no_grad_copy, _data_rows])
def test_encoder_edits_in_place_are_seen(modify):
    """Writes through ``.data`` bump no version counter, so nothing may be cached on one.

    Runs under ``inference_mode`` like serving does: that is where a cache would be used.
    """
    sae, x = make("vl-sae"), randn(6, D, seed=11)
    with torch.inference_mode():
        before = sae.encode(x)
    modify(sae.encoder, randn(N, D, seed=12))
    with torch.inference_mode():
        after = sae.encode(x)
    assert not torch.equal(after, before)
    assert_close64(after, expected_encode(sae, x, "vision"))


def test_encode_is_differentiable_like_the_reference():
    """Training mode: gradients of the float64 model equal autograd through the reference."""
    sae = make("vl-sae").double().train()
    x, r = randn(5, D, seed=13).double(), randn(5, N, seed=14).double()
    (sae.encode(x) * r).sum().backward()
    w = sae.encoder.detach().clone().requires_grad_()
    (reference.encode(x, w, K) * r).sum().backward()
    assert sae.encoder.grad.abs().sum() > 0
    torch.testing.assert_close(sae.encoder.grad, w.grad)


@pytest.mark.parametrize("architecture", ARCHS)
def test_gradients_reach_input_encoder_and_decoder(architecture):
    sae = make(architecture).train()
    x = randn(4, D, seed=15).requires_grad_()
    sae(x).square().sum().backward()
    enc = getattr(sae, ENCODERS[architecture]["vision"])
    enc_weight = enc if isinstance(enc, torch.Tensor) else enc.weight
    dec = getattr(sae, DECODERS[architecture]["vision"])
    for grad in (x.grad, enc_weight.grad, dec.weight.grad, dec.bias.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # Only the selected concepts' decoder rows receive gradient.
    selected = sae.encode_topk(x.detach()).indices.unique()
    touched = dec.weight.grad.abs().sum(-1).nonzero().flatten()
    assert set(touched.tolist()) <= set(selected.tolist())


def test_tie_at_the_kth_boundary_keeps_exactly_k():
    """A documented difference: the reference drops every member of a tie at the boundary.

    One-hot encoder rows make each cosine equal to one coordinate of x/|x|, exactly; a
    duplicated row ties for rank k. We keep k concepts, the reference keeps k - 1.
    """
    sae = make("vl-sae")
    rows = torch.eye(D)[[*range(K - 1), K - 1, K - 1]]  # rank k is duplicated
    rest = torch.eye(D)[[K + i % (D - K) for i in range(N - K - 1)]]  # all score 0
    sae.encoder.data.copy_(torch.cat([rows, rest]))
    x = torch.zeros(1, D)
    x[0, :K] = torch.arange(K, 0, -1).float()  # distinct, decreasing: ranks 1..k
    ours = sae.encode(x)
    ref = reference.encode(x.double(), sae.encoder.detach().double(), K)
    assert (ours != 0).sum() == K
    assert (ref != 0).sum() == K - 1
    assert ours[0, K - 1 : K + 1].count_nonzero() == 1  # one of the two tied copies
    kept = ref != 0
    assert_close64(ours[kept], ref[kept])


def test_official_ties_drop_the_tie_at_the_boundary_as_the_reference():
    """``ties="official"``: the reference's TopK, so the tie above keeps k - 1 concepts."""
    sae = make("vl-sae")
    rows = torch.eye(D)[[*range(K - 1), K - 1, K - 1]]
    rest = torch.eye(D)[[K + i % (D - K) for i in range(N - K - 1)]]
    sae.encoder.data.copy_(torch.cat([rows, rest]))
    x = torch.zeros(1, D)
    x[0, :K] = torch.arange(K, 0, -1).float()
    codes = sae.encode_topk(x, ties="official")
    ref = reference.encode(x, sae.encoder.detach(), K)
    assert codes.values.shape == (1, K) and (codes.values != 0).sum() == K - 1
    assert torch.equal(codes.dense(), ref)
    assert (sae.encode(x, ties="keep-k") != 0).sum() == K


@pytest.mark.parametrize("architecture", ARCHS)
def test_float16_official_ties_keep_fewer_than_k_like_the_reference(architecture):
    """In float16 many activations round alike: the reference keeps fewer than k of a wide
    SAE's concepts; ``ties="official"`` keeps the very same ones, "keep-k" always k."""
    n, k, d = 4096, 64, 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # fixed weights: the suite's order must not decide the ties
        sae = build(SAEConfig(architecture=architecture, d_in=d, n_concepts=n, k=k))
    sae = sae.half().eval()
    x = randn(64, d, seed=5).half()
    with torch.no_grad():
        official = sae.encode(x, "text", ties="official")
        keep_k = sae.encode(x, "text")
        if architecture == "vl-sae":
            acts = reference.activations(x, sae.encoder)
        else:
            encoder = sae.encoder if architecture == "sae-v" else sae.text_encoder
            acts = F.relu(encoder(x))
    kept = (official != 0).sum(-1)
    assert torch.equal(official, reference.sparsify(acts, k))
    assert (kept <= k).all() and (kept < k).any()
    assert ((keep_k != 0).sum(-1) == k).all()


def test_unknown_ties_are_refused(vlsae):
    with pytest.raises(ValueError, match="ties must be one of"):
        vlsae.encode_topk(torch.zeros(1, D), ties="exact")


def test_empty_batch_round_trips(sae):
    x = torch.empty(0, D)
    assert sae.encode(x).shape == (0, N)
    assert sae(x).shape == sae.decode(sae.encode(x)).shape == (0, D)


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.encode(randn(2, D), "audio"),
        lambda s: s.encode_topk(randn(2, D), "Vision"),
        lambda s: s.decode(randn(2, N), "image"),
        lambda s: s.decode(s.encode_topk(randn(2, D)), "audio"),
    ],
    ids=["encode", "encode_topk", "decode", "decode-codes"],
)
def test_bad_modality_raises(sae, call):
    with pytest.raises(ValueError, match="modality"):
        call(sae)


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.encode(randn(2, D + 1)),
        lambda s: s.encode_topk(randn(D - 1)),
        lambda s: s.decode(randn(2, N - 1)),
        lambda s: s.decode(Codes(randn(2, K), torch.zeros(2, K, dtype=torch.long), N + 1)),
    ],
    ids=["encode", "encode_topk", "decode", "decode-codes"],
)
def test_wrong_width_raises(sae, call):
    with pytest.raises(ValueError, match="expected"):
        call(sae)


@pytest.fixture(scope="module")
def aux():
    ae = AuxiliaryAE(AuxConfig(d_vision=24, d_text=40, d_proj=D))
    with torch.no_grad():
        for i, p in enumerate(ae.parameters()):
            p.copy_(randn(*p.shape, seed=20 + i))
    return ae


@pytest.mark.parametrize(
    ("method", "layer", "width"),
    [
        ("project", "{}_projection", {"vision": 24, "text": 40}),
        ("reconstruct", "{}_decoder", {"vision": D, "text": D}),
    ],
)
@pytest.mark.parametrize("modality", MODALITIES)
def test_auxiliary_ae_is_its_linears(aux, method, layer, width, modality):
    lin = getattr(aux, layer.format(modality))
    x = randn(3, 2, width[modality], seed=30)
    expected = F.linear(x.double(), lin.weight.detach().double(), lin.bias.detach().double())
    assert_close64(getattr(aux, method)(x, modality), expected)
    with pytest.raises(ValueError, match="modality"):
        getattr(aux, method)(x, "audio")


# --- the vision-encoder SAEs (BatchTopK, Matryoshka; dictionary_learning's formulas) ---------

GROUPS = [N // 8, N // 4, N - N // 8 - N // 4]


def make_batchtopk(architecture: str, threshold: float = 0.3):
    groups = GROUPS if architecture == "matryoshka" else None
    config = SAEConfig(architecture=architecture, d_in=D, n_concepts=N, k=K, groups=groups)
    sae = build(config)
    with torch.no_grad():
        for i, p in enumerate(sae.parameters()):
            p.copy_(randn(*p.shape, seed=50 + i) * 0.3)
        sae.threshold.fill_(threshold)
    return sae


def batchtopk_reference(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``relu((x - b_dec) W_enc + b_enc)`` kept above the threshold, and its decode."""
    w_enc, b_enc = sae.encoder.weight.double(), sae.encoder.bias.double()
    w_dec, b_dec = sae.decoder.weight.double(), sae.decoder.bias.double()
    f = torch.relu((x.double() - b_dec) @ w_enc.T + b_enc)
    f = f * (f > float(sae.threshold))
    return f, f @ w_dec + b_dec


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka"])
def test_threshold_encoding_matches_the_float64_formulas(architecture):
    sae = make_batchtopk(architecture)
    x = randn(9, D, seed=3)
    f, recon = batchtopk_reference(sae, x)
    codes = sae.encode_topk(x)
    assert int((codes.values > 0).sum()) == int((f > 0).sum())
    torch.testing.assert_close(codes.dense().double(), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x).double(), recon, rtol=1e-5, atol=1e-5)
    assert torch.equal(sae.encode(x, ties="official"), sae.encode(x))  # no ties to break


def test_training_keeps_the_k_times_rows_largest_of_the_batch():
    sae = make_batchtopk("batchtopk")
    x = randn(6, D, seed=4)
    with torch.no_grad():
        out = sae.forward_train(x)
        scores = torch.relu(sae.encoder(x - sae.decoder.bias))
    kept = out.codes.dense()
    assert int((kept > 0).sum()) == K * 6  # rows may differ; the batch holds k per row
    assert float(kept[kept > 0].min()) >= float(scores.flatten().topk(K * 6).values.min())
    assert len(set((kept > 0).sum(-1).tolist())) > 1  # not per-row TopK


def test_threshold_update_is_a_running_mean_of_the_smallest_kept():
    sae = make_batchtopk("batchtopk", threshold=-1.0)
    first = Codes(torch.tensor([[0.0, 2.0, 0.5]]), torch.tensor([[0, 1, 2]]), N)
    sae.update_threshold(sae.smallest_kept(first), beta=0.9)
    assert float(sae.threshold) == 0.5  # the first update sets it
    sae.update_threshold(torch.tensor(1.5), beta=0.9)
    assert float(sae.threshold) == pytest.approx(0.9 * 0.5 + 0.1 * 1.5)
    sae.update_threshold(
        sae.smallest_kept(Codes(torch.zeros(1, 2), torch.zeros(1, 2).long(), N)), 0.9
    )
    assert float(sae.threshold) == pytest.approx(0.9 * (0.9 * 0.5 + 0.1 * 1.5))  # none kept: 0


def test_matryoshka_prefixes_add_up_group_by_group():
    sae = make_batchtopk("matryoshka", threshold=0.0)
    x = randn(5, D, seed=5)
    codes = sae.encode_topk(x)
    dense = codes.dense()
    ends = torch.tensor(GROUPS).cumsum(0).tolist()
    for recon, end in zip(sae.prefix_reconstructions(codes), ends, strict=True):
        expected = dense[:, :end] @ sae.decoder.weight[:end] + sae.decoder.bias
        torch.testing.assert_close(recon, expected, rtol=1e-5, atol=1e-5)
    assert sae.group_of().tolist() == sum(([g] * s for g, s in enumerate(GROUPS)), [])


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"architecture": "matryoshka"}, "groups"),
        ({"architecture": "batchtopk", "groups": [N]}, "groups"),
        ({"architecture": "matryoshka", "groups": [N // 2, N // 2 - 1]}, "summing to n_concepts"),
        ({"architecture": "matryoshka", "groups": [N, 0]}, "positive sizes"),
        ({"architecture": "batchtopk", "shared_concepts": [1]}, "one modality"),
    ],
)
def test_vision_sae_configs_are_validated(settings, message):
    with pytest.raises(ValueError, match=message):
        SAEConfig(d_in=D, n_concepts=N, k=K, **settings)


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka"])
def test_vision_saes_refuse_text(architecture):
    sae = make_batchtopk(architecture)
    with pytest.raises(ValueError, match="reads vision only"):
        sae.encode_topk(randn(2, D), "text")
    with pytest.raises(ValueError, match="reads vision only"):
        sae.decode(sae.encode_topk(randn(2, D)), "text")


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka"])
def test_vision_saes_round_trip_through_checkpoints(architecture, tmp_path):
    from vlsae_guard.core.checkpoint import load

    sae = make_batchtopk(architecture)
    sae.save_pretrained(tmp_path)
    loaded = load(tmp_path)
    assert type(loaded) is type(sae) and loaded.config == sae.config
    assert float(loaded.threshold) == float(sae.threshold)
    x = randn(4, D, seed=6)
    assert torch.equal(loaded(x), sae(x))


@pytest.mark.parametrize("dropped", ["half", "all", "none"])
def test_decode_of_zeroed_slots_is_bitwise_the_full_gather(vlsae, dropped):
    """The inference decode skips zero-valued slots (what the guard drops); the sum is the one
    the full gather computes, bit for bit, including rows with every slot zeroed."""
    codes = vlsae.encode_topk(randn(2, 6, D, seed=11))
    keep = {"half": codes.indices % 2 == 0, "all": torch.zeros_like(codes.indices, dtype=bool),
            "none": torch.ones_like(codes.indices, dtype=bool)}[dropped]  # fmt: skip
    keep[0, 0] = False  # one row with every slot zeroed, whatever the case
    masked = Codes(codes.values * keep, codes.indices, codes.n_concepts)
    decoder = vlsae.vision_decoder
    full = F.embedding_bag(
        masked.indices.reshape(-1, K),
        decoder.weight,
        per_sample_weights=masked.values.reshape(-1, K),
        mode="sum",
    ).reshape(2, 6, D)
    with torch.no_grad():
        assert torch.equal(decoder.sparse(masked, bias=False), full)
    assert torch.equal(decoder.sparse(masked, bias=False).detach(), full)  # the autograd path
