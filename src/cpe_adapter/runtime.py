"""Attaching adapters to a denoiser, routing concepts per token, and the per-prompt cache.

One :class:`CPERuntime` lives on each denoiser (UNet) that has adapters. It owns the loaded
adapters, the active set and scales, and a small cache keyed by the prompt-embedding tensor:

- the *residual* of every wrapped layer is computed once per prompt embedding (routing and
  all layers batched), and
- each layer's full projection ``P(E) + R(E)`` is kept, so the 25-50 denoising steps of one
  prompt cost no more than one.

A cache entry is served only while the embedding is the very same tensor object (a weak
reference, so a freed tensor whose memory is reused can never match), unchanged (its autograd
version counter), with the same adapters/scales (a generation counter bumped on every change,
including in-place edits of adapter parameters) and, per layer, the same weight storage and
version. Whenever autograd would need the result, nothing is cached.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import CPEAdapter
from .config import CPEConfig, TargetLayer
from .errors import CPEAdapterError, ErasureIntegrityError, IncompatibleAdapterError
from .gate import GATE_CHUNK, expand_residual, gate_values
from .layer import CPELinear

RUNTIME_ATTR = "_cpe_runtime"
CACHE_ENTRIES = 8


# ------------------------------------------------------------------------------ model discovery
def denoiser_of(pipe_or_model: Any) -> nn.Module:
    """The UNet of a pipeline (or the model itself when given a bare UNet)."""
    if isinstance(pipe_or_model, nn.Module):
        denoiser = pipe_or_model
    else:
        denoiser = getattr(pipe_or_model, "unet", None)
        if denoiser is None:
            if getattr(pipe_or_model, "transformer", None) is not None:
                raise CPEAdapterError(
                    f"{type(pipe_or_model).__name__} uses a transformer (MMDiT) denoiser, which cpe-adapter does "
                    "not support yet; use a UNet pipeline (SD 1.x, SD 2.x, SDXL). See docs/design/mmdit.md."
                )
            raise CPEAdapterError(
                f"{type(pipe_or_model).__name__} has no `unet`; pass a diffusers pipeline or a UNet2DConditionModel."
            )
    denoiser = getattr(denoiser, "_orig_mod", denoiser)  # torch.compile wrapper
    return denoiser


def _is_cross_attention(module: nn.Module) -> bool:
    return bool(getattr(module, "is_cross_attention", False)) and hasattr(module, "to_k") and hasattr(module, "to_v")


def cross_attention_modules(denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, Attention)`` of every cross-attention layer, in module order."""
    return [(name, module) for name, module in denoiser.named_modules() if _is_cross_attention(module)]


