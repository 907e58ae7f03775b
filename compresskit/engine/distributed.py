"""Running under PyTorch's own launcher (torchrun): process group, rank-0 rules, replica checks.

Only rank 0 touches the run folder (reads caches, writes checkpoints, artifacts and reports), so
several machines need no shared filesystem: rank 0 broadcasts model weights, cache decisions and
resume state; DistributedDataParallel averages gradients. Outside torchrun every function here is
a cheap no-op, and nothing imports torch.distributed until a process group exists.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


_ALONE = False


@contextmanager
def alone() -> Iterator[None]:
    """Rank 0 working by itself on a stage the other ranks skip (export, benchmark, qat, ptq):
    training inside it must not wait for collectives the other ranks never join."""
    global _ALONE
    before, _ALONE = _ALONE, True
    try:
        yield
    finally:
        _ALONE = before


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return not _ALONE and int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    if not launched():
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world_size() -> int:
    return 1 if _ALONE else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def init(device_kind: str) -> Any:
    """Join the process group (nccl on GPUs, gloo on CPUs); return this rank's device."""
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if launched() and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def shutdown() -> None:
    if active():
        import torch.distributed as dist

        dist.destroy_process_group()


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (pickled between our own processes only)."""
    if not active():
        return obj
    import torch.distributed as dist

    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_module(model: nn.Module) -> None:
    """Make every rank's parameters and buffers equal to rank 0's."""
    if not active():
        return
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point() or t.dtype in (torch.int64, torch.int32, torch.bool):
                dist.broadcast(t.data, src=0)


def mean(value: float, device: torch.device) -> float:
    """The mean of a per-rank number over all ranks."""
    if not active():
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def replica_mismatch(model: nn.Module, device: torch.device) -> str | None:
    """None when every rank holds the same parameters, else which ranks differ."""
    if not active():
        return None
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
        mine = torch.stack([flat.sum(), (flat * weights).sum()]).to(device)
    gathered = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(gathered, mine)
    differ = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
    return f"ranks {differ} hold different parameters than rank 0" if differ else None
