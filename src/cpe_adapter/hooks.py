"""The hooks of accelerate and diffusers that a wrapped projection must carry, and where adapters live.

Wrapping a ``to_k``/``to_v`` projection replaces a module that may carry an accelerate offload
hook (``enable_sequential_cpu_offload``) or a diffusers layerwise-casting hook
(``enable_layerwise_casting``); the wrapper must carry the same one, and so must the projection
put back on unload, or weights stay on ``meta`` or in a storage dtype. :func:`adapter_placement`
says which device and dtype an adapter for such a model takes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["adapter_placement", "align_hooks", "carry_cast_hook", "carry_offload_hook", "cast_hook"]


def align_hooks(hook: Any) -> list[Any]:
    """The accelerate hooks inside ``hook`` (a ``SequentialHook`` chains several)."""
    return list(getattr(hook, "hooks", None) or [hook])


def carry_offload_hook(source: nn.Module, target: nn.Module) -> None:
    """Make ``target`` carry exactly the accelerate hook of ``source`` (none if it has none).

    With ``enable_sequential_cpu_offload`` (accelerate's ``cpu_offload``) every module with its own
    parameters keeps them on the ``meta`` device outside its forward; an ``AlignDevicesHook`` on that
    module loads them from a CPU copy, keyed by the module's parameter names, just before its forward
    and drops them after it. A wrapper that takes the place of such a layer (same parameter names)
    must carry the same hook, and the layer put back on unload must carry the hook the wrapper had
    (offload may have been enabled, or re-enabled, while the wrapper was in place). The hook's
    ``original_devices`` (where ``remove_hook_from_module`` puts the weights back) are kept: the
    hook's ``init_hook`` would otherwise record ``meta`` for the already offloaded weights.
    """
    hook = getattr(source, "_hf_hook", None)
    current = getattr(target, "_hf_hook", None)
    if current is hook:
        return
    if current is not None or hasattr(target, "_old_forward"):
        from accelerate.hooks import remove_hook_from_module

        # A stale hook (say, from before the offload was re-enabled): its detach puts the weights of
        # its own CPU copy back on ``target``; the caller sets ``target``'s parameters afterwards.
        weight, bias = target.weight, target.bias
        remove_hook_from_module(target)
        target.weight, target.bias = weight, bias
    if hook is None:
        return
    from accelerate.hooks import add_hook_to_module

    devices = [(h, dict(h.original_devices)) for h in align_hooks(hook) if hasattr(h, "original_devices")]
    add_hook_to_module(target, hook)
    for h, original in devices:
        h.original_devices = original


def cast_hook(module: nn.Module) -> Any:
    """diffusers' layerwise-casting hook of ``module`` (``enable_layerwise_casting``), or None."""
    registry = module.__dict__.get("_diffusers_hook")
    return None if registry is None else registry.get_hook("layerwise_casting")


def carry_cast_hook(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` the layerwise-casting hook ``source`` has (weights stored in a low-precision
    dtype, cast to the compute dtype around each forward), so the layer that takes ``source``'s place
    computes in the same dtype. diffusers cannot remove such a hook, so one ``target`` has stays."""
    hook = cast_hook(source)
    if hook is None or cast_hook(target) is not None:
        return
    from diffusers.hooks.layerwise_casting import apply_layerwise_casting_hook

    apply_layerwise_casting_hook(target, hook.storage_dtype, hook.compute_dtype, hook.non_blocking)


def adapter_placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype an adapter for ``module`` should live on.

    Under accelerate's sequential CPU offload the module's parameters sit on the ``meta`` device
    between forwards; the adapter then stays on the CPU and follows the loaded weights to the
    execution device at the first forward (``CPERuntime.residual``). Under diffusers' layerwise
    casting the weights are stored in a low-precision dtype and computed in another: the adapter
    takes the compute dtype (it is never stored rounded to, say, float8).
    """
    reference = next(module.parameters())
    device = reference.device
    if device.type == "meta":
        device = next((p.device for p in module.parameters() if p.device.type != "meta"), torch.device("cpu"))
    cast = next((hook for m in module.modules() if (hook := cast_hook(m)) is not None), None)
    return device, reference.dtype if cast is None else cast.compute_dtype
