"""The public pipeline operations of docs/api.md, as functions taking a pipeline or a UNet.

``import cpe_adapter`` also installs each of them as a method of ``diffusers.DiffusionPipeline``
(see :func:`register_pipeline_methods`). Every operation validates everything first and only then
changes state, so a failed call leaves already loaded adapters exactly as they were.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter import CPEAdapter
from .config import CONFIG_NAME, WEIGHTS_NAME, CPEConfig, is_finite_number
from .controlnets import remember_pipeline, sync_companions
from .errors import CPEAdapterError
from .hooks import adapter_placement
from .hub import load_adapter, push_adapter
from .runtime import CPERuntime, get_runtime, remove_runtime
from .targets import denoiser_of


def _runtime(pipe: Any) -> CPERuntime:
    runtime = get_runtime(denoiser_of(pipe))
    if runtime is None or not runtime.adapters:
        raise CPEAdapterError("No CPE adapters are loaded; call `load_cpe_adapter(...)` first.")
    return runtime


def _check_names(runtime: CPERuntime, names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in runtime.adapters]
    if unknown:
        raise CPEAdapterError(f"Unknown CPE adapter name(s) {unknown}; loaded adapters are {sorted(runtime.adapters)}.")


def _default_name(source: Any, config: CPEConfig) -> str:
    if config.name:
        return config.name
    if isinstance(source, (str, os.PathLike)):
        path = Path(str(source).rstrip("/\\"))
        if path.name in (WEIGHTS_NAME, CONFIG_NAME):  # a file inside an adapter folder: the folder names it
            path = path.parent
        return re.sub(r"[^\w.-]+", "_", path.stem) or "default"
    return "default"


def _unique(name: str, taken: dict[str, Any]) -> str:
    if name not in taken:
        return name
    index = 1
    while f"{name}_{index}" in taken:
        index += 1
    return f"{name}_{index}"


# Adapters are made outside inference mode even when loaded inside it: inference tensors have no
# version counter, so an in-place edit of such an adapter could not invalidate the cache.
@torch.inference_mode(False)
def load_cpe_adapter(
    pipe: Any,
    pretrained_model_name_or_path_or_dict: Any,
    adapter_name: str | None = None,
    *,
    weight_name: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    force_download: bool = False,
    scale: float = 1.0,
) -> str:
    """Load an adapter, attach it to the pipeline's UNet and add it to the active set.

    Args:
        pretrained_model_name_or_path_or_dict: a Hub repo id, a local folder, a ``.safetensors``
            file, ``(state_dict, config)`` or a :class:`CPEAdapter`.
        adapter_name: name to register it under; default: the config's name, else the adapter's
            folder or file name, else ``"default"`` (made unique).
        scale: strength of this adapter's residual (0 takes it out of routing).

    Returns:
        The name the adapter was registered under.
    """
    denoiser = denoiser_of(pipe)
    _check_scale(scale)
    adapter = load_adapter(
        pretrained_model_name_or_path_or_dict,
        weight_name=weight_name,
        subfolder=subfolder,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        force_download=force_download,
    )
    existing = get_runtime(denoiser)
    runtime = existing or CPERuntime(denoiser)
    runtime.check_unfused()
    runtime.check_compatible(adapter.config, "adapter")
    if adapter_name is not None:
        if not isinstance(adapter_name, str) or not adapter_name:
            raise CPEAdapterError(f"adapter_name must be a non-empty string, got {adapter_name!r}.")
        if adapter_name in runtime.adapters:
            raise CPEAdapterError(
                f"A CPE adapter named {adapter_name!r} is already loaded; choose another adapter_name or "
                "`unload_cpe_adapter` it first."
            )
        name = adapter_name
    else:
        name = _unique(_default_name(pretrained_model_name_or_path_or_dict, adapter.config), runtime.adapters)
    adapter = runtime.in_layer_order(adapter)
    device, dtype = adapter_placement(denoiser)
    if adapter is pretrained_model_name_or_path_or_dict:
        # A copy: the caller's object (perhaps still training, or loaded into another pipeline
        # too) keeps its own device, precision and ``requires_grad``; later pipeline moves
        # convert only the copy.
        adapter = copy.deepcopy(adapter)
    adapter = adapter.to(device=device, dtype=dtype).requires_grad_(False).eval()
    adapter.check_finite(f"overflows in this pipeline's {dtype}; the adapter holds values no real one does.")
    if existing is None:
        runtime.attach()
        denoiser.__dict__["_cpe_runtime"] = runtime
    runtime.adapters[name] = adapter
    runtime.scales[name] = float(scale)
    runtime.active.append(name)
    try:
        sync_companions(pipe, runtime)
    except CPEAdapterError:
        unload_cpe_adapter(pipe, name)
        raise
    if not isinstance(pipe, nn.Module):
        remember_pipeline(pipe, denoiser)
    return name


def _check_scale(scale: Any) -> None:
    if not is_finite_number(scale):
        raise CPEAdapterError(
            f"Adapter scales must be finite numbers (0 takes an adapter out, 1 is as trained), got {scale!r}."
        )


# One scale for all adapters, one per adapter in order, or ``{name: scale}``.
Scales = float | Sequence[float] | Mapping[str, float] | None


def _selection(
    runtime: CPERuntime, adapter_names: str | Sequence[str], scales: Scales
) -> tuple[list[str], dict[str, float]]:
    """Checked ``(names, {name: scale})`` for :func:`set_cpe_adapters` and :func:`use_cpe_adapters`.

    ``scales``: one number for all, one per name in order, or ``{name: scale}`` (names left out: 1.0).
    """
    if adapter_names is None or not isinstance(adapter_names, (str, list, tuple)):
        raise CPEAdapterError(
            f"adapter_names must be a name or a list of names, got {type(adapter_names).__name__}; "
            "to switch erasure off use `disable_cpe_adapters()`."
        )
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    _check_names(runtime, names)
    if len(set(names)) != len(names):
        raise CPEAdapterError(f"Adapter names repeat in {names}.")
    if isinstance(scales, Mapping):
        _check_names(runtime, list(scales))
        if set(scales) - set(names):
            raise CPEAdapterError(
                f"scales name adapters that are not being activated: {sorted(set(scales) - set(names))}."
            )
        scales = [scales.get(name, 1.0) for name in names]
    if scales is None:
        values = [1.0] * len(names)
    elif isinstance(scales, (int, float)) and not isinstance(scales, bool):
        values = [float(scales)] * len(names)
    elif isinstance(scales, str) or not isinstance(scales, (list, tuple)):
        raise CPEAdapterError(
            "scales must be a number, a list of numbers or {name: number}, "
            f"got {type(scales).__name__} {scales!r:.40}."
        )
    else:
        values = list(scales)
        if len(values) != len(names):
            raise CPEAdapterError(f"Got {len(values)} scales for {len(names)} adapters; pass one scale per adapter.")
    for value in values:
        _check_scale(value)
    return names, {n: float(v) for n, v in zip(names, values, strict=True)}


def set_cpe_adapters(pipe: Any, adapter_names: str | Sequence[str], scales: Scales = None) -> None:
    """Make exactly ``adapter_names`` active, with per-adapter ``scales`` (default 1.0 each)."""
    runtime = _runtime(pipe)
    names, values = _selection(runtime, adapter_names, scales)
    _follow_controlnets(pipe, runtime)
    runtime.active = names
    runtime.scales.update(values)
    runtime.bump()


def _follow_controlnets(pipe: Any, runtime: CPERuntime) -> None:
    """Erase ``pipe``'s ControlNets (raises before any change), then remember ``pipe`` as a holder of the UNet."""
    sync_companions(pipe, runtime)
    if not isinstance(pipe, nn.Module):
        remember_pipeline(pipe, runtime.denoiser_ref())


