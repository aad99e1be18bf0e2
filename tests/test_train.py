"""Training: it learns a planted dictionary, resumes exactly, runs under DDP, feeds the guard."""

from __future__ import annotations

import json
import os
import runpy
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _support import make_pairs, one_thread, recovery, write_store  # noqa: F401
from PIL import Image
from safetensors.torch import load_file

from vlsae_guard import VLSAE, SAEConfig, guard
from vlsae_guard.backends.hf import HFInputs
from vlsae_guard.cli import main
from vlsae_guard.core.checkpoint import load
from vlsae_guard.pipeline.collect import CollectConfig, collect
from vlsae_guard.pipeline.store import ActivationStore
from vlsae_guard.pipeline.train import (
    STATE,
    SAEObjective,
    TrainConfig,
    Trainer,
    TrainError,
    firing_counts,
    shared_concepts,
    train,
)

TESTS = Path(__file__).parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    """512 synthetic pairs, equal widths (no stage 1 needed), 4 shards."""
    planted = make_pairs(n_pairs=512, d_vision=24, d_text=24, d_latent=16, n_atoms=16)
    root = tmp_path_factory.mktemp("small")
    return write_store(root / "store", planted.vision, planted.text, pairs_per_shard=128)


def small_config(store: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(
        store=store,
        out=out,
        n_concepts=32,
        k=3,
        epochs=4,
        batch_size=64,
        lr=2e-3,
        window=2,
        dead_after=300,
        progress=False,
    )
    return TrainConfig(**(settings | overrides))


# --- it learns ------------------------------------------------------------------------------


def test_recovers_planted_concepts(tmp_path):
    """Stage 1 + stage 2 on pairs from a planted dictionary with a different linear map per
    modality: every atom must come back as a decoder row (cosine >= 0.9 after the map and the
    learned projection), as the *same* concept in both modalities, in the shared set."""
    planted = make_pairs(n_pairs=4096, seed=1)
    store = write_store(tmp_path / "store", planted.vision, planted.text, pairs_per_shard=512)
    config = TrainConfig(
        store=store,
        out=tmp_path / "sae",
        n_concepts=48,
        k=3,
        epochs=30,
        batch_size=128,
        lr=2e-3,
        warmup=0.05,
        patience=30,
        dead_after=2000,
        align={"d_proj": 32, "epochs": 30, "batch_size": 256, "lr": 3e-3},
        seed=1,
        progress=False,
    )
    sae = train(config).sae
    best = {}
    for m in ("vision", "text"):
        projection = getattr(sae.aux, f"{m}_projection").weight.detach()
        cos, best[m] = recovery(
            sae.decoder_for(m).weight.detach(), planted.mapped(m) @ projection.T
        )
        assert (cos >= 0.9).float().mean() >= 0.9, f"{m}: {cos}"
    same = best["vision"] == best["text"]
    assert same.float().mean() >= 0.9
    shared = set(sae.config.shared_concepts)
    assert set(best["vision"][same].tolist()) <= shared
    freq = load_file(tmp_path / "sae/concept_frequencies.safetensors")
    assert sorted(shared) == shared_concepts(freq["vision"], freq["text"], 1e-3)

    loaded = load(tmp_path / "sae")  # what the guard will read
    assert loaded.config.shared_concepts == sae.config.shared_concepts
    stats = loaded.config.stats
    assert stats["explained_variance_vision"] > 0.7 and stats["explained_variance_text"] > 0.7
    assert stats["l0_vision"] == stats["l0_text"] == 3.0
    assert stats["cross_modal_overlap"] > 0.8 and stats["dead_fraction"] < 0.1
    assert stats["align_val_retrieval_accuracy"] > 0.5
    record = json.loads((tmp_path / "sae/training.json").read_text())
    assert record["done"] and record["config"]["align"]["d_proj"] == 32
    assert record["store"]["dataset_fingerprint"] == "synthetic"
    assert len(record["history"]) == 30 and len(record["align_history"]) == 30
    assert record["split"]["val"]["pairs"] == round(0.2 * 4096)
    assert "packages" in record["environment"]


def test_shared_concepts_need_both_modalities():
    """A concept that only one modality activates is not shared; the threshold counts."""
    sae = VLSAE(SAEConfig(d_in=6, n_concepts=6, k=1)).eval()
    with torch.no_grad():
        sae.encoder.copy_(torch.eye(6))
    vision = torch.eye(6)[[0, 0, 1, 2, 2, 2]]  # concepts 0, 1, 2 (1 on a sixth of rows)
    text = torch.eye(6)[[2, 3, 0, 0]]  # concepts 0, 2, 3
    counts = firing_counts(sae, [{"vision": vision, "text": text}])
    assert counts[:, -1].tolist() == [6, 4]
    freq = counts[:, :-1] / counts[:, -1:]
    assert shared_concepts(freq[0], freq[1], 0.1) == [0, 2]
    assert shared_concepts(freq[0], freq[1], 0.3) == [0]


def test_aux_k_sends_gradient_to_dead_concepts():
    torch.manual_seed(0)
    sae = VLSAE(SAEConfig(d_in=8, n_concepts=16, k=2))
    x = torch.randn(4, 8)
    dead = torch.ones(16, dtype=torch.bool)
    dead[sae.encode_topk(x).indices.unique()] = False  # in no row's top-k: 8 or more dead
    grads = {}
    for k_aux in (0, 4):
        sae.zero_grad()
        objective = SAEObjective(sae, k_aux, 1 / 32)
        objective.dead = dead
        loss, parts = objective(x, x)
        loss.backward()
        grads[k_aux] = float(sae.encoder.grad[dead].abs().sum())
        assert ("aux_k" in parts) == (k_aux > 0)
    assert grads[0] == 0 and grads[4] > 0


# --- resume, early stopping, refusals -----------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "kill_at", "architecture"),
    [("align", 13, "vl-sae"), ("sae", 11, "vl-sae"), ("sae", 11, "matryoshka")],
)
def test_resume_after_kill_equals_uninterrupted(
    small_store, tmp_path, monkeypatch, stage, kill_at, architecture
):
    """Killed mid-epoch (stage 1 or 2), resumed from the step-10 checkpoint: the same weights
    (Matryoshka: its threshold too, updated from step 3 on) and metrics as a run that was never
    interrupted."""
    settings = dict(checkpoint_every=5, architecture=architecture)
    if architecture == "vl-sae":
        settings["align"] = {"epochs": 3, "batch_size": 32, "lr": 1e-3}
    else:
        settings["threshold_start"] = 3
    whole = train(small_config(small_store, tmp_path / "whole", **settings))

    from vlsae_guard.pipeline import train as train_module

    objective = train_module.AlignObjective if stage == "align" else train_module.SAEObjective
    original, calls = objective.forward, []

    def dying(self, *rows):
        calls.append(1)
        if len(calls) == kill_at:  # after the checkpoint of step 10
            raise KeyboardInterrupt
        return original(self, *rows)

    monkeypatch.setattr(objective, "forward", dying)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(small_store, tmp_path / "cut", **settings))
    monkeypatch.setattr(objective, "forward", original)
    state = torch.load(tmp_path / "cut" / STATE, weights_only=True)
    assert state["stage"] == stage and state["progress"]["global_step"] == 10
    assert state["progress"]["step"] > 0  # within an epoch
    resumed = train(small_config(small_store, tmp_path / "cut", **settings))
    for name, tensor in whole.sae.state_dict().items():
        assert torch.equal(tensor, resumed.sae.state_dict()[name]), name
    if architecture == "matryoshka":
        assert state["model"]["sae.threshold"] > 0 and resumed.sae.threshold > 0
    drop = ("steps_per_second",)
    strip = [{k: v for k, v in h.items() if k not in drop} for h in whole.history]
    assert strip == [{k: v for k, v in h.items() if k not in drop} for h in resumed.history]
    again = train(small_config(small_store, tmp_path / "cut", **settings))  # done: no-op
    assert again.sae.config == resumed.sae.config


