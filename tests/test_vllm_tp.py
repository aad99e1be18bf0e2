"""Tensor parallelism (2 CPU workers): every rank guards the same rows into the same bytes."""

from __future__ import annotations

import os

import pytest

from vlsae_guard.lab import tiny

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

from vlsae_guard.serving.client import generate_offline, load_llm  # noqa: E402
from vlsae_guard.serving.settings import ServeSettings  # noqa: E402

IMAGES = tiny.make_images(4, seed=30)
FLAGS = [True, False, False, True]
CORES = sorted(os.sched_getaffinity(0))


@pytest.mark.skipif(len(CORES) < 2, reason="tensor parallelism needs two CPU cores")
def test_two_ranks_compute_the_same_guarded_features(tiny_hf_dir, tmp_path, monkeypatch, vllm_case):
    # vLLM binds each CPU worker to cores; with one NUMA node the binding must be given.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{CORES[0]}|{CORES[1]}")
    for key in [k for k in os.environ if k.startswith("VLSAE_GUARD_")]:
        monkeypatch.delenv(key)
    log = tmp_path / "guard.jsonl"
    reference = vllm_case.hf_reference(tiny_hf_dir, IMAGES)
    settings = ServeSettings(sae=str(vllm_case.sae_dir), guard={"alpha": vllm_case.alpha}, log=log)
    llm = load_llm(str(tiny_hf_dir), settings, **vllm_case.engine, tensor_parallel_size=2)
    try:
        prompts = [vllm_case.prompt] * len(IMAGES)
        answers = generate_offline(llm, IMAGES, prompts, guard=FLAGS, max_tokens=vllm_case.steps)
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert [a.token_ids for a in answers] == [reference[on][i] for i, on in enumerate(FLAGS)]
    records = vllm_case.read_log(log)
    by_rank = {r: [x for x in records if x["rank"] == r] for r in (0, 1)}
    assert by_rank[0] and len(by_rank[0]) == len(by_rank[1]) == len(records) // 2
    assert len({x["pid"] for x in by_rank[0]} | {x["pid"] for x in by_rank[1]}) == 2
    for first, second in zip(by_rank[0], by_rank[1], strict=True):
        assert {k: v for k, v in first.items() if k not in ("pid", "rank")} == {
            k: v for k, v in second.items() if k not in ("pid", "rank")
        }
    assert any(0 < x["guarded_tokens"] < x["tokens"] for x in by_rank[0])  # a mixed batch