@contextlib.contextmanager
def use_cpe_adapters(pipe: Any, adapter_names: str | Sequence[str], scales: Scales = None) -> Iterator[None]:
    """Inside the block, the *calling thread* uses ``adapter_names`` at ``scales``; others are unaffected.

    For servers where several threads share one UNet (pipelines made with ``from_pipe``) and each
    request chooses its erasers. ``disable_cpe_adapters`` still switches erasure off everywhere.
    """
    runtime = _runtime(pipe)
    names, values = _selection(runtime, adapter_names, scales)
    with runtime.thread_selection(names, values):
        yield


def get_active_cpe_adapters(pipe: Any) -> list[str]:
    """Names of the active adapters (also reported while disabled)."""
    runtime = get_runtime(denoiser_of(pipe))
    return list(runtime.active) if runtime else []


def list_cpe_adapters(pipe: Any) -> dict[str, CPEConfig]:
    """Every loaded adapter's config, by name."""
    runtime = get_runtime(denoiser_of(pipe))
    return {name: adapter.config for name, adapter in runtime.adapters.items()} if runtime else {}


def get_cpe_adapter(pipe: Any, adapter_name: str) -> CPEAdapter:
    """The loaded :class:`CPEAdapter` called ``adapter_name``."""
    runtime = _runtime(pipe)
    _check_names(runtime, [adapter_name])
    return runtime.adapters[adapter_name]


def disable_cpe_adapters(pipe: Any) -> None:
    """Switch every erasure off (outputs then equal the pipeline without adapters)."""
    runtime = get_runtime(denoiser_of(pipe))
    if runtime is not None:
        runtime.enabled = False
        runtime.bump()