def test_resume_refuses_other_settings(small_store, tmp_path):
    train(small_config(small_store, tmp_path / "a", epochs=1))
    with pytest.raises(TrainError) as e:
        train(small_config(small_store, tmp_path / "a", epochs=1, k=4))
    assert "k: was 3, now 4" in str(e.value)
    train(small_config(small_store, tmp_path / "a", epochs=1, progress=True, device="cpu"))
    # A state written before a setting existed resumes when the setting is at its default.
    state = torch.load(tmp_path / "a" / STATE, weights_only=True)
    del state["settings"]["threshold_beta"], state["settings"]["group_fractions"]
    torch.save(state, tmp_path / "a" / STATE)
    train(small_config(small_store, tmp_path / "a", epochs=1))
    with pytest.raises(TrainError, match="threshold_start: was 1000, now 5"):
        train(
            small_config(
                small_store, tmp_path / "a", architecture="batchtopk", epochs=1, threshold_start=5
            )
        )
    (tmp_path / "b").mkdir()
    (tmp_path / "b/notes.txt").write_text("mine")
    with pytest.raises(TrainError, match="not empty"):
        train(small_config(small_store, tmp_path / "b"))


def test_early_stopping_and_best_checkpoint(small_store, tmp_path):
    """With a learning rate too small to change a float32 weight, validation never improves."""
    result = train(small_config(small_store, tmp_path / "s", lr=1e-20, epochs=10, patience=2))
    assert len(result.history) == 3 and result.sae.config.stats["epoch"] == 1


