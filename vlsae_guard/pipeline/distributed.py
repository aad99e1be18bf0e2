"""The few ``torch.distributed`` calls collection and training need, as no-ops in one process.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1), :meth:`Dist.from_env` joins the process group:
NCCL when CUDA is available, gloo otherwise (CPU runs and tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False  # a process group is in use

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend=backend)
        return cls(
            rank=dist.get_rank(),
            world=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            active=True,
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> torch.device:
        """``auto``: this rank's GPU when there is one, else the CPU."""
        if requested == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda", self.local_rank)
            return torch.device("cpu")
        return torch.device(requested)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place; identity in one process."""
        if self.active:
            dist.all_reduce(tensor)
        return tensor

    def shutdown(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()
