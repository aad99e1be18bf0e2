"""The certified bfloat16 screen: the full search's answer, on random, trained and crowded SAEs."""

from __future__ import annotations

import argparse
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlsae_guard import VLSAE, SAEConfig, build
from vlsae_guard.cli.guard_flags import add_guard_flags, guard_config
from vlsae_guard.core.guard import GuardError, guard
from vlsae_guard.core.intervention import GuardConfig, ProjectorIntervention
from vlsae_guard.core.screen import ScreenedSearch, ScreenWarning

ROOT = Path(__file__).resolve().parents[1]


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def vlsae(d: int, n: int, k: int, seed: int = 0) -> VLSAE:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VLSAE(SAEConfig(d_in=d, n_concepts=n, k=k)).eval()


def decided_rows(x: torch.Tensor, encoder: torch.Tensor, k: int, gap: float = 1e-5) -> torch.Tensor:
    """Rows whose k-th and (k+1)-th float64 cosines differ by more than float32 can blur."""
    cos = F.normalize(x.double(), dim=-1) @ F.normalize(encoder.double(), dim=-1).T
    top = cos.topk(k + 1, dim=-1).values
    return (top[:, k - 1] - top[:, k]) > gap


def assert_same_answer(screened, full, x: torch.Tensor, encoder: torch.Tensor, k: int) -> None:
    """Same concepts as the full search on every decided row, and their float32 values."""
    rows = decided_rows(x.reshape(-1, x.shape[-1]), encoder, k)
    assert rows.float().mean() > 0.9  # the check is about most rows, not a vacuous few
    a_idx, a_val = (t.reshape(-1, k)[rows] for t in (screened.indices, screened.values))
    b_idx, b_val = (t.reshape(-1, k)[rows] for t in (full.indices, full.values))
    a_order, b_order = a_idx.argsort(-1), b_idx.argsort(-1)
    assert torch.equal(a_idx.gather(-1, a_order), b_idx.gather(-1, b_order))
    torch.testing.assert_close(
        a_val.gather(-1, a_order), b_val.gather(-1, b_order), rtol=0, atol=2e-6
    )


@pytest.fixture(scope="module")
def trained():
    """A VL-SAE fitted for 150 Adam steps to sparse combinations of 48 directions plus a
    shared offset (anisotropic, like projector outputs): its cosines are no longer random."""
    gen = torch.Generator().manual_seed(1)
    atoms = F.normalize(torch.randn(48, 64, generator=gen), dim=-1) * 3
    offset = torch.randn(64, generator=gen)

    def batch(n: int) -> torch.Tensor:
        mask = torch.rand(n, 48, generator=gen) < 0.1
        return offset + (mask * torch.rand(n, 48, generator=gen)) @ atoms

    sae = vlsae(64, 512, 16, seed=2).train()
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for _ in range(150):
        x = batch(256)
        loss = F.mse_loss(sae.forward_train(x, "vision").recon, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return sae.eval(), batch(300), loss.item()


@pytest.mark.parametrize("shape", [(2, 150, 512), (1, 512)], ids=str)
def test_random_sae_gives_the_full_search_answer(shape):
    sae = vlsae(512, 8192, 64)
    x = randn(*shape, seed=3)
    search = ScreenedSearch(sae)
    screened = search.encode_topk(x)
    assert screened.indices.shape == (*shape[:-1], 64)
    assert_same_answer(screened, sae.encode_topk(x), x, sae.encoder.detach(), 64)
    assert not search.stats.fell_back
    assert 64 <= search.stats.rescored_per_row < 8192 / 2  # it did screen concepts out


def test_trained_sae_gives_the_full_search_answer(trained):
    sae, x, loss = trained
    assert loss < 0.5  # it did fit (the data's variance is about 1.5)
    search = ScreenedSearch(sae)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScreenWarning)
        screened = search.encode_topk(x)
    assert_same_answer(screened, sae.encode_topk(x), x, sae.encoder.detach(), 16)


def test_crowded_kth_cosine_gives_the_full_search_answer():
    """Hundreds of concepts within the screen's error of the k-th cosine: all rescored."""
    d, n, k = 256, 2048, 32
    base = F.normalize(randn(1, d, seed=5), dim=-1)
    sae = vlsae(d, n, k)
    with torch.no_grad():  # 1500 concepts at cosines 0.9 +- 1e-3 with the inputs' direction
        near = 0.9 * base + (0.19**0.5) * F.normalize(randn(1500, d, seed=6), dim=-1)
        sae.encoder[:1500] = near + 1e-3 * randn(1500, d, seed=7)
    x = base + 1e-3 * randn(40, d, seed=8)
    search = ScreenedSearch(sae)
    screened = search.encode_topk(x)
    assert search.stats.rescored_per_row > 10 * k
    assert_same_answer(screened, sae.encode_topk(x), x, sae.encoder.detach(), k)