def enable_cpe_adapters(pipe: Any) -> None:
    """Switch the active erasures back on."""
    runtime = get_runtime(denoiser_of(pipe))
    if runtime is not None:
        _follow_controlnets(pipe, runtime)
        runtime.enabled = True
        runtime.bump()


def unload_cpe_adapter(pipe: Any, adapter_names: str | Sequence[str] | None = None) -> None:
    """Remove adapters (``None``: all); with none left the UNet is exactly the original."""
    denoiser = denoiser_of(pipe)
    runtime = get_runtime(denoiser)
    if runtime is None:
        if adapter_names is None:
            return
        raise CPEAdapterError(
            f"Cannot unload {adapter_names!r}: no CPE adapters are loaded on this pipeline "
            "(`list_cpe_adapters(pipe)` lists what is; `load_cpe_adapter(...)` loads one)."
        )
    names = (
        list(runtime.adapters)
        if adapter_names is None
        else ([adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
    )
    _check_names(runtime, names)
    if len(set(names)) != len(names):
        raise CPEAdapterError(f"Adapter names repeat in {names}; name each adapter to unload once.")
    runtime.check_not_held(names)
    for name in names:
        runtime.adapters.pop(name)
        runtime.scales.pop(name, None)
        if name in runtime.active:
            runtime.active.remove(name)
    runtime.bump()
    if not runtime.adapters:
        remove_runtime(denoiser)
        for companion in list(runtime.companions):
            controlnet = companion.denoiser_ref()
            if controlnet is not None and get_runtime(controlnet) is companion:
                remove_runtime(controlnet)
        runtime.companions.clear()
    # Not strict: a ControlNet the remaining adapters cannot erase stays refused by the UNet (fail
    # closed), and unloading never fails half-way.
    sync_companions(pipe, runtime if runtime.adapters else None, strict=False)


def save_cpe_adapter(
    pipe: Any, save_directory: str | os.PathLike, adapter_name: str | None = None, *, safe_serialization: bool = True
) -> Path:
    """Save one loaded adapter (the only one when ``adapter_name`` is None) to a folder."""
    return _pick(pipe, adapter_name).save_pretrained(save_directory, safe_serialization=safe_serialization)


def push_cpe_adapter_to_hub(
    pipe: Any,
    repo_id: str,
    adapter_name: str | None = None,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
) -> str:
    """Upload one loaded adapter to the Hub with a model card; returns the commit URL."""
    return push_adapter(
        _pick(pipe, adapter_name),
        repo_id,
        private=private,
        token=token,
        commit_message=commit_message,
        revision=revision,
    )


def clear_cpe_cache(pipe: Any) -> None:
    """Drop cached per-prompt projections and routes.

    Only needed after writes that bypass autograd's version counter: ``weight.data = ...`` or
    ``embeds.data.mul_(...)``, or an edit through a NumPy array sharing a tensor's memory.
    """
    runtime = get_runtime(denoiser_of(pipe))
    if runtime is not None:
        runtime.clear_cache()


def _pick(pipe: Any, adapter_name: str | None) -> CPEAdapter:
    runtime = _runtime(pipe)
    if adapter_name is None:
        if len(runtime.adapters) != 1:
            raise CPEAdapterError(
                f"{len(runtime.adapters)} CPE adapters are loaded ({sorted(runtime.adapters)}); pass adapter_name."
            )
        adapter_name = next(iter(runtime.adapters))
    _check_names(runtime, [adapter_name])
    return runtime.adapters[adapter_name]


PIPELINE_METHODS = {
    "load_cpe_adapter": load_cpe_adapter,
    "set_cpe_adapters": set_cpe_adapters,
    "use_cpe_adapters": use_cpe_adapters,
    "get_active_cpe_adapters": get_active_cpe_adapters,
    "list_cpe_adapters": list_cpe_adapters,
    "get_cpe_adapter": get_cpe_adapter,
    "disable_cpe_adapters": disable_cpe_adapters,
    "enable_cpe_adapters": enable_cpe_adapters,
    "unload_cpe_adapter": unload_cpe_adapter,
    "save_cpe_adapter": save_cpe_adapter,
    "push_cpe_adapter_to_hub": push_cpe_adapter_to_hub,
    "clear_cpe_cache": clear_cpe_cache,
}


def register_pipeline_methods() -> list[str]:
    """Add the operations as ``DiffusionPipeline`` methods, never replacing an existing attribute."""
    from diffusers import DiffusionPipeline

    added = []
    for name, function in PIPELINE_METHODS.items():
        if not hasattr(DiffusionPipeline, name):
            setattr(DiffusionPipeline, name, function)
            added.append(name)
    return added
