"""Scale-out and memory options applied to a plain model from the outside (model files never import
torch.distributed): process-group setup under `torchrun`, DDP or FSDP2 wrapping, activation
checkpointing, and the few collectives the trainer needs (a global mean of logged values, full state
dicts for checkpoints).

Checkpoints hold full, unsharded tensors whatever wrote them: `model_state` / `optimizer_state` gather
them through `torch.distributed.checkpoint`'s state-dict helpers (the optimizer state keyed by parameter
name, not by position), and `load_state` hands them back, sharding them again where the model is
sharded. So a plain, a DDP and an FSDP2 run read each other's checkpoints, on any number of processes.
"""
from __future__ import annotations

import os
from typing import Any

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


def end_distributed(world_size: int) -> None:
    """The end of a recipe under torchrun: wait until every process is done (rank 0 writes the last
    checkpoint and plots after the others have finished training), then destroy the process group. A
    process that tore its group down while another was still at work died now and then with SIGABRT
    ("terminate called without an active exception") in gloo, and torchrun reported the job failed.
    LMFORGE_KEEP_PG keeps the group (tests that run several recipes in one pair of processes)."""
    if world_size <= 1:
        return
    import torch.distributed as dist

    dist.barrier()
    if os.environ.get("LMFORGE_KEEP_PG") is None:
        dist.destroy_process_group()


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """Wrap in DistributedDataParallel (gradients all-reduced during backward).

    Every trainable parameter must get a gradient in every step: freeze what the objective does not
    run first (`model.use_heads(*objective.heads)`, as the pretrain recipe does), and DDP leaves the
    frozen parameters out."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def apply_parallel(model: nn.Module, parallel: str, device: torch.device, world_size: int) -> nn.Module:
    """The trainer's parallelize step: DDP (`parallel='ddp'`) or FSDP2 (`'fsdp'`) across the processes of
    a torchrun job; a single process trains the plain model."""
    if world_size <= 1:
        return model
    if parallel == "fsdp":
        return apply_fsdp(model, device)
    return apply_ddp(model, device)


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The model's lists of Transformer blocks: each `nn.ModuleList` whose entries are all of one class
    (GPT's `transformer.h`, BERT's `encoder.layer`; blocks already wrapped for activation checkpointing
    count as their wrapper's class)."""
    return [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1]


