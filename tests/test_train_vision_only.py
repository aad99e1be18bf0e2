"""Training the vision-only SAEs (BatchTopK, Matryoshka): vision rows only, the threshold,
the nested groups, the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _support import make_pairs, one_thread, write_store  # noqa: F401
from pydantic import ValidationError
from safetensors import safe_open
from test_train import small_config

from vlsae_guard.cli import main
from vlsae_guard.core.checkpoint import load
from vlsae_guard.core.sae import Codes, MatryoshkaSAE, build
from vlsae_guard.core.sae_config import SAEConfig
from vlsae_guard.pipeline.distributed import Dist
from vlsae_guard.pipeline.store import ActivationStore, StoreWriter
from vlsae_guard.pipeline.train import SAEObjective, TrainError, train
from vlsae_guard.pipeline.train.objectives import Threshold

pytestmark = pytest.mark.usefixtures("one_thread")
# Fast enough to learn in a few epochs; the threshold is set from the 11th step on (epoch 1
# has 6 steps, so it is validated with BatchTopK and the later ones with the threshold).
VISION = dict(lr=1e-2, epochs=8, threshold_start=10, threshold_beta=0.9)


def drop_text(store: Path) -> Path:
    """The store with its text rows removed: what a vision-encoder site collects."""
    old = ActivationStore(store)
    writer = StoreWriter(store, old.manifest.header())
    for position, shard in enumerate(old.shards):
        tensors = old.load(position)
        tensors["text"], tensors["text_pair"] = tensors["text"][:0], tensors["text_pair"][:0]
        writer.write(shard.index, tensors, old.records(position), [])
    writer.finalize()
    return store


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """512 synthetic pairs (24-d rows, 4 shards): "both" modalities, and "vision" rows only."""
    planted = make_pairs(n_pairs=512, d_vision=24, d_text=24, d_latent=16, n_atoms=16)
    root = tmp_path_factory.mktemp("vision")
    both, vision = (write_store(root / n, planted.vision, planted.text, 128) for n in "bv")
    return {"both": both, "vision": drop_text(vision)}


@pytest.fixture(scope="module")
def vision_store(stores) -> Path:
    return stores["vision"]


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka"])
def test_learns_on_vision_rows_and_saves_threshold(vision_store, tmp_path, architecture):
    assert ActivationStore(vision_store).manifest.counts.text_rows == 0
    result = train(small_config(vision_store, tmp_path, architecture=architecture, **VISION))
    history = result.history
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    assert [h["val_encoding"] for h in history] == ["batchtopk"] + ["threshold"] * 7
    assert history[0]["threshold"] == -1 and history[0]["l0_vision"] == 3  # k per row
    assert "explained_variance_text" not in history[0] and "cross_modal_overlap" not in history[0]

    sae = load(tmp_path)
    config, stats = sae.config, sae.config.stats
    assert config.architecture == architecture and config.shared_concepts is None
    assert config.groups == ([2, 4, 8, 18] if architecture == "matryoshka" else None)
    assert float(sae.threshold) == stats["threshold"] > 0
    assert stats["explained_variance_vision"] > 0.5 and 1 < stats["l0_vision"] < 6
    with safe_open(tmp_path / "concept_frequencies.safetensors", "pt") as f:
        assert list(f.keys()) == ["vision"] and not f.metadata()
    record = json.loads((tmp_path / "training.json").read_text())
    assert record["config"]["threshold_start"] == 10 and record["split"]["train"]["text"] == 0


def test_matryoshka_objective_is_the_mean_over_prefixes():
    torch.manual_seed(0)
    config = SAEConfig(architecture="matryoshka", d_in=8, n_concepts=16, k=3, groups=[2, 6, 8])
    sae = build(config)
    x = torch.randn(5, 8)
    loss, parts = SAEObjective(sae, 0, 0.0)(x)
    with torch.no_grad():
        codes = sae.forward_train(x).codes
    prefixes = sae.prefix_reconstructions(codes)
    assert torch.allclose(loss, sum(F.mse_loss(r, x) for r in prefixes) / 3)
    assert torch.equal(prefixes[-1], sae.forward_train(x).recon)
    assert float(parts["low"]) == float(codes.values[codes.values > 0].min())


def test_threshold_waits_for_its_start_then_follows_the_running_mean():
    sae = MatryoshkaSAE(SAEConfig(architecture="matryoshka", d_in=4, n_concepts=4, k=1, groups=[4]))
    threshold = Threshold(sae, beta=0.5, start=2, dist=Dist())
    threshold.update(torch.tensor(3.0), step=1)
    assert float(sae.threshold) == -1  # not yet
    threshold.update(torch.tensor(3.0), step=2)
    assert float(sae.threshold) == 3  # the first update sets it
    threshold.update(torch.tensor(1.0), step=3)
    assert float(sae.threshold) == 2
    threshold.update(torch.tensor(torch.inf), step=4)  # nothing fired: the core counts 0
    assert float(sae.threshold) == 1
    values = torch.tensor([[0.0, 0.5, 2.0]])  # a spare slot (0) is not an activation
    assert float(sae.smallest_kept(Codes(values, torch.tensor([[0, 1, 2]]), 4))) == 0.5


def test_refusals(stores, vision_store, tmp_path):
    def config(**overrides):
        return small_config(vision_store, tmp_path / "o", **overrides)

    with pytest.raises(ValidationError, match="group_fractions must sum to 1, got 0.9"):
        config(architecture="matryoshka", group_fractions=[0.5, 0.4])
    with pytest.raises(ValidationError, match="greater than 0"):
        config(architecture="matryoshka", group_fractions=[1.5, -0.5])
    with pytest.raises(ValidationError, match=r"\['group_fractions'\] do not apply to .*'batch"):
        config(architecture="batchtopk", group_fractions=[0.5, 0.5])
    with pytest.raises(ValidationError, match=r"\['threshold_beta', 'threshold_start'\] do not"):
        config(threshold_beta=0.9, threshold_start=3)  # vl-sae
    with pytest.raises(ValidationError, match=r"\['align'\] .* 'batchtopk' \(it reads vision"):
        config(architecture="batchtopk", align={})
    with pytest.raises(ValidationError, match=r"\['shared_threshold'\] do not apply"):
        config(architecture="matryoshka", shared_threshold=0.1)
    # At their defaults, they read back (a dumped config is the same config).
    dumped = config().model_dump()
    assert type(config()).model_validate(dumped) == config()

    with pytest.raises(TrainError, match=r"groups of \[0, 1, 2, 5\] concepts out of 8"):
        train(config(architecture="matryoshka", n_concepts=8))
    with pytest.raises(TrainError, match="'vl-sae' learns concepts of vision and text rows, but"):
        train(config())  # before anything is written
    # A vision-only SAE reads the vision rows of a store that has text rows too.
    result = train(small_config(stores["both"], tmp_path / "t", architecture="batchtopk", epochs=1))
    record = json.loads((tmp_path / "t/training.json").read_text())
    assert record["split"]["train"]["text"] > 0 and "l0_text" not in result.history[0]


def test_cli_flags(vision_store, tmp_path, capsys):
    out = tmp_path / "sae"
    argv = ["train", "--store", str(vision_store), "--out", str(out), "--arch", "matryoshka"]
    argv += ["--n-concepts", "32", "--k", "3", "--epochs", "2", "--batch-size", "64"]
    flags = ["--group-fractions", "0.25", "0.75", "--threshold-beta", "0.5"]
    assert main([*argv, *flags, "--threshold-start", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "explained variance vision" in printed and "threshold" in printed
    assert "shared" not in printed
    sae = load(out)
    assert sae.config.groups == [8, 24] and float(sae.threshold) > 0
    config = json.loads((out / "training.json").read_text())["config"]
    assert (config["threshold_beta"], config["threshold_start"]) == (0.5, 2)
    bad = [*argv, "--out", str(tmp_path / "bad"), "--group-fractions", "0.5", "0.2"]
    assert main(bad) == 2
    assert "group_fractions must sum to 1" in capsys.readouterr().err