def innermost_linear(module: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    """Follow PEFT ``base_layer`` links: ``(parent, attribute, linear)`` of the base projection."""
    parent, attr, current = None, None, module
    while isinstance(getattr(current, "base_layer", None), nn.Module):
        parent, attr, current = current, "base_layer", current.base_layer
    return parent, attr, current


def find_target_layers(denoiser: nn.Module) -> list[TargetLayer]:
    """The projections an adapter for this denoiser must cover, with dimensions read from the model."""
    layers = []
    for path, attn in cross_attention_modules(denoiser):
        for proj in ("to_k", "to_v"):
            _, _, linear = innermost_linear(getattr(attn, proj))
            if not isinstance(linear, nn.Linear):
                raise CPEAdapterError(f"{path}.{proj} is a {type(linear).__name__}, not a linear projection.")
            layers.append(TargetLayer(f"{path}.{proj}", linear.in_features, linear.out_features))
    if not layers:
        raise CPEAdapterError(
            f"{type(denoiser).__name__} has no cross-attention layers (attn2.to_k/to_v); cpe-adapter needs a "
            "text-conditioned UNet."
        )
    return layers


def _is_fused(attn: nn.Module) -> bool:
    return bool(getattr(attn, "fused_projections", False)) or getattr(attn, "to_kv", None) is not None


# ------------------------------------------------------------------------------------- the cache
@dataclass
class _PromptEntry:
    embeds_ref: weakref.ref
    version: int
    generation: int
    device: torch.device
    dtype: torch.dtype
    residual: torch.Tensor | None
    projections: dict[int, tuple[torch.Tensor, tuple]] = field(default_factory=dict)


def _weight_signature(layer: nn.Linear) -> tuple:
    bias = layer.bias
    return (
        layer.weight.data_ptr(),
        layer.weight._version,
        None if bias is None else (bias.data_ptr(), bias._version),
    )


class CPERuntime:
    """Adapters, active set and per-prompt cache of one denoiser."""

    def __init__(self, denoiser: nn.Module) -> None:
        self.denoiser_ref = weakref.ref(denoiser)
        self.layers = find_target_layers(denoiser)
        self.layer_offsets = _offsets([t.out_features for t in self.layers])
        self.adapters: dict[str, CPEAdapter] = {}
        self.scales: dict[str, float] = {}
        self.active: list[str] = []
        self.enabled = True
        self.generation = 0
        self._param_versions: tuple = ()
        self._cache: OrderedDict[int, _PromptEntry] = OrderedDict()
        self._lock = threading.RLock()
        self._hook = None

    # ------------------------------------------------------------------------------- state
    def applies(self) -> bool:
        """Whether any adapter acts on the projections now."""
        return self.enabled and any(self.scales.get(name, 0.0) != 0.0 for name in self.active)

    def bump(self) -> None:
        """Invalidate every cached residual (adapters, active set or scales changed)."""
        with self._lock:
            self.generation += 1
            self._cache.clear()

    def participants(self) -> list[tuple[str, CPEAdapter, float]]:
        """Active adapters at non-zero scale, in name order (ties in routing break by name)."""
        return [(n, self.adapters[n], self.scales[n]) for n in sorted(self.active) if self.scales.get(n, 0.0) != 0.0]

    def check_compatible(self, config: CPEConfig, source: str = "adapter") -> None:
        """Raise :class:`IncompatibleAdapterError` unless ``config`` matches this denoiser's layers."""
        dims = {t.in_features for t in self.layers}
        if dims != {config.text_embed_dim}:
            raise IncompatibleAdapterError(
                f"The {source} was trained for {config.text_embed_dim}-d text embeddings, but this pipeline's "
                f"cross-attention reads {sorted(dims)}-d embeddings; use an adapter trained for this base model "
                f"(adapter base: {config.base_model or 'unknown'})."
            )
        ours = {(t.name, t.out_features) for t in self.layers}
        theirs = {(t.name, t.out_features) for t in config.target_layers}
        if ours != theirs:
            missing = sorted(n for n, _ in ours - theirs)[:3]
            extra = sorted(n for n, _ in theirs - ours)[:3]
            raise IncompatibleAdapterError(
                f"The {source} targets another layer layout than this pipeline ({len(theirs)} vs {len(ours)} "
                f"projections; e.g. pipeline-only {missing}, adapter-only {extra}). It was trained for "
                f"{config.base_model or 'another architecture'}; train one for this base model."
            )

    def in_layer_order(self, adapter: CPEAdapter) -> CPEAdapter:
        """``adapter`` with its layers in this denoiser's order (a copy only when they differ)."""
        if adapter.config.layer_names == [t.name for t in self.layers]:
            return adapter
        config = CPEConfig.from_dict({**adapter.config.to_dict(), "target_layers": [t.__dict__ for t in self.layers]})
        return CPEAdapter.from_state_dict(adapter.file_state_dict(), config)

    # ------------------------------------------------------------------------------ wrapping
    def wrapped_layers(self) -> Iterator[tuple[nn.Module, str, CPELinear]]:
        """``(parent, attribute, wrapper)`` for every :class:`CPELinear` of this runtime."""
        denoiser = self.denoiser_ref()
        for module in denoiser.modules():
            for attr, child in module.named_children():
                if isinstance(child, CPELinear) and child.cpe_runtime is self:
                    yield module, attr, child

    def attach(self) -> None:
        """Wrap every target projection (idempotent) and install the integrity hook."""
        denoiser = self.denoiser_ref()
        if any(True for _ in self.wrapped_layers()):
            return
        fused = [path for path, attn in cross_attention_modules(denoiser) if _is_fused(attn)]
        if fused:
            raise CPEAdapterError(
                f"Cross-attention projections are fused ({fused[0]} and {len(fused) - 1} more); fused to_kv bypasses "
                "the eraser. Call `pipe.unfuse_qkv_projections()` before loading CPE adapters."
            )
        index = 0
        for _, attn in cross_attention_modules(denoiser):
            for proj in ("to_k", "to_v"):
                parent, attr, linear = innermost_linear(getattr(attn, proj))
                if parent is None:
                    parent, attr = attn, proj
                setattr(parent, attr, CPELinear(linear, self, index))
                index += 1
        self._hook = denoiser.register_forward_pre_hook(_integrity_hook)

    def detach(self) -> None:
        """Put plain ``nn.Linear`` layers back (sharing the current parameters) and drop the hook."""
        for parent, attr, wrapper in list(self.wrapped_layers()):
            original = wrapper.cpe_original
            original.weight = wrapper.weight
            original.bias = wrapper.bias
            setattr(parent, attr, original)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._cache.clear()

    def verify(self) -> None:
        """Fail closed: raise if an active erasure could not be applied by the next forward."""
        if not self.applies():
            return
        denoiser = self.denoiser_ref()
        attentions = cross_attention_modules(denoiser)
        wrapped = 0
        for path, attn in attentions:
            if _is_fused(attn):
                raise ErasureIntegrityError(
                    f"{path} uses fused to_kv projections, which bypass the active CPE erasure. Call "
                    "`pipe.unfuse_qkv_projections()` or `pipe.disable_cpe_adapters()`."
                )
            for proj in ("to_k", "to_v"):
                _, _, linear = innermost_linear(getattr(attn, proj))
                if not (isinstance(linear, CPELinear) and linear.cpe_runtime is self):
                    raise ErasureIntegrityError(
                        f"{path}.{proj} was replaced after the CPE adapters were attached, so the active erasure "
                        "would not apply. Reload the adapters, or call `pipe.disable_cpe_adapters()` to run "
                        "without erasure."
                    )
                if linear.in_features != linear.weight.shape[1] or linear.out_features != linear.weight.shape[0]:
                    raise ErasureIntegrityError(f"{path}.{proj} changed shape after the CPE adapters were attached.")
                wrapped += 1
        if wrapped != len(self.layers):
            raise ErasureIntegrityError(
                f"The UNet now has {wrapped} cross-attention projections, the erasure was attached to "
                f"{len(self.layers)}; reload the adapters."
            )

    # --------------------------------------------------------------------------- computing
    def _adapter_versions(self) -> tuple:
        return tuple(p._version for _, a, _ in self.participants() for p in a.parameters())

    def _follow(self, adapter: CPEAdapter, like: torch.Tensor) -> None:
        ref = adapter.gate_v
        if ref.device != like.device or ref.dtype != like.dtype:
            adapter.to(device=like.device, dtype=like.dtype)

    def residual(self, embeds: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
        """Routed residual of every layer for ``embeds`` ``[B, T, d]``: ``[B, T, sum(d_out)]``.

        Per token, the concept with the largest gate over all participating adapters wins
        (METHOD.md §3); only its residual is applied, times its adapter's scale.
        """
        participants = self.participants()
        if not participants:
            return None
        for _, adapter, _ in participants:
            self._follow(adapter, like)
        embeds = embeds.to(like.dtype)
        squeeze = embeds.dim() == 2
        if squeeze:
            embeds = embeds.unsqueeze(0)
        gates = torch.cat([_chunked_gates(embeds, adapter) for _, adapter, _ in participants])
        winner = gates.argmax(dim=0)
        batch, tokens, _ = embeds.shape
        total = self.layer_offsets[-1]
        residual = embeds.new_zeros(batch, tokens, total)
        offset = 0
        for _, adapter, scale in participants:
            count = adapter.num_concepts
            local = winner - offset
            owned = (local >= 0) & (local < count)
            offset += count
            if not bool(owned.any()):
                continue
            index = local.clamp(0, count - 1)
            gate = gates[offset - count : offset].gather(0, local.clamp(0, count - 1).unsqueeze(0)).squeeze(0)
            mixed = _routed_mixture(embeds, adapter, index)
            weight = (owned.to(embeds.dtype) * gate * (scale * adapter.residual_scale)).unsqueeze(-1)
            hidden = weight * mixed
            codes = torch.einsum("btd,btdk->btk", hidden, adapter.down[index])
            codes = codes.unflatten(-1, (len(self.layers), adapter.config.residual_rank))
            residual = residual + expand_residual(codes, adapter.up[index], adapter.layer_of_column)
        return residual.squeeze(0) if squeeze else residual

    def project(self, layer: CPELinear, x: torch.Tensor) -> torch.Tensor:
        """``P(x) + R(x)`` for one wrapped layer, served from the per-prompt cache when valid."""
        start, stop = self.layer_offsets[layer.cpe_index], self.layer_offsets[layer.cpe_index + 1]
        base = None
        if torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad or self._adapters_need_grad()):
            residual = self.residual(x, layer.weight)
            base = F.linear(x, layer.weight, layer.bias)
            return base if residual is None else base + residual[..., start:stop]
        entry = self._entry(x, layer.weight)
        signature = _weight_signature(layer)
        cached = entry.projections.get(layer.cpe_index)
        if cached is not None and cached[1] == signature:
            return cached[0]
        out = F.linear(x, layer.weight, layer.bias)
        if entry.residual is not None:
            out = out + entry.residual[..., start:stop]
        entry.projections[layer.cpe_index] = (out, (*signature, out._version))
        return out

    def _adapters_need_grad(self) -> bool:
        return any(p.requires_grad for _, a, _ in self.participants() for p in a.parameters())

    def _entry(self, x: torch.Tensor, weight: torch.Tensor) -> _PromptEntry:
        versions = self._adapter_versions()
        with self._lock:
            if versions != self._param_versions:
                self._param_versions = versions
                self.generation += 1
                self._cache.clear()
            key = id(x)
            entry = self._cache.get(key)
            if (
                entry is not None
                and entry.embeds_ref() is x
                and entry.version == x._version
                and entry.generation == self.generation
                and entry.device == weight.device
                and entry.dtype == weight.dtype
            ):
                self._cache.move_to_end(key)
                return entry
            entry = _PromptEntry(
                embeds_ref=weakref.ref(x),
                version=x._version,
                generation=self.generation,
                device=weight.device,
                dtype=weight.dtype,
                residual=self.residual(x, weight),
            )
            self._cache[key] = entry
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
            return entry

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()


def _offsets(sizes: list[int]) -> list[int]:
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    return offsets


def _chunked_gates(embeds: torch.Tensor, adapter: CPEAdapter) -> torch.Tensor:
    """Gate values ``[N, B, T]`` of all of an adapter's concepts, ``GATE_CHUNK`` concepts at a time."""
    key = adapter.key_weight()
    parts = []
    for start in range(0, adapter.num_concepts, GATE_CHUNK):
        stop = start + GATE_CHUNK
        gates, _ = gate_values(embeds, adapter.gate_a[start:stop], key[start:stop], adapter.gate_v[start:stop])
        parts.append(gates)
    return torch.cat(parts)


def _routed_mixture(embeds: torch.Tensor, adapter: CPEAdapter, index: torch.Tensor) -> torch.Tensor:
    """``Ē_c*[t] = S_c*[t] E`` with each token's own winning concept ``c* = index[b, t]``."""
    queries = torch.einsum("btd,btdm->btm", embeds, adapter.gate_a[index])
    key_weight = adapter.key_weight()[index]
    keys = torch.einsum("bsd,btdm->btsm", embeds, key_weight)
    mixing = torch.softmax(torch.einsum("btm,btsm->bts", queries, keys), dim=-1)
    return mixing @ embeds


def _integrity_hook(module: nn.Module, args: Any) -> None:
    runtime = getattr(module, RUNTIME_ATTR, None)
    if runtime is not None:
        runtime.verify()


def get_runtime(denoiser: nn.Module, create: bool = False) -> CPERuntime | None:
    """The runtime attached to ``denoiser`` (created on demand)."""
    runtime = denoiser.__dict__.get(RUNTIME_ATTR)
    if runtime is None and create:
        runtime = CPERuntime(denoiser)
        denoiser.__dict__[RUNTIME_ATTR] = runtime
    return runtime


def remove_runtime(denoiser: nn.Module) -> None:
    runtime = denoiser.__dict__.pop(RUNTIME_ATTR, None)
    if runtime is not None:
        runtime.detach()