def test_a_changed_encoder_falls_back_to_the_full_search():
    sae = vlsae(128, 1024, 16)
    search = ScreenedSearch(sae)
    x = randn(30, 128, seed=9)
    with torch.no_grad():
        sae.encoder.neg_()  # after the screen was built
    with pytest.warns(ScreenWarning, match="full search"):
        screened = search.encode_topk(x)
    assert search.stats.fell_back
    full = sae.encode_topk(x)
    assert torch.equal(screened.indices, full.indices)
    assert torch.equal(screened.values, full.values)


def test_an_sae_cast_after_the_screen_was_built_falls_back():
    sae = vlsae(64, 512, 8)
    search = ScreenedSearch(sae)
    sae.double()
    x = randn(5, 64, seed=12)
    with pytest.warns(ScreenWarning, match="now torch.float64"):
        screened = search.encode_topk(x)
    assert torch.equal(screened.indices, sae.encode_topk(x).indices)


def test_non_finite_inputs_take_the_full_search():
    sae = vlsae(64, 512, 8)
    x = randn(5, 64, seed=10)
    x[2, 3] = float("nan")
    screened, full = ScreenedSearch(sae).encode_topk(x), sae.encode_topk(x)
    torch.testing.assert_close(screened.values, full.values, equal_nan=True)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: build(SAEConfig(architecture="sae-v", d_in=32, n_concepts=96, k=8)), "VL-SAE"),
        (lambda: vlsae(32, 96, 8).half(), "float16"),
        (lambda: vlsae(32, 96, 8).to("meta"), "CPUs only"),
    ],
    ids=["sae-v", "float16", "meta-device"],
)
def test_what_the_bound_does_not_cover_is_refused(make, match):
    with pytest.raises(ValueError, match=match):
        ScreenedSearch(make())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tokens_with_a_float32_sae(dtype):
    """A half-precision model's image tokens: screened in the SAE's float32, returned in theirs,
    as the full search returns them."""
    sae = vlsae(64, 512, 8)
    feats = randn(2, 30, 64, seed=14).to(dtype)
    out = {}
    for search in ("full", "screened"):
        config = GuardConfig(alpha=1.0, shared_concepts=list(range(0, 512, 2)), search=search)
        out[search] = ProjectorIntervention.build(sae, config)(feats)
    assert out["screened"].dtype == dtype
    torch.testing.assert_close(out["screened"], out["full"])
    assert not torch.equal(out["full"], feats)


@pytest.mark.filterwarnings("ignore::vlsae_guard.core.fit.GuardFitWarning")  # a random SAE
def test_guard_screened_equals_guard_full(hf_model_and_processor, tiny_sae_dir, tiny_images):
    model, processor = hf_model_and_processor
    inputs = processor(images=tiny_images[:2], text=["USER: <image>\nWhat? ASSISTANT:"] * 2,
                       return_tensors="pt", padding=True)  # fmt: skip
    outs = {}
    for search in ("full", "screened"):
        with guard(model, tiny_sae_dir, alpha=1.0, search=search), torch.no_grad():
            outs[search] = model(**inputs).logits
    torch.testing.assert_close(outs["screened"], outs["full"], rtol=0, atol=1e-5)
    assert not torch.equal(outs["full"], model(**inputs).logits)  # the guard did act


def test_search_is_refused_where_it_does_not_apply(hf_model_and_processor, tiny_sae_dir):
    with pytest.raises(ValueError, match="search='screened' applies to mode 'projector'"):
        GuardConfig(mode="paper", layer=1, search="screened")
    with pytest.raises(ValueError, match="at site 'vision_tower:0'"):
        GuardConfig(site="vision_tower:0", search="screened")
    model, _ = hf_model_and_processor
    half = VLSAE.from_pretrained(tiny_sae_dir).half()
    with pytest.raises(GuardError, match="float16"):
        guard(model, half, search="screened")


def test_search_flag_reaches_the_config():
    parser = argparse.ArgumentParser()
    add_guard_flags(parser)
    args = parser.parse_args(["--vlsae-guard", "DIR", "--vlsae-search", "screened"])
    assert guard_config(args).search == "screened"
    with pytest.raises(SystemExit):
        parser.parse_args(["--vlsae-search", "pruned"])


@pytest.mark.slow
def test_perf_sae_measures_a_given_checkpoint_and_rows(tmp_path):
    """``benchmarks/perf_sae.py --sae --inputs`` times the three searches on them and reports
    the screened one's sets against float64."""
    vlsae(64, 512, 8, seed=4).save_pretrained(tmp_path / "sae")
    torch.save(randn(40, 64, seed=13), tmp_path / "rows.pt")
    script = ROOT / "benchmarks" / "perf_sae.py"
    out = subprocess.run(
        [sys.executable, str(script), "--sae", str(tmp_path / "sae"), "--inputs",
         str(tmp_path / "rows.pt"), "--clusters", "8", "--repeats", "1", "--threads", "1"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "40 tokens x d=64, 512 concepts, k=8" in out
    assert "screened: fell back to the full search              False" in out
    assert "rows whose sets match float64: screened            1.0000" in out
