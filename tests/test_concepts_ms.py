"""Monosemanticity score: closed form against the pairwise definition, properties, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from _concepts_support import concepts_env  # noqa: F401
from safetensors.torch import save_file

import vlsae_guard
from vlsae_guard.cli import main
from vlsae_guard.concepts import MSAccumulator, monosemanticity_score, pairwise_monosemanticity
from vlsae_guard.concepts.ms_store import store_images
from vlsae_guard.pipeline.store import ActivationStore


def random_data(n=120, k=40, d=12, seed=0, sparse=False):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, k, generator=g, dtype=torch.float64) * 3 - 0.5
    if sparse:
        a = a.clamp_min(0) * (torch.rand(n, k, generator=g) < 0.2)
    e = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.5  # some positive similarity
    return a, e


def test_closed_form_equals_pairwise_definition():
    a, e = random_data()
    closed, pairwise = monosemanticity_score(a, e), pairwise_monosemanticity(a, e)
    assert closed.shape == (40,) and closed.dtype == torch.float64
    torch.testing.assert_close(closed, pairwise, rtol=1e-6, atol=0)
    assert vlsae_guard.monosemanticity_score is monosemanticity_score


def test_chunked_sparse_and_streamed_agree_with_unchunked():
    a, e = random_data(n=90, k=33, sparse=True)
    reference = pairwise_monosemanticity(a, e)
    alive = ~torch.isnan(reference)
    assert alive.sum() > 25
    for chunk in (1, 7, 33, 1000):
        got = monosemanticity_score(a, e, chunk_size=chunk)
        torch.testing.assert_close(got, reference, rtol=1e-6, atol=0, equal_nan=True)
    torch.testing.assert_close(
        monosemanticity_score(a.to_sparse(), e), reference, rtol=1e-6, atol=0, equal_nan=True
    )
    for sparse in (False, True):  # one pass over images in uneven batches, any order
        acc = MSAccumulator(33, e.shape[1])
        order = torch.randperm(90, generator=torch.Generator().manual_seed(1))
        for part in order.split(17):
            batch = a[part].to_sparse() if sparse else a[part]
            acc.add(batch, e[part])
        torch.testing.assert_close(acc.scores(), reference, rtol=1e-6, atol=0, equal_nan=True)
    # numpy and float32 inputs
    got = monosemanticity_score(a.numpy().astype(np.float32), e.numpy())
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_dead_concepts_are_nan():
    a, e = random_data(n=30, k=5)
    a[:, 0] = 0.7  # constant: max == min
    a[:, 1] = 0.0
    a[3, 1] = 2.0  # non-zero on a single image: every pair weight is 0
    a[:, 2] = 0.0
    a[3, 2], a[4, 2] = 1.0, 0.5  # two images: alive
    for scores in (monosemanticity_score(a, e), monosemanticity_score(a.to_sparse(), e)):
        assert torch.isnan(scores[0]) and torch.isnan(scores[1])
        s = e[3] @ e[4] / (e[3].norm() * e[4].norm())  # one pair: its similarity
        assert scores[2] == pytest.approx(float(s), rel=1e-9)
        assert not torch.isnan(scores[3:]).any()


def test_invariances():
    a, e = random_data(n=60, k=8)
    base = monosemanticity_score(a, e)
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(monosemanticity_score(a[perm], e[perm]), base)
    scale = torch.tensor([0.001, 1, 7, 1e4, 2, 3, 5, 0.5], dtype=torch.float64)
    torch.testing.assert_close(monosemanticity_score(a * scale + 3.0, e), base)  # affine
    torch.testing.assert_close(monosemanticity_score(a, e * 17.0), base)  # rows normalised
    torch.testing.assert_close(monosemanticity_score(a[:, [3, 1]], e), base[[3, 1]])  # per concept


def test_hand_computed_three_images():
    # Images 0 and 1 similar (cos 0.6), image 2 orthogonal to both.
    e = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    a = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]])
    # concept 0: ã = (1, 0.5, 0): one weighted pair (0,1): 0.5 * 0.6 / 0.5 = 0.6
    # concept 1: ã = (0, 1/3, 1): one pair (1,2), similarity 0 -> 0
    scores = monosemanticity_score(a, e)
    assert scores.tolist() == pytest.approx([0.6, 0.0], abs=1e-12)
    a2 = torch.tensor([[1.0], [1.0], [0.5]])  # ã = (1, 1, 0): pair (0,1) only
    assert float(monosemanticity_score(a2, e)[0]) == pytest.approx(0.6)
    a3 = torch.tensor([[1.0], [1.0], [1.5]])  # ã = (0, 0, 1): dead
    assert math.isnan(float(monosemanticity_score(a3, e)[0]))


def test_bad_shapes_are_clear_errors():
    a, e = random_data(n=10, k=3)
    with pytest.raises(ValueError, match="expected 10 rows"):
        monosemanticity_score(a, e[:9])
    with pytest.raises(ValueError, match="2-D"):
        monosemanticity_score(a[:, 0], e)
    with pytest.raises(ValueError, match="at least 2 images"):
        monosemanticity_score(a[:1], e[:1])
    e[4] = 0
    with pytest.raises(ValueError, match="row 4"):
        monosemanticity_score(a, e)
    with pytest.raises(TypeError, match="torch tensor or numpy"):
        monosemanticity_score([[1.0]], e)
    acc = MSAccumulator(3, 5)
    with pytest.raises(ValueError, match=r"\(10 x 5\)"):
        acc.add(a, e[:, :4])


# --- the CLI on a tiny store -------------------------------------------------------------------


def write_embeddings(path, store_dir, key="images", n=None, seed=0, d=16):
    images = store_images(ActivationStore(store_dir))
    n = len(images) if n is None else n
    emb = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    meta = {}
    if key == "images":
        meta["images"] = json.dumps([str(img) for _, img, _ in images][:n])
    elif key == "ids":
        meta["ids"] = json.dumps([pid for _, _, pid in images][:n])
    save_file({"embeddings": emb}, path, metadata=meta)
    return emb


def test_ms_cli_prints_distribution_histogram_and_baseline(concepts_env, tmp_path, capsys):  # noqa: F811
    env = concepts_env
    emb_file = tmp_path / "emb.safetensors"
    write_embeddings(emb_file, env.store)
    out = tmp_path / "ms"
    argv = ["ms", "--sae", str(env.sae), "--store", str(env.store), "--embeddings", str(emb_file)]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"over {env.n_images} images" in printed
    for word in ("sae", "raw neurons", "dead", "mean", "best"):
        assert word in printed
    png = (out / "ms_histogram.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "ms.json").read_text())
    sae_scores = record["scores"]["sae"]
    assert len(sae_scores) == env.n_concepts and len(record["scores"]["raw_neurons"]) == env.d
    dead = sum(s is None for s in sae_scores)
    assert record["summary"]["sae"]["dead"] == dead and dead < env.n_concepts
    alive = [s for s in sae_scores if s is not None]
    assert record["summary"]["sae"]["mean"] == pytest.approx(sum(alive) / len(alive))
    assert all(-1 - 1e-9 <= s <= 1 + 1e-9 for s in alive)

    # Keyed by pair ids, in another row order with extra rows: same scores.
    images = store_images(ActivationStore(env.store))
    emb = write_embeddings(emb_file, env.store)  # same seed: same rows
    perm = list(reversed(range(len(images))))
    ids = [images[i][2] for i in perm] + ["extra:1"]
    save_file(
        {"embeddings": torch.cat([emb[perm], torch.randn(1, emb.shape[1])])},
        tmp_path / "ids.safetensors",
        metadata={"ids": json.dumps(ids)},
    )
    out2 = tmp_path / "ms2"
    argv2 = [*argv[:-1], str(tmp_path / "ids.safetensors"), "--out", str(out2), "--no-baseline"]
    assert main(argv2) == 0
    again = json.loads((out2 / "ms.json").read_text())
    assert "raw_neurons" not in again["scores"]
    np.testing.assert_allclose(
        np.array(again["scores"]["sae"], dtype=float),
        np.array(sae_scores, dtype=float),
        rtol=1e-9,
    )


def test_ms_cli_rejects_mismatched_embeddings(concepts_env, tmp_path, capsys):  # noqa: F811
    env = concepts_env
    out = tmp_path / "out"
    argv = ["ms", "--sae", str(env.sae), "--store", str(env.store), "--out", str(out)]
    cases = {
        "short.safetensors": dict(key=None, n=env.n_images - 1),
        "missing.safetensors": dict(key="images", n=env.n_images - 2),
    }
    for name, kwargs in cases.items():
        path = tmp_path / name
        write_embeddings(path, env.store, **kwargs)
        assert main([*argv, "--embeddings", str(path)]) == 2
        err = capsys.readouterr().err
        assert str(path) in err, err
        assert (
            (f"{env.n_images - 1} embedding rows" in err)
            if name.startswith("short")
            else ("have no embedding" in err)
        )
    bad = tmp_path / "bad.safetensors"
    save_file({"other": torch.zeros(2, 2)}, bad)
    assert main([*argv, "--embeddings", str(bad)]) == 2
    assert "no tensor 'embeddings'" in capsys.readouterr().err
    assert main([*argv, "--embeddings", str(tmp_path / "nope.npz")]) == 2
    assert "--embeddings" in capsys.readouterr().err
