"""ControlNets that follow a UNet's erasure.

A ControlNet made from the UNet (``ControlNetModel.from_unet``) carries copies of its
cross-attention layers and reads the same prompt embedding, so a concept the UNet no longer sees
would come back through the ControlNet's residuals. Each ControlNet next to a UNet with CPE
adapters therefore gets a *companion* runtime: the UNet's adapters restricted to the ControlNet's
layers, following the UNet's active set, scales and switch.

ControlNets are found by every ``*_cpe_adapter*`` call that switches erasure on or changes it
(load, set, enable, unload), in the pipeline it is called on and in every other pipeline one of
those calls has seen holding the same UNet, and, for a ``MultiControlNetModel``, when its
``nets`` list was edited in place (a forward pre-hook on it checks its nets before each call).
Nothing of diffusers is patched, so a ControlNet can also arrive unseen (``from_pipe``, a new
pipeline built from ``pipe.components``, ``pipe.controlnet = ...``): the UNet then refuses its
residuals (:meth:`~cpe_adapter.runtime.CPERuntime.before_forward` fails closed), and so does an
erased ControlNet running in a ``MultiControlNetModel`` next to it, until one of those calls is
made on the pipeline that holds it.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch
from torch import nn

from .errors import CPEAdapterError
from .hooks import adapter_placement
from .runtime import CPERuntime, get_runtime, remove_runtime
from .targets import denoiser_of, find_target_layers


def _controlnets(pipe: Any) -> list[nn.Module]:
    """The ControlNet models of a pipeline (none for a bare UNet or a pipeline without ControlNet)."""
    if isinstance(pipe, nn.Module):
        return []
    controlnet = getattr(pipe, "controlnet", None)
    if not isinstance(controlnet, nn.Module):
        return []
    nets = getattr(controlnet, "nets", None)
    return list(nets) if nets is not None else [controlnet]


# Pipelines seen holding each UNet (the ``*_cpe_adapter*`` calls record them), so that a change
# made on one pipeline also reaches the ControlNets of the others that share the UNet. Kept here,
# not on the UNet: the UNet then copies and pickles as it did, without its pipelines.
_PIPELINES: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()


def _pipelines_of(denoiser: nn.Module) -> list[Any]:
    pipelines = _PIPELINES.get(denoiser)
    return list(pipelines) if pipelines is not None else []


def remember_pipeline(pipe: Any, denoiser: nn.Module) -> None:
    pipelines = _PIPELINES.setdefault(denoiser, weakref.WeakSet())
    with contextlib.suppress(TypeError):  # an object without weak references: only ``pipe`` itself is synced
        pipelines.add(pipe)


@torch.inference_mode(False)  # companions are adapters too: never inference tensors
def sync_companions(pipe: Any, runtime: CPERuntime | None, strict: bool = True) -> None:
    """Give every ControlNet next to the UNet the erasure of the UNet, restricted to its own layers.

    A ControlNet made from the UNet carries copies of its cross-attention layers (same names) and
    reads the same prompt, so it is erased like the UNet; its runtime follows the UNet's active
    set, scales and switch. The ControlNets are those of ``pipe`` and of every other live pipeline
    holding the same UNet, and every ControlNet that already follows this UNet.

    A ControlNet of ``pipe`` whose layers the UNet lacks is refused (:class:`CPEAdapterError`) when
    ``strict``, before any ControlNet is touched. One of another pipeline, or any one when not
    ``strict`` (unloading), is left as it is: the UNet refuses its residuals until a call on its own
    pipeline erases it, and it does not block calls on the pipelines that do not hold it.
    """
    denoiser = denoiser_of(pipe)
    holders = [h for h in [pipe, *_pipelines_of(denoiser)] if h is pipe or denoiser_of_or_none(h) is denoiser]
    nets: list[nn.Module] = []
    for holder in holders:
        nets.extend(n for n in _controlnets(holder) if all(n is not m for m in nets))
    multis = [m for m in map(_multi_controlnet, holders) if m is not None]
    if runtime is None or not runtime.adapters:
        for net in nets:
            companion = get_runtime(net)
            if companion is not None and (runtime is None or companion.primary in (None, runtime)):
                remove_runtime(net)
        return
    if strict:
        for net in _controlnets(pipe):
            check_erasable(runtime, net)
    erase_controlnets(runtime, [net for net in nets if _erasable(runtime, net)])
    for multi in multis:
        if MULTI_HOOK_ATTR not in multi.__dict__:
            multi.__dict__[MULTI_HOOK_ATTR] = multi.register_forward_pre_hook(_erase_nets_added_in_place)


def check_erasable(runtime: CPERuntime, net: nn.Module) -> None:
    """Raise :class:`CPEAdapterError` unless ``runtime``'s adapters cover every cross-attention layer of
    ``net`` (a ControlNet already following ``runtime`` passes). Changes nothing."""
    companion = get_runtime(net)
    if companion is not None and companion.primary is runtime:
        return
    next(iter(runtime.adapters.values())).check_covers(find_target_layers(net))


def _erasable(runtime: CPERuntime, net: nn.Module) -> bool:
    try:
        check_erasable(runtime, net)
    except CPEAdapterError:
        return False
    return True


def erase_controlnets(runtime: CPERuntime, nets: list[nn.Module]) -> None:
    """Make every ControlNet in ``nets`` a companion of ``runtime`` and bring all companions' adapters up to date.

    Raises :class:`CPEAdapterError` for a ControlNet whose cross-attention layers the UNet lacks.
    """
    for net in nets:
        companion = get_runtime(net)
        if companion is None:
            companion = CPERuntime(net, primary=runtime)
            next(iter(runtime.adapters.values())).check_covers(companion.layers)  # before anything is wrapped
            companion.attach()
            net.__dict__["_cpe_runtime"] = companion
        if companion.primary is not runtime:
            # It followed another UNet: its adapters (same names, other weights) are not this one's.
            if companion.primary is not None:
                companion.primary.companions.discard(companion)
            companion.adapters.clear()
            companion.primary = runtime
        runtime.companions.add(companion)
    for companion in list(runtime.companions):
        controlnet = companion.denoiser_ref()
        if controlnet is None:  # its ControlNet is gone (a wrapped layer of it may still hold the runtime)
            runtime.companions.discard(companion)
            continue
        for name in [n for n in companion.adapters if companion.adapters[n] is not _source(runtime, n, companion)]:
            del companion.adapters[name]
        device, dtype = adapter_placement(controlnet)
        for name, adapter in runtime.adapters.items():
            if name not in companion.adapters:
                restricted = adapter.restricted_to(companion.layers)
                restricted.__dict__["_cpe_source"] = adapter
                companion.adapters[name] = restricted.to(device, dtype).requires_grad_(False)
    runtime.bump()


def _multi_controlnet(pipe: Any) -> nn.Module | None:
    """The ``MultiControlNetModel`` of a pipeline (anything with a ``nets`` list), or None."""
    controlnet = None if isinstance(pipe, nn.Module) else getattr(pipe, "controlnet", None)
    return controlnet if isinstance(controlnet, nn.Module) and hasattr(controlnet, "nets") else None


# A ``MultiControlNetModel``'s hook that erases nets put into its ``nets`` list in place.
MULTI_HOOK_ATTR = "_cpe_nets_hook"


def _erase_nets_added_in_place(multi: nn.Module, args: tuple) -> None:
    """Before a ``MultiControlNetModel`` runs: erase any net in ``nets`` that does not follow the UNet yet.

    The UNet is the one the other nets follow (``multi.nets.append(cn)``, ``multi.nets[i] = cn``);
    with no net left following one, there is no UNet to follow and nothing happens.
    """
    companions = [get_runtime(net) for net in multi.nets]
    primaries = {id(c.primary): c.primary for c in companions if c is not None and c.primary is not None}
    if len(primaries) != 1:
        return
    runtime = next(iter(primaries.values()))
    if runtime.adapters and any(c is None or c.primary is not runtime for c in companions):
        erase_controlnets(runtime, list(multi.nets))


def _source(runtime: CPERuntime, name: str, companion: CPERuntime) -> Any:
    """The companion's adapter ``name`` if it was made from the UNet's adapter of that name now loaded."""
    adapter = companion.adapters[name]
    return adapter if adapter.__dict__.get("_cpe_source") is runtime.adapters.get(name) else None


def denoiser_of_or_none(pipe: Any) -> nn.Module | None:
    """The UNet of a pipeline, or None where it has none (never raises)."""
    try:
        return denoiser_of(pipe)
    except CPEAdapterError:
        return None
