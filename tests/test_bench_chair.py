"""benchmarks/chair.py on the tiny model: captions per arm, CHAIR of both, paired intervals."""

from __future__ import annotations

import json

import pytest
import torch

from vlsae_guard import VLSAE, SAEConfig
from vlsae_guard.cli import bench_flags
from vlsae_guard.harness import chair as harness
from vlsae_guard.harness.config import ChairRunConfig
from vlsae_guard.scoring import chair
from vlsae_guard.scoring.files import DataError


@pytest.fixture(scope="module")
def coco(tmp_path_factory, tiny_images):
    """Three CHAIR images under their COCO val2014 names, and a VL-SAE."""
    root = tmp_path_factory.mktemp("chair-inputs")
    ids = chair.chair500_ids()[:3]
    (root / "val2014").mkdir()
    for i, image in zip(ids, tiny_images, strict=False):
        image.save(root / "val2014" / f"COCO_val2014_{i:012d}.jpg")
    torch.manual_seed(1)
    config = SAEConfig(d_in=64, n_concepts=256, k=16, shared_concepts=list(range(0, 256, 2)))
    VLSAE(config).eval().save_pretrained(root / "sae")
    return root, ids


def test_chair_ab_run(coco, tiny_hf_dir, tmp_path):
    root, ids = coco
    argv = [
        "--model", str(tiny_hf_dir), "--images", str(root / "val2014"), "--limit", "3",
        "--sae", str(root / "sae"), "--ab", "--vlsae-alpha", "1.0", "--batch-size", "2",
        "--max-new-tokens", "24", "--dtype", "float32", "--device", "cpu",
        "--bootstrap", "300", "--out", str(tmp_path),
    ]  # fmt: skip
    config = bench_flags.chair_config(bench_flags.chair_parser().parse_args(argv))
    results = harness.run(config, progress=False)
    harness.finish(results, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["settings"]["prompt"] == "Please describe this image in detail."
    assert saved["settings"]["decoding"]["max_new_tokens"] == 24
    assert saved["settings"]["ground_truth"]["kind"] == "shipped"
    gt = chair.shipped_ground_truth()
    for arm in ("none", "vlsae"):
        rows = [
            json.loads(line)
            for line in (tmp_path / "answers" / f"{arm}" / "chair500.jsonl")
            .read_text()
            .splitlines()
        ]
        assert [r["image_id"] for r in rows] == ids
        expected = chair.metrics(
            chair.score_captions([(r["image_id"], r["caption"]) for r in rows], gt)
        )
        empty = saved[arm].pop("empty")
        assert saved[arm] == pytest.approx(expected)
        assert empty == sum(not r["caption"].strip() for r in rows)
        details = (tmp_path / f"chair_details_{arm}.jsonl").read_text().splitlines()
        assert len(details) == 3
    comparison = saved["comparison"]
    for metric in chair.METRICS:
        lo, hi = comparison["ci_delta"][metric]
        assert lo <= comparison["delta"][metric] <= hi
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "CHAIR_i" in (tmp_path / "results.md").read_text()


def test_unknown_image_ids_fail_before_generation(coco, tiny_hf_dir, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("1\n2\n")  # not COCO 2014 image ids
    config = ChairRunConfig(model=tiny_hf_dir, image_ids=ids, out=tmp_path)
    with pytest.raises(DataError, match="2 image ids have no ground truth"):
        harness.run(config, progress=False)
