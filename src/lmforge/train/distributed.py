"""Scale-out and speed-ups applied to a plain model from the outside (model files never import
torch.distributed): process-group setup under `torchrun`, DDP wrapping, torch.compile."""
from __future__ import annotations

import os

import torch
from torch import nn


def setup_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank). Under `torchrun` (WORLD_SIZE > 1) this initialises the
    process group: NCCL on CUDA, gloo on CPU. Alone, it is (0, 1, 0) and touches nothing."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), local_rank


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """Wrap in DistributedDataParallel (gradients all-reduced during backward)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def apply_compile(model: nn.Module, **kwargs) -> nn.Module:
    """torch.compile the model (Inductor: fused Triton kernels on CUDA, C++/OpenMP on CPU)."""
    return torch.compile(model, **kwargs)
