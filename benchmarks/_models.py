"""Model sizes and helpers shared by the benchmark scripts (imported as a sibling: run them as
scripts)."""

from __future__ import annotations

import argparse
import ctypes
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def llava_shaped_sizes(args: argparse.Namespace) -> dict[str, int]:
    """``vlsae_guard.lab.tiny.build_hf_llava`` sizes from the common flags (head_dim 32)."""
    return dict(
        image_size=args.image_size,
        patch_size=args.patch_size,
        text_hidden=args.text_hidden,
        text_intermediate=4 * args.text_hidden,
        text_layers=args.text_layers,
        text_heads=args.text_hidden // 32,
    )


def random_sae(d_in: int, concepts: int, k: int, layer: int | None = None, seed: int = 0):
    """A random VL-SAE, every other concept shared, recording its site: the projector, or
    decoder ``layer`` (paper mode); seeded without touching torch's global generator."""
    from vlsae_guard import VLSAE, SAEConfig

    site = {"site": "projector"} if layer is None else {"site": "layer", "layer": layer}
    config = SAEConfig(
        d_in=d_in,
        n_concepts=concepts,
        k=k,
        shared_concepts=list(range(0, concepts, 2)),
        source=site,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VLSAE(config).eval()


class OneArm:
    """The decoding engine's arms with one stream (both arms are the same logits): with the
    fusion ``lambda a, b, step: a`` the engine decodes plainly, which isolates its own cost."""

    def __init__(self, stream):
        self.stream, self.prompt_ids = stream, stream.prompt_ids

    def prefill(self):
        logits = self.stream.prefill()
        return logits, logits

    def feed(self, tokens):
        logits = self.stream.feed(tokens)
        return logits, logits


def engine_generate(model, **kwargs):
    """``model.generate(**kwargs)`` through the fused decoding engine on one arm."""
    from vlsae_guard.backends import detect
    from vlsae_guard.decoding import Stream, fused_generate

    backend = detect(model)

    def arms(inputs, options):
        return OneArm(Stream(model, backend.prompt_inputs(inputs), use_cache=options.use_cache))

    return fused_generate(model, (), kwargs, arms, lambda a, b, step: a)


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def pin_glibc_mmap_threshold(size: int = 1 << 16) -> bool:
    """Make glibc serve every allocation of ``size`` bytes or more by its own mmap (returned to
    the OS when freed), so RSS follows live tensors; False where that is not possible."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(-3, size))  # M_MMAP_THRESHOLD


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int | None, int | None]:
    """``fn()``, its peak memory and the peak's rise above the memory in use before the call,
    in bytes. CUDA: ``torch.cuda.max_memory_allocated``. CPU: Linux's peak RSS (VmHWM, reset
    through ``/proc/self/clear_refs``, glibc's free memory trimmed first); None, None where
    /proc cannot do that."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return out, peak, peak - before
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)  # free heap memory kept from earlier calls leaves RSS: reuse counts
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status_kib("VmRSS")
    except OSError:
        return fn(), None, None
    out = fn()
    peak = _status_kib("VmHWM")
    return out, peak * 1024, (peak - before) * 1024


def git_commit(path: Path) -> str | None:
    """The checkout's commit, ``+dirty`` when tracked files differ from it; None outside git."""
    try:
        run = lambda *a: subprocess.run(  # noqa: E731
            ["git", *a], cwd=path, capture_output=True, text=True, check=True
        ).stdout.strip()
        commit = run("rev-parse", "HEAD")
        return commit + ("+dirty" if run("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.CalledProcessError):
        return None