def test_refusals(tmp_path):
    projector = write_store(tmp_path / "p", torch.randn(8, 4), torch.randn(8, 4), site="projector")
    with pytest.raises(TrainError, match="at the projector site both already share"):
        train(small_config(projector, tmp_path / "o", align={}))
    unequal = write_store(tmp_path / "u", torch.randn(8, 4), torch.randn(8, 6))
    with pytest.raises(TrainError, match="enable stage 1"):
        train(small_config(unequal, tmp_path / "o"))
    narrow = write_store(tmp_path / "n", torch.randn(8, 2), torch.randn(8, 2))
    with pytest.raises(TrainError, match=r"k \(3\) must be <= the number of concepts \(2\)"):
        train(small_config(narrow, tmp_path / "o", n_concepts=None, expansion=1))


def test_token_rows_and_cycling(tmp_path):
    """Several vision rows per pair (token pooling): the text side cycles, overlap uses pair
    means, and the split never separates an image's rows."""
    planted = make_pairs(n_pairs=96, d_vision=16, d_text=16, d_latent=8, n_atoms=8)
    vision = planted.vision.repeat_interleave(5, 0) + 0.01 * torch.randn(480, 16)
    store = write_store(tmp_path / "s", vision, planted.text, pairs_per_shard=32, rows_per_pair=5)
    result = train(small_config(store, tmp_path / "o", n_concepts=16, k=2, epochs=2))
    record = json.loads((tmp_path / "o/training.json").read_text())
    train_split, val_split = record["split"]["train"], record["split"]["val"]
    assert train_split["vision"] == 5 * train_split["pairs"] == 5 * train_split["text"]
    assert val_split["pairs"] == round(0.2 * 96) and train_split["pairs"] + val_split["pairs"] == 96
    assert 0 <= result.sae.config.stats["cross_modal_overlap"] <= 1


# --- DDP ----------------------------------------------------------------------------------------


