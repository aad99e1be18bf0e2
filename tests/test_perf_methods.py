"""benchmarks/perf_methods.py on a tiny LLaVA: every method runs, at the forced length, and the
results file records what decides the numbers (so the script cannot rot unnoticed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from vlsae_guard import methods

ROOT = Path(__file__).resolve().parents[1]
# 4 text layers: pai amplifies layers 2 and up by default
TINY = ["--image-size", "28", "--patch-size", "4", "--text-hidden", "64", "--text-layers", "4"]


def test_every_method_is_measured_at_each_length(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # its sibling imports
    spec = importlib.util.spec_from_file_location(
        "perf_methods", ROOT / "benchmarks/perf_methods.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # glibc's mmap threshold stays pinned for the rest of a process: not in the test suite's
    monkeypatch.setattr(bench, "pin_glibc_mmap_threshold", lambda: False)
    out = tmp_path / "perf.json"
    argv = [*TINY, "--concepts", "128", "--k", "8", "--new-tokens", "2", "3", "--batch-size", "2"]
    assert bench.main([*argv, "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0

    record = json.loads(out.read_text())
    assert record["errors"] == {}
    measured = set(methods.METHODS) - bench.NEEDS_OBJECT_MAP
    assert set(record["settings"]) == measured - {"none"}
    assert record["settings"]["paper"]["layer"] == 2  # text layers // 2
    rows = {(r["method"], r["new_tokens"]) for r in record["results"]}
    assert rows == {(m, n) for m in [*measured, "engine"] for n in (2, 3)}
    for r in record["results"]:
        assert r["seconds"] > 0 and r["ratio"] > 0
        if r["method"] in ("none", "engine"):  # the engine decodes plainly: the same tokens
            assert r["same_tokens_as_none"] and r["goal"] is None
        if methods.METHODS.get(r["method"]) and methods.METHODS[r["method"]].arms == 2:
            assert r["goal"] in (2.1, 2.2)
    assert record["batch_size"] == 2 and record["new_tokens"] == [2, 3]
    assert {"environment", "git_commit", "memory", "model", "sae"} <= set(record)
    assert "| engine | 1 | 3 |" in capsys.readouterr().out
