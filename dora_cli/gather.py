"""A run's trainable state across processes: gathered whole for a checkpoint, put back into each
process's share on resume.

    DDP / one process   every process holds whole tensors
    FSDP (FSDP2)        parameters and their optimizer state are DTensors, sharded along dim 0
    DeepSpeed ZeRO 1-3  fp32 master weights and optimizer state are partitioned; under ZeRO-3 the
                        module's own parameters too

A checkpoint is therefore the same files under every strategy and number of processes: the adapter in
PEFT's layout (or a whole model) and the optimizer state keyed by parameter name. A run resumes under
another number of processes (the data order is a function of the step), or another strategy.

Every function taking `acc` is collective: all processes call it, in the same order.
"""

from __future__ import annotations

import torch
from torch import nn

from dora_cli.errors import UserError


def _is_dtensor(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _is_deepspeed(tensor) -> bool:
    return hasattr(tensor, "ds_id") or hasattr(tensor, "_hp_mapping")


def global_shape(tensor) -> torch.Size:
    """The shape of the whole tensor (ZeRO-3 keeps only a flat partition in the module)."""
    return getattr(tensor, "ds_shape", None) or tensor.shape


# ---- whole tensors ---------------------------------------------------------------------------------------
@torch.no_grad()
def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a live parameter or buffer, on the CPU (collective for sharded ones). DeepSpeed
    gives its fp32 master weights, the ones the optimizer updates."""
    if _is_dtensor(tensor):
        tensor = tensor.full_tensor()
    elif _is_deepspeed(tensor):
        from deepspeed.utils import safe_get_full_fp32_param

        value = safe_get_full_fp32_param(tensor) if tensor.requires_grad else None
        if value is None:  # a frozen parameter: ZeRO-3 gathers the module's own copy
            import deepspeed

            with deepspeed.zero.GatheredParameters([tensor]):
                value = tensor.detach().clone()
        tensor = value
    return tensor.detach().to("cpu", copy=True).contiguous()


@torch.no_grad()
def put(live: torch.Tensor, value: torch.Tensor) -> None:
    """Write a whole value into a live parameter or buffer; each process keeps its own share."""
    if _is_dtensor(live):
        from torch.distributed.tensor import distribute_tensor

        shard = distribute_tensor(value.to(live.device, live.dtype), live.device_mesh, live.placements, src_data_rank=None)
        live.to_local().copy_(shard.to_local())
    elif _is_deepspeed(live):
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        with deepspeed.zero.GatheredParameters([live], modifier_rank=0):  # ZeRO-3: rank 0's value is partitioned
            live.data.copy_(value.to(live.device, live.dtype).reshape(live.data.shape))
        if live.requires_grad:
            safe_set_full_fp32_param(live, value.to(live.device, torch.float32))
    else:
        live.copy_(value.to(live.device, live.dtype))


def gather_all(live: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """name -> whole CPU value of every live tensor (collective; every process gets them)."""
    return {name: whole(tensor) for name, tensor in live.items()}


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> live tensor of every entry of the model's state dict, parameters as Parameter objects
    (so that sharded ones can be gathered); tied parameters once, under their first name."""
    keys = set(model.state_dict())
    live = {name: p for name, p in model.named_parameters() if name in keys}
    live.update({name: b for name, b in model.named_buffers() if name in keys})
    return live


# ---- the optimizer state ----------------------------------------------------------------------------------
def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> trainable parameter of the unwrapped model, in the optimizer's order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def optimizer_state(model: nn.Module, optimizer) -> dict:
    """{"state": {parameter name: {key: whole tensor}}} of an Accelerate-prepared optimizer (collective)."""
    inner = optimizer.optimizer
    if _is_zero(inner):
        return {"state": _zero_state(model, inner)}
    state = {}
    for name, p in trainable(model).items():
        saved = inner.state.get(p)
        if saved:
            state[name] = {key: whole(v) if torch.is_tensor(v) and v.dim() > 0 else _plain(v) for key, v in saved.items()}
    return {"state": state}


def load_optimizer_state(model: nn.Module, optimizer, saved: dict, where) -> None:
    """Put a saved optimizer state (by parameter name, whole tensors) into each process's optimizer."""
    params = trainable(model)
    state = saved.get("state", {})
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise UserError(f"{where}: the optimizer state does not fit this run: {unknown[0]} is no trainable parameter")
    inner = optimizer.optimizer
    if _is_zero(inner):
        _load_zero_state(params, inner, state)
        return
    on_device = {id(q) for group in inner.param_groups if group.get("fused") or group.get("capturable") for q in group["params"]}
    for name, p in params.items():
        if name in state:
            inner.state[p] = {key: _like(p, v, id(p) in on_device) for key, v in state[name].items()}


def _local_device(p) -> torch.device:
    return p.to_local().device if _is_dtensor(p) else p.device


def _local_numel(tensor) -> int:
    if _is_dtensor(tensor):
        return tensor.to_local().numel()
    if hasattr(tensor, "ds_tensor"):  # ZeRO-3: this process's partition
        return tensor.ds_tensor.numel()
    return tensor.numel()


def weight_share(model: nn.Module) -> float:
    """The fraction of the model's parameters (frozen and quantized ones too) this process holds."""
    params = list(model.parameters())
    return sum(_local_numel(p) for p in params) / max(1, sum(global_shape(p).numel() for p in params))


def optimizer_share(model: nn.Module, optimizer) -> float:
    """The fraction of the optimizer state this process holds: 1 unless FSDP or ZeRO shard it."""
    params = list(trainable(model).values())
    total = sum(global_shape(p).numel() for p in params)
    inner = optimizer.optimizer
    if _is_zero(inner):
        local = sum(flat.numel() for flat in _flat_partitions(inner))
    else:
        local = sum(_local_numel(p) for p in params)
    return local / max(1, total)


def by_name(saved: dict, model: nn.Module) -> dict:
    """An optimizer state saved by `torch.optim.Optimizer.state_dict()` (indices, one process: checkpoints
    written before states were keyed by name) in the by-name form."""
    state = saved.get("state", {})
    if not state or all(isinstance(key, str) for key in state):
        return saved
    names = list(trainable(model))
    return {"state": {names[int(i)]: value for i, value in state.items()}}


def _plain(value):
    return value.clone() if torch.is_tensor(value) else value


def _like(p: torch.Tensor, value, scalars_on_device: bool = False):
    """A saved optimizer-state value as this process holds it beside parameter `p`. AdamW's step stays a
    CPU scalar, except for a fused or capturable optimizer, whose kernels take it on p's device (as
    torch's own load_state_dict places it)."""
    if torch.is_tensor(value) and value.dim() == 0 and scalars_on_device:
        return value.to(_local_device(p), copy=True)
    if not torch.is_tensor(value) or value.dim() == 0:
        return _plain(value)
    if _is_dtensor(p):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
    return value.to(p.device, p.dtype, copy=True)


# ---- DeepSpeed ZeRO ------------------------------------------------------------------------------------------
def _is_zero(optimizer) -> bool:
    return hasattr(optimizer, "single_partition_of_fp32_groups") or hasattr(optimizer, "fp32_partitioned_groups_flat")


def _flat_partitions(zero) -> list[torch.Tensor]:
    """The fp32 partitions the wrapped optimizer (AdamW, or DeepSpeed's CPU Adam) steps."""
    flats = getattr(zero, "fp32_partitioned_groups_flat", None)
    return list(flats) if flats is not None else list(zero.single_partition_of_fp32_groups)


def _zero_state(model: nn.Module, zero) -> dict:
    from deepspeed.utils import safe_get_full_optimizer_state

    base, flats = zero.optimizer, _flat_partitions(zero)
    first = base.state.get(flats[0]) if flats else None
    if not first:
        return {}
    keys = [key for key, value in first.items() if torch.is_tensor(value) and value.dim() > 0]
    step = first.get("step")
    state = {}
    for name, p in trainable(model).items():
        state[name] = {key: safe_get_full_optimizer_state(p, key).detach().to("cpu", copy=True) for key in keys}
        state[name]["step"] = torch.tensor(float(step))
    return state


def _load_zero_state(params: dict[str, nn.Parameter], zero, state: dict) -> None:
    """Create the wrapped optimizer's state on every fp32 partition (it exists only after a first step),
    link DeepSpeed's per-parameter views to it, then write each parameter's share."""
    from deepspeed.utils import safe_set_full_optimizer_state

    if not state:
        return
    first = next(iter(state.values()))
    keys = [key for key in first if key != "step"]
    step = float(first["step"])
    base = zero.optimizer
    as_int = type(base).__name__ == "DeepSpeedCPUAdam"  # counts steps in a Python int
    for flat in _flat_partitions(zero):
        base.state[flat] = {"step": int(step) if as_int else torch.tensor(step), **{key: torch.zeros_like(flat) for key in keys}}
    link = getattr(zero, "_lazy_init_hp_params_optimizer_state", None)  # ZeRO 1/2
    if link is not None:
        link()
    for name, p in params.items():
        for key in keys:
            safe_set_full_optimizer_state(p, state[name][key], key)