def apply_fsdp(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard the model with FSDP2 (`torch.distributed.fsdp.fully_shard`) over all processes: each block
    of each list of blocks is its own unit (its parameters are gathered just before it runs and freed
    after), the rest (embeddings, final norm, heads) is the root unit. Parameters become DTensors sharded
    on dim 0; the parameter names stay the plain model's. Apply it after activation checkpointing and
    before the optimizer is built (the optimizer must hold the sharded parameters).

    Frozen parameters (heads an objective does not run) may sit in a unit with trained ones."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for blocks in block_lists(model):
        for block in blocks:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether the model's parameters are sharded across processes (FSDP2): then every process must
    take part in gathering its state and in each forward pass."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor for a possibly distributed one (e.g. the gradient norm of sharded gradients)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def global_mean(values: dict[str, torch.Tensor], world_size: int) -> dict[str, torch.Tensor]:
    """Each value averaged over all processes (one all-reduce for the lot). With the same number of
    examples in every process's slice and losses that are means over examples (or tokens, when every
    slice has as many), this is the loss of the whole global batch."""
    if world_size <= 1 or not values:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    packed = torch.stack([torch.as_tensor(values[k], dtype=torch.float32) for k in keys])
    dist.all_reduce(packed)
    return dict(zip(keys, packed / world_size))


def broadcast_object(obj: Any, world_size: int) -> Any:
    """Rank 0's `obj` on every process (a small picklable value: a path, a dict of numbers)."""
    if world_size <= 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _helper_view(model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """(the module to hand the state-dict helpers, {its state-dict name: the model's}).

    The helpers find each state-dict entry by walking attributes along its name, so a model whose state
    dict renames its entries (a TaskModel keeps its backbone's names without `backbone.`) is handed over
    as a plain container of its children, and the names are translated; other models go as they are."""
    if not model._state_dict_hooks:
        return model, {}
    if next(model.named_parameters(recurse=False), None) is not None or next(model.named_buffers(recurse=False), None) is not None:
        raise ValueError(f"{type(model).__name__} renames its state dict and holds tensors of its own")
    view = nn.Module()
    for name, child in model.named_children():
        view.add_module(name, child)
    # pair the names tensor by tensor, in order (a tied weight has several names in both)
    ours: dict[int, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        ours.setdefault(id(v), []).append(k)
    theirs: dict[int, list[str]] = {}
    for k, v in view.state_dict(keep_vars=True).items():
        theirs.setdefault(id(v), []).append(k)
    return view, {a: b for i, keys in theirs.items() for a, b in zip(keys, ours.get(i, []))}


def _rename_optimizer(state: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    if not state or not names:
        return state
    return {**state, "state": {names.get(k, k): v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [names.get(k, k) for k in g["params"]]} for g in state["param_groups"]]}


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of a plain or FSDP2 model on the CPU, under the names of the
    model's own `state_dict()` (those of model.safetensors). A collective for a sharded model (call it on
    every process); rank 0 gets the tensors, others {}."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    view, names = _helper_view(model)
    state = get_model_state_dict(view, options=_full_options(cpu_offload=True))
    return {names.get(k, k): v for k, v in state.items()}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state dict keyed by parameter name (`state[name]`, `param_groups[i]['params']`
    a list of names, the names of the model's state dict), on the CPU: the form every layout (plain, DDP,
    FSDP2) reads back. A collective for a sharded model; rank 0 gets it, others {}."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    view, names = _helper_view(model)
    return _rename_optimizer(get_optimizer_state_dict(view, optimizer, options=_full_options(cpu_offload=True)), names)


def name_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict keyed by position (what `optimizer.state_dict()` writes, and checkpoints
    written before names were used) re-keyed by parameter name, for the optimizer built the same way."""
    groups = state.get("param_groups", [])
    if not groups or all(isinstance(p, str) for g in groups for p in g["params"]):
        return state
    names: dict[int, str] = {}
    for key, value in model.state_dict(keep_vars=True).items():  # state-dict names (tied weights: the first)
        names.setdefault(id(value), key)
    ours = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    theirs = [p for g in groups for p in g["params"]]
    if len(ours) != len(theirs):
        from lmforge.errors import CheckpointError

        raise CheckpointError(f"the checkpoint's optimizer holds {len(theirs)} parameters, this model trains {len(ours)}")
    by_index = dict(zip(theirs, ours))
    return {"state": {by_index[i]: v for i, v in state.get("state", {}).items()},
            "param_groups": [{**g, "params": [by_index[i] for i in g["params"]]} for g in groups]}


def load_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, weights: dict[str, torch.Tensor],
               optim: dict[str, Any] | None, world_size: int) -> None:
    """Load full state dicts (as `model_state` / `optimizer_state` give them) into a plain, DDP-wrapped
    (pass the inner module) or FSDP2 model and its optimizer. With several processes only rank 0 needs
    them (others pass {}): they are broadcast, and each process keeps its shard."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    view, names = _helper_view(model)
    back = {v: k for k, v in names.items()}
    options = _full_options(broadcast_from_rank0=world_size > 1)
    set_model_state_dict(view, {back.get(k, k): v for k, v in weights.items()}, options=options)
    if optimizer is not None:
        set_optimizer_state_dict(view, optimizer, _rename_optimizer(optim or {}, back), options=options)


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
    lists = [m for m in block_lists(model) if not isinstance(m[0], CheckpointWrapper)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of blocks to checkpoint")
    for blocks in lists:
        for i in range(0, len(blocks), every):
            blocks[i] = checkpoint_wrapper(blocks[i])
    return model