_DDP_SCRIPT = """
import json, os, sys, torch
from vlsae_guard.pipeline.train import Trainer, TrainConfig, train

torch.set_num_threads(1)
seen, final = [], {}
rows, fit = Trainer._row_batches, Trainer._fit

def spy_rows(self, *args):
    for batch in rows(self, *args):
        seen.append([x[:, 0].tolist() for x in batch])
        yield batch

def spy_fit(self, stage, objective, *args, **kwargs):
    fit(self, stage, objective, *args, **kwargs)
    final.update({k: v.tolist() for k, v in objective.state_dict().items()})

Trainer._row_batches, Trainer._fit = spy_rows, spy_fit
if len(sys.argv) > 3:  # first, collection by both ranks into one store
    from vlsae_guard.pipeline.collect import CollectConfig, collect
    collect(CollectConfig.model_validate_json(sys.argv[3]))
train(TrainConfig.model_validate_json(sys.argv[1]))
rank = os.environ.get("RANK", "single")
with open(os.path.join(sys.argv[2], f"rank-{rank}.json"), "w") as f:
    json.dump({"seen": seen, "final": final}, f)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, config: str, *collect: str) -> tuple[Path, Path]:
    """_DDP_SCRIPT under torchrun, 2 CPU processes on gloo; (the script, the ranks' logs)."""
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", str(_free_port()), str(script), config, str(logs), *collect]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return script, logs


@pytest.mark.slow
def test_torchrun_two_processes_match_one(
    small_store, tmp_path, monkeypatch, tiny_hf_dir, hf_model_and_processor, caption_pairs
):
    """torchrun, 2 CPU processes on gloo. Training: each rank takes half of every global batch
    (disjoint halves that together are the single-process batch); both end with the same
    weights, close to the single-process run's. Collection: the ranks' shards make the same
    store as one process."""

    def config(out: Path) -> str:
        return small_config(small_store, out, epochs=2).model_dump_json()

    def collect_config(out: Path) -> CollectConfig:
        data = {"format": "jsonl", "path": caption_pairs}
        settings = dict(site="layer:1", batch_size=2, pairs_per_shard=3, progress=False)
        return CollectConfig(model=str(tiny_hf_dir), out=out, data=data, **settings)

    script, logs = _torchrun(
        tmp_path, config(tmp_path / "ddp"), collect_config(tmp_path / "store2").model_dump_json()
    )
    # The same script in this process, one rank (the spies it installs are undone afterwards).
    for name in ("_row_batches", "_fit"):
        monkeypatch.setattr(Trainer, name, getattr(Trainer, name))
    monkeypatch.setattr(sys, "argv", ["ddp.py", config(tmp_path / "single"), str(logs)])
    runpy.run_path(str(script), run_name="__main__")
    single, r0, r1 = (json.loads((logs / f"rank-{n}.json").read_text()) for n in ("single", 0, 1))
    assert r0["final"] == r1["final"]
    assert len(r0["seen"]) == len(r1["seen"]) == len(single["seen"]) > 0
    for whole, a, b in zip(single["seen"], r0["seen"], r1["seen"], strict=True):
        for m in range(len(whole)):
            assert len(a[m]) == len(b[m]) == len(whole[m]) // 2
            assert sorted(a[m] + b[m]) == sorted(whole[m]) and not set(a[m]) & set(b[m])
    for name, values in single["final"].items():
        torch.testing.assert_close(
            torch.tensor(r0["final"][name]), torch.tensor(values), atol=1e-4, rtol=1e-3
        )
    assert (tmp_path / "ddp/config.json").exists()
    assert json.loads((tmp_path / "ddp/training.json").read_text())["world_size"] == 2

    model, processor = hf_model_and_processor
    collect(collect_config(tmp_path / "store1"), model=model, inputs=HFInputs(processor))
    one, two = ActivationStore(tmp_path / "store1"), ActivationStore(tmp_path / "store2")
    assert one.manifest.counts == two.manifest.counts and len(two.shards) == 4
    for position in range(4):
        for name, tensor in one.load(position).items():
            torch.testing.assert_close(two.load(position)[name], tensor, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_torchrun_batchtopk_ranks_share_the_threshold(small_store, tmp_path):
    """BatchTopK under torchrun: each rank reads vision rows only, and all end with the same
    weights and threshold (from the smallest activation kept on any rank)."""
    config = small_config(
        small_store, tmp_path / "ddp", epochs=2, architecture="batchtopk", threshold_start=2
    )
    _, logs = _torchrun(tmp_path, config.model_dump_json())
    r0, r1 = (json.loads((logs / f"rank-{n}.json").read_text()) for n in (0, 1))
    assert r0["final"] == r1["final"] and r0["final"]["sae.threshold"] > 0
    assert {len(batch) for batch in r0["seen"]} == {1}
    assert load(tmp_path / "ddp").threshold > 0


# --- end to end -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def caption_pairs(tmp_path_factory) -> Path:
    from vlsae_guard.lab.demo import make_scenes

    root = tmp_path_factory.mktemp("scenes")
    lines = []
    for i, scene in enumerate(make_scenes(12, seed=0)):
        scene.image.save(root / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": scene.caption}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "pairs.jsonl"


def test_collect_train_guard_projector(
    tiny_hf_dir, hf_model_and_processor, caption_pairs, tmp_path, capsys
):
    store, out = tmp_path / "store", tmp_path / "sae"
    common = ["--no-progress"]
    assert (
        main(
            ["collect", "--model", str(tiny_hf_dir), "--jsonl", str(caption_pairs)]
            + ["--out", str(store), "--batch-size", "4", "--pairs-per-shard", "5", *common]
        )
        == 0
    )
    config = tmp_path / "train.yaml"
    config.write_text("n_concepts: 128\nk: 8\nepochs: 3\nbatch_size: 64\nlr: 0.001\n")
    argv = ["train", "--config", str(config), "--store", str(store), "--out", str(out)]
    assert main([*argv, "--epochs", "4", *common]) == 0
    printed = capsys.readouterr().out
    assert "best epoch" in printed and "shared" in printed
    record = json.loads((out / "training.json").read_text())
    assert record["config"]["epochs"] == 4 and len(record["history"]) == 4  # flag over file

    model, processor = hf_model_and_processor
    sae = load(out)
    assert sae.config.source.site == "projector" and sae.config.shared_concepts
    image = Image.open(caption_pairs.parent / "0.png").convert("RGB")
    inputs = processor(
        images=[image], text=["USER: <image>\nIs there a circle? ASSISTANT:"], return_tensors="pt"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "the SAE checkpoint has no shared-concept set"
        with guard(model, out, alpha=1.0) as handle, torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert handle.stats.calls == 1 and handle.stats.image_tokens == 49


def test_collect_train_guard_paper_mode(
    tiny_hf_dir, hf_model_and_processor, caption_pairs, tmp_path
):
    model, processor = hf_model_and_processor
    store = tmp_path / "store"
    collect(
        CollectConfig(
            model=str(tiny_hf_dir),
            out=store,
            data={"format": "jsonl", "path": caption_pairs},
            site="layer:1",
            pooling="mean",
            progress=False,
        ),
        model=model,
        inputs=HFInputs(processor),
    )
    config = small_config(
        store,
        tmp_path / "sae",
        n_concepts=64,
        k=4,
        batch_size=4,
        val_fraction=0.25,
        align={"d_proj": 32, "epochs": 2, "batch_size": 4, "lr": 1e-3},
    )
    sae = train(config).sae
    assert sae.config.aux.d_proj == sae.config.d_in == 32
    source = sae.config.source
    assert (source.site, source.layer, source.point, source.place) == (
        "layer", 1, "input", "layer:1"
    )  # fmt: skip
    image = Image.open(caption_pairs.parent / "1.png").convert("RGB")
    inputs = processor(
        images=[image], text=["USER: <image>\nDescribe. ASSISTANT:"], return_tensors="pt"
    )
    with guard(model, tmp_path / "sae", mode="paper", layer=1) as handle:
        handle.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert handle.stats.calls > 0


def test_cli_train_errors_name_file_and_field(small_store, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("k: 0\nepochs: 2\nlearning_rate: 0.1\n")
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--store",
                str(small_store),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"invalid settings ({config}" in err
    assert "field k: Input should be greater than or equal to 1 (found 0)" in err
    assert "field learning_rate: Extra inputs are not permitted" in err
    assert (
        main(
            [
                "train",
                "--store",
                str(tmp_path / "nowhere"),
                "--out",
                str(tmp_path / "o"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "manifest.json: missing" in capsys.readouterr().err
