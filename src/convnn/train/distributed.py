"""Process-group setup for ``torchrun`` (NCCL on GPUs, gloo on CPU) and small collectives.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything here is a cheap no-op,
so the same training code runs in one process or many.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cleanup",
    "exit_now",
    "init_distributed",
    "joined_process_group",
    "resolve_device",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes files and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> the local CUDA device when there is one, else CPU; ``cuda`` -> the local
    rank's GPU. Anything but auto, cpu, cuda or an existing cuda:N is a ValueError."""
    expected = "train.device must be auto, cpu, cuda or cuda:N"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{expected}, got {name!r}") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index is not None):
        raise ValueError(f"{expected}, got {name!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"train.device is {name!r} but no CUDA device is available; use cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank % count)
        elif device.index >= count:
            raise ValueError(
                f"train.device must be cuda:0 to cuda:{count - 1} on this machine, got {name!r}"
            )
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's environment variables, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        global _joined
        _joined = True
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


# Set once this process has joined a process group; see exit_now.
_joined = False


def joined_process_group() -> bool:
    """Whether this process joined a process group at any time (even if it left it since)."""
    return _joined


def exit_now(code: int) -> NoReturn:
    """Flush stdout/stderr and end the process with ``code``, skipping interpreter finalization.

    Once DDP has run on gloo, gloo's worker threads outlive ``destroy_process_group()``. One of
    them may drop the last reference to a tensor that holds a Python object while the main
    thread is inside ``Py_FinalizeEx``; it then needs the GIL, Python ends that thread with
    ``pthread_exit``, and the forced unwind through C++ ``noexcept`` frames calls
    ``std::terminate``: the rank dies with SIGABRT after the work is done. Every file the
    library writes is closed (and fsynced) before this point, so skipping finalization loses
    nothing but the crash.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be written
            pass
    os._exit(code)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a list of numbers over all processes (float64, so counts stay exact)."""
    if not _active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
