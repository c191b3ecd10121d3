"""Scale-out and memory options applied to a plain model from the outside (model files never import
torch.distributed): process-group setup under `torchrun`, DDP wrapping, activation checkpointing."""
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
    """Wrap in DistributedDataParallel (gradients all-reduced during backward).

    Every trainable parameter must get a gradient in every step: freeze what the objective does not
    run first (`model.use_heads(*objective.heads)`, as the pretrain recipe does), and DDP leaves the
    frozen parameters out."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def apply_activation_checkpointing(model: nn.Module, every: int = 1) -> nn.Module:
    """Trade compute for memory: recompute the activations inside Transformer blocks during backward
    instead of keeping them from the forward pass (torchtitan's per-block activation checkpointing).

    The blocks are the entries of each `nn.ModuleList` whose entries are all of one class (GPT's
    `transformer.h`, BERT's `encoder.layer`); every `every`-th one (the first included) is wrapped in
    place with PyTorch's non-reentrant checkpoint wrapper, which keeps the parameter names of
    `state_dict()` unchanged and restores the RNG state for the recomputation, so dropout draws the same
    masks and the gradients equal those of the plain model. Apply it before `apply_ddp` (torch.compile
    is applied by the trainer, to the whole loss).

    Args:
        model: a plain lmforge model (GPT, Bert, ...), changed in place.
        every: checkpoint every n-th block (1: all; 2: half of them, less memory saved, less recompute).

    Returns:
        the same model.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper

    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)
             and len({type(b) for b in m}) == 1 and not isinstance(m[0], CheckpointWrapper)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of blocks to checkpoint")
    for blocks in lists:
        for i in range(0, len(blocks), every):
            blocks[i] = checkpoint_wrapper(blocks[i])
    return model
