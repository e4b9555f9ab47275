"""Attaching adapters to a denoiser, routing concepts per token, and the per-prompt cache.

Which layers are wrapped is decided in :mod:`targets`, the routing itself in :mod:`routing` and
:mod:`gate`, and the hooks a wrapper must carry in :mod:`hooks`.

One :class:`CPERuntime` lives on each denoiser (UNet) that has adapters. It owns the loaded
adapters, the active set and scales, and a small cache keyed by the prompt-embedding tensor:

- the *residual* of every wrapped layer is computed once per prompt embedding (routing over all
  concepts of all active adapters, every layer batched in one pass), and
- each layer's full projection ``P(E) + R(E)`` is kept, so every denoising step after the first
  skips the ``to_k`` / ``to_v`` matrix products altogether (faster than the base model).

Per-forward bookkeeping happens once, in a forward pre-hook on the denoiser: it notices changes
of the active set, scales or adapter parameters, checks that the wrappers are still in place,
and hands each wrapper its ready projection (``CPELinear.cpe_prepared``); a post-hook takes them
back. Inside the UNet a wrapper then does a single identity test, which ``torch.compile``
traces without a graph break. A wrapper called in any other way (directly, on a transformed
embedding) computes through :meth:`CPERuntime.project`, which checks everything itself.

A cache entry is served only while the embedding is the very same tensor object (a weak
reference, so a freed tensor whose memory is reused can never match; the entry is dropped when
the tensor dies), unchanged (its autograd version counter), with the same adapters/scales (a
generation counter bumped on every change, including in-place edits of adapter parameters) and,
per layer, the same weight storage and version. Whenever autograd would need the result, nothing
is cached. :func:`no_cache` (or ``CPE_ADAPTER_NO_CACHE=1``) turns the cache off to compare.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import os
import sys
import threading
import weakref
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import CPEAdapter
from .config import CPEConfig
from .errors import CPEAdapterError, ErasureIntegrityError, IncompatibleAdapterError
from .hooks import carry_cast_hook, carry_offload_hook
from .layer import CPELinear, is_compiling
from .routing import RouteMemo, concept_sets, route_row, row_residual
from .targets import PROJECTED_TEXT, cross_attention_modules, find_target_layers, innermost_linear, is_fused

RUNTIME_ATTR = "_cpe_runtime"
# Live prompt embeddings whose projections are kept; an entry also goes when its tensor is freed.
CACHE_ENTRIES = 4
NO_CACHE_ENV = "CPE_ADAPTER_NO_CACHE"
# Frames above an erased ControlNet's forward hook searched for a MultiControlNetModel calling it.
SIBLING_FRAMES = 12
_no_cache_depth = 0


# ------------------------------------------------------------------------------ module-tree edits
# A submodule or parameter registered (``setattr``, ``add_module``, ``ModuleList.append``,
# ``register_parameter``) on any module of a denoiser with adapters counts as a possible edit of its
# tree, so :meth:`CPERuntime.verify` rescans the whole tree only when something was registered there
# since its last scan. (Registrations elsewhere, such as the temporary ``ModuleList`` a UNet makes
# when it slices one, do not count.) Edits that bypass registration (writing ``_modules`` directly)
# are caught for the wrapped projections themselves by the per-call slot check.
_tree_edits = 0
_watched_modules: weakref.WeakSet[nn.Module] = weakref.WeakSet()
# The same for loaded adapters: a parameter replaced by a new object (``adapter.up =
# nn.Parameter(...)``, ``load_state_dict(..., assign=True)``) must invalidate what was computed
# with the old one.
_adapter_edits = 0
_watched_adapters: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _count_tree_edit(module: nn.Module, name: str, value: Any) -> None:
    global _tree_edits, _adapter_edits
    # Inside a compiled forward the only registrations are a UNet's temporary slices of its own
    # ModuleLists; returning first keeps dynamo from tracing (and guarding on) the watched sets.
    if is_compiling():
        return
    if module in _watched_modules:
        _tree_edits += 1
    if module in _watched_adapters:
        _adapter_edits += 1


torch.nn.modules.module.register_module_module_registration_hook(_count_tree_edit)
torch.nn.modules.module.register_module_parameter_registration_hook(_count_tree_edit)


# ------------------------------------------------------------------------------ cache switch
def cache_globally_enabled() -> bool:
    """False inside :func:`no_cache` or while the ``CPE_ADAPTER_NO_CACHE`` environment variable is set."""
    return _no_cache_depth == 0 and os.environ.get(NO_CACHE_ENV, "") in ("", "0")


@contextlib.contextmanager
def no_cache() -> Iterator[None]:
    """Recompute every projection (gates, routing, ``P(E) + R(E)``) on every call inside the block.

    The cached and uncached paths run the very same kernels, so their outputs are bitwise equal;
    this switch exists for tests and benchmarks that compare them.
    """
    global _no_cache_depth
    _no_cache_depth += 1
    try:
        yield
    finally:
        _no_cache_depth -= 1


def _param_state(params: list[torch.Tensor]) -> tuple:
    """Adapter registrations so far, and each watched parameter's storage and version."""
    return (_adapter_edits, *((p.data_ptr(), _version_of(p)) for p in params))


def _version_of(tensor: torch.Tensor) -> int:
    """Autograd version counter; inference-mode tensors have none (and cannot change outside it)."""
    return -1 if tensor.is_inference() else tensor._version


def _unchanged_inference_tensor(snapshot: torch.Tensor | None, x: torch.Tensor) -> bool:
    """Inference tensors have no version counter: compare against a copy taken when cached."""
    if not x.is_inference():
        return True
    return snapshot is not None and torch.equal(snapshot, x)


# ------------------------------------------------------------------------------ per-thread choice
# ``use_adapters`` overrides the active set and scales of a runtime in the current thread (or
# asyncio task) only: {id(runtime): (active names, scales)}.
_SELECTION: contextvars.ContextVar[dict[int, tuple[tuple[str, ...], dict[str, float]]] | None] = contextvars.ContextVar(
    "cpe_adapter_selection", default=None
)


# ------------------------------------------------------------------------------------- the cache
@dataclass
class _PromptEntry:
    embeds_ref: weakref.ref
    version: int
    generation: int
    routing: tuple = ()
    snapshot: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    projections: dict[int, tuple[torch.Tensor, tuple]] = field(default_factory=dict)


def _weight_signature(layer: nn.Linear, outer: nn.Module | None = None) -> tuple:
    """What identifies the weights a cached projection was computed with.

    Storage and version counter of weight and bias, plus the merged-adapter list of a PEFT layer
    wrapping ``layer`` (``outer``): PEFT merges a LoRA with ``weight.data += delta``, which
    changes neither storage nor version.
    """
    weight, bias = layer.weight, layer.bias
    merged = None if outer is None or outer is layer else getattr(outer, "merged_adapters", None)
    return (
        weight.data_ptr(),
        _version_of(weight),
        None if bias is None else (bias.data_ptr(), _version_of(bias)),
        None if not merged else tuple(_merged_state(outer, name) for name in merged),
    )


def _merged_state(outer: nn.Module, name: str) -> tuple:
    """What a merged PEFT adapter ``name`` wrote into the base weight: its scaling and its factors'
    storage and version (``fuse_lora(lora_scale=...)`` changes the scaling; an unmerge, edit and
    merge changes a factor)."""
    scaling = getattr(outer, "scaling", {})
    factors = []
    for attr in ("lora_A", "lora_B"):
        modules = getattr(outer, attr, None)
        factor = modules[name] if isinstance(modules, nn.ModuleDict) and name in modules else None
        weight = getattr(factor, "weight", None)
        factors.append(None if weight is None else (weight.data_ptr(), _version_of(weight)))
    return (name, scaling.get(name) if isinstance(scaling, dict) else None, *factors)


class CPERuntime:
    """Adapters, active set and per-prompt cache of one denoiser."""

    #: Per-runtime switch of the per-prompt cache (see also :func:`no_cache`).
    cache_enabled: bool = True

    def __init__(self, denoiser: nn.Module, primary: CPERuntime | None = None) -> None:
        self.denoiser_ref = weakref.ref(denoiser)
        # A companion (a ControlNet's copy of the cross-attention) follows its primary (the UNet's
        # runtime) for the active set, scales and the on/off switch; it holds its own layers.
        self.primary = primary
        # Held weakly: a ControlNet holds its own runtime (and that runtime its ControlNet), so a
        # ControlNet dropped with its pipeline goes with its runtime while the UNet keeps its adapters.
        self.companions: weakref.WeakSet[CPERuntime] = weakref.WeakSet()
        self.layers = find_target_layers(denoiser)
        self.layer_offsets = _offsets([t.out_features for t in self.layers])
        self.adapters: dict[str, CPEAdapter] = {}
        self._scales: dict[str, float] = {}
        self._active: list[str] = []
        self._enabled = True
        self.generation = 0
        self._state: tuple = ()
        self._watched: list[torch.Tensor] = []
        self._param_versions: tuple = ()
        self._cache: OrderedDict[int, _PromptEntry] = OrderedDict()
        self._route_memo = RouteMemo()
        self._concept_sets: tuple[tuple, list] = ((), [])  # (state, participants stacked for routing)
        self._lock = threading.RLock()
        self._hooks: list[Any] = []
        self._wrappers: list[CPELinear] = []
        self._slots: list[tuple[nn.Module, str, CPELinear]] = []
        # (parent, key, child) on the way from the denoiser to every wrapped attention module,
        # checked per call: ``ModuleList.insert`` or ``del`` edit ``_modules`` without registering.
        self._links: list[tuple[nn.Module, str, nn.Module]] = []
        self._verified: tuple | None = None  # (tree edits, generation) at the last full scan that passed
        config = getattr(denoiser, "config", None)
        self._embeds_reach_layers = getattr(config, "encoder_hid_dim_type", None) not in PROJECTED_TEXT
        self._thread_selections = 0
        self._held: Counter[str] = Counter()  # adapter names chosen by open ``thread_selection`` blocks
        # Per thread: companions (ControlNets) that ran since this denoiser's last forward.
        self._companion_runs = threading.local()
        # Per thread: ``inside`` a denoiser forward, and the residual computed there for autograd,
        # shared by every layer of that forward (``value``: its key and the residual).
        self._forward_residual = threading.local()

    def __reduce__(self) -> Any:
        raise CPEAdapterError(
            "A UNet with CPE adapters loaded cannot be pickled (torch.save, multiprocessing): save the adapters "
            "with `pipe.save_cpe_adapter(...)`, call `pipe.unload_cpe_adapter()`, and load them again afterwards."
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> CPERuntime:
        """The runtime of a deep copy of the denoiser: same adapters (copied), active set and scales.

        ``copy.deepcopy(unet)`` (an EMA copy, a frozen reference model) reaches the runtime through
        the UNet and its wrapped layers. The copy gets its own lock, an empty cache and routing
        memo, and a weak reference to the *copied* denoiser. A ControlNet's runtime re-registers
        with the copy of its primary; a UNet copied alone takes no companions along.
        """
        new = object.__new__(type(self))
        memo[id(self)] = new
        fresh = {
            "_lock": threading.RLock(),
            "_cache": OrderedDict(),
            "_route_memo": RouteMemo(),
            "_companion_runs": threading.local(),
            "_forward_residual": threading.local(),
            "_concept_sets": ((), []),
            "_thread_selections": 0,
            "_verified": None,  # the copied modules are not watched yet: the copy's first call scans
            "_links": [],  # found again by that scan, in the copied tree
            "companions": weakref.WeakSet(),
            "_held": Counter(),
        }
        for key, value in self.__dict__.items():
            if key == "denoiser_ref":
                new.denoiser_ref = weakref.ref(copy.deepcopy(value(), memo))
            else:
                new.__dict__[key] = fresh[key] if key in fresh else copy.deepcopy(value, memo)
        if new.primary is not None:
            new.primary.companions.add(new)
        return new

    # ------------------------------------------------------------------------------- state
    @property
    def active(self) -> list[str]:
        return self.primary.active if self.primary is not None else self._active

    @active.setter
    def active(self, names: list[str]) -> None:
        self._active = names

    @property
    def scales(self) -> dict[str, float]:
        return self.primary.scales if self.primary is not None else self._scales

    @property
    def enabled(self) -> bool:
        return self.primary.enabled if self.primary is not None else self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = value

    @property
    def thread_selections(self) -> int:
        return self.primary.thread_selections if self.primary is not None else self._thread_selections

    def selection(self) -> tuple[list[str] | tuple[str, ...], dict[str, float]]:
        """``(active names, scales)`` in force for the calling thread (see :func:`use_adapters`)."""
        overrides = _SELECTION.get()
        owner = id(self.primary) if self.primary is not None else id(self)
        if overrides is not None and owner in overrides:
            return overrides[owner]
        return self.active, self.scales

    def applies(self) -> bool:
        """Whether any adapter acts on the projections now (in the calling thread)."""
        active, scales = self.selection()
        return self.enabled and any(scales.get(name, 0.0) != 0.0 for name in active)

    def routing_key(self, participants: list[tuple[str, CPEAdapter, float]] | None = None) -> tuple:
        """What the routed residual depends on besides the embedding: who takes part, at what scale
        (of ``participants`` when the caller has them already), and the autocast state."""
        participants = self.participants() if participants is None else participants
        return (*((name, id(adapter), scale) for name, adapter, scale in participants), _autocast_state())

    @contextlib.contextmanager
    def thread_selection(self, names: list[str], scales: dict[str, float]) -> Iterator[None]:
        """Use ``names`` at ``scales`` in the calling thread only, for the duration of the block."""
        current = dict(_SELECTION.get() or {})
        current[id(self)] = (tuple(names), dict(scales))
        token = _SELECTION.set(current)
        with self._lock:
            self._thread_selections += 1
            self._held.update(names)
            self.bump()
        try:
            yield
        finally:
            try:
                _SELECTION.reset(token)
            except ValueError:  # left in another context (a generator stepped from a copied one)
                left = dict(_SELECTION.get() or {})
                left.pop(id(self), None)
                _SELECTION.set(left)
            with self._lock:  # whatever context the block ends in, its counts come back
                self._thread_selections -= 1
                self._held.subtract(names)
                self._held += Counter()  # drop the names no block holds any more
                self.bump()

    def check_not_held(self, names: list[str]) -> None:
        """Refuse to unload adapters that an open ``use_cpe_adapters`` block (in any thread) has chosen:
        the block would lose their erasure without a word."""
        held = sorted({name for name in names if self._held[name] > 0})
        if held:
            raise CPEAdapterError(
                f"Adapter(s) {held} are in use by an open `use_cpe_adapters` block (in this or another thread); "
                "unload them after the block ends."
            )

    def bump(self) -> None:
        """Invalidate every cached projection (adapters, active set, scales or their weights changed)."""
        with self._lock:
            self.generation += 1
            self._cache.clear()
            self._route_memo.clear()
            self._concept_sets = ((), [])
            self._state = self._snapshot()
            _watched_adapters.update(self.adapters.values())
            self._watched = [p for adapter in self.adapters.values() for p in adapter.parameters()]
            self._param_versions = _param_state(self._watched)
            # With per-thread selections, any loaded adapter may act in some thread: every layer
            # then takes the checked path (never the prepared fast path, which is shared). Without
            # one, the shared state decides, never the calling context's: a context copied inside a
            # block that has ended still holds that block's choice.
            shared = any(self.scales.get(name, 0.0) != 0.0 for name in self.active)
            active = self.enabled and (self.thread_selections > 0 or shared)
            for wrapper in self._wrappers:
                wrapper.__dict__["cpe_active"] = active
                wrapper.__dict__["cpe_prepared"] = None
        for companion in list(self.companions):
            companion.bump()

    def _snapshot(self) -> tuple:
        active = tuple(self.active)
        return (
            self.enabled,
            active,
            tuple(self.scales.get(n, 0.0) for n in active),
            tuple(id(self.adapters.get(n)) for n in active),
        )

    def sync(self) -> None:
        """Bump if the active set, scales or adapter parameters changed since the last bump."""
        if self._snapshot() != self._state or _param_state(self._watched) != self._param_versions:
            self.bump()

    def participants(self) -> list[tuple[str, CPEAdapter, float]]:
        """Active adapters at non-zero scale, in name order (ties in routing break by name)."""
        active, scales = self.selection()
        return [
            (n, self.adapters[n], scales[n]) for n in sorted(active) if n in self.adapters and scales.get(n, 0.0) != 0.0
        ]

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
        """Wrap every target projection (idempotent) and install the forward hooks."""
        denoiser = self.denoiser_ref()
        if any(True for _ in self.wrapped_layers()):
            return
        self.check_unfused()
        index = 0
        wrappers, slots = [], []
        attentions = cross_attention_modules(denoiser)
        for _, attn in attentions:
            for proj in ("to_k", "to_v"):
                parent, attr, linear = innermost_linear(getattr(attn, proj))
                if parent is None:
                    parent, attr = attn, proj
                wrapper = CPELinear(linear, self, index)
                carry_offload_hook(linear, wrapper)
                carry_cast_hook(linear, wrapper)
                setattr(parent, attr, wrapper)
                wrappers.append(wrapper)
                slots.append((attn, proj, wrapper))
                index += 1
        self._wrappers, self._slots = wrappers, slots
        self._links = _links_to(denoiser, [path for path, _ in attentions])
        self._hooks = [
            denoiser.register_forward_pre_hook(_before_forward, with_kwargs=True),
            denoiser.register_forward_hook(_after_forward, always_call=True),
        ]

    def check_unfused(self) -> None:
        """Refuse fused cross-attention projections: a fused ``to_kv`` bypasses the wrapped layers."""
        fused = [path for path, attn in cross_attention_modules(self.denoiser_ref()) if is_fused(attn)]
        if fused:
            raise CPEAdapterError(
                f"Cross-attention projections are fused ({fused[0]} and {len(fused) - 1} more); fused to_kv bypasses "
                "the eraser. Call `pipe.unfuse_qkv_projections()` before loading CPE adapters."
            )

    def detach(self) -> None:
        """Put plain ``nn.Linear`` layers back (sharing the current parameters) and drop the hooks."""
        for parent, attr, wrapper in list(self.wrapped_layers()):
            original = wrapper.cpe_original
            original.weight = wrapper.weight
            original.bias = wrapper.bias
            carry_offload_hook(wrapper, original)
            carry_cast_hook(wrapper, original)
            setattr(parent, attr, original)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.clear_cache()
        self._wrappers, self._slots, self._links = [], [], []

    def verify(self, full: bool = False) -> None:
        """Fail closed: raise if an active erasure could not be applied by the next forward.

        The whole module tree is scanned only when a submodule or parameter was registered on one
        of its modules since the last scan that passed, the adapters changed, or ``full`` is set;
        otherwise the wrapped projections' shapes are checked (a ``.data`` swap registers nothing).
        """
        if not self.applies():
            return
        edits = _tree_edits
        if not full and self._verified == (edits, self.generation):
            for wrapper in self._wrappers:
                if wrapper.weight.shape != (wrapper.out_features, wrapper.in_features):
                    break
            else:
                return
        self._verified = None
        denoiser = self.denoiser_ref()
        _watched_modules.update(denoiser.modules())
        attentions = cross_attention_modules(denoiser)
        wrapped = 0
        for path, attn in attentions:
            if is_fused(attn):
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
        self._links = _links_to(denoiser, [path for path, _ in attentions])
        self._verified = (edits, self.generation)

    def _check_slots(self) -> None:
        """Per-forward integrity check: each wrapper still where it was put, no fused projections.

        Costs a few dictionary lookups per layer and one counter comparison; after any submodule
        or parameter registration, or anything unusual here, it falls through to :meth:`verify`,
        which rescans the whole tree (a block swapped in between two steps of one prompt included).
        """
        if self._verified != (_tree_edits, self.generation):
            self.verify()
        for parent, key, child in self._links:
            if parent._modules.get(key) is not child:  # a container edited without registration
                self.verify(full=True)
                return
        for attn, proj, wrapper in self._slots:
            module = attn._modules.get(proj)
            moved = module is not wrapper and innermost_linear(module)[2] is not wrapper
            if moved or (attn.__dict__.get("fused_projections", False) and is_fused(attn)):
                self.verify(full=True)
                return

    # ---------------------------------------------------------------------------- forward hooks
    def before_forward(self, embeds: Any, controlled: bool = False) -> None:
        """Prepare every wrapper's projection of ``embeds`` for this denoiser call.

        Runs once per UNet forward: notices state changes, checks integrity and, from the cache or
        freshly when the weights sit on the embedding's device, hands each wrapper ``(E, P'(E))``.
        ``controlled``: the call carries ControlNet residuals, which must come from an erased
        ControlNet (see :meth:`_check_controlnets`).
        """
        if self.primary is not None:
            runs = self.primary._companion_runs
            runs.count = getattr(runs, "count", 0) + 1
            self._check_siblings()
        self._forward_residual.value, self._forward_residual.inside = None, True  # shared within this forward
        self.sync()
        if not self.applies():
            self._companion_runs.count = 0
            return
        self._check_controlnets(controlled)
        if not (
            self._embeds_reach_layers
            and isinstance(embeds, torch.Tensor)
            and embeds.dim() in (2, 3)
            and embeds.shape[-1] == self.layers[0].in_features
            and self._cacheable(embeds, projections=True)
        ):
            self.verify()  # the layers compute on their own; check the whole UNet once per call
            return
        with self._lock:  # a selection made in another thread bumps under this lock: never in between
            if self.thread_selections:
                self.verify()  # threads choose their own adapters: layers look up their own entries
                return
            self._check_slots()
            entry = self._lookup(embeds)
            for wrapper in self._wrappers:
                out = self._cached_output(entry, wrapper)
                weight = wrapper.weight
                if out is None and weight.device == embeds.device and weight.dtype == embeds.dtype:
                    # Otherwise a hook brings the weights in at the layer's own call (sequential offload
                    # to the execution device, layerwise casting to the compute dtype): computed there.
                    out = self._compute_output(entry, wrapper, embeds)
                wrapper.__dict__["cpe_prepared"] = None if out is None else (embeds, out)

    def _check_controlnets(self, controlled: bool) -> None:
        """Fail closed on ControlNet residuals from a ControlNet that does not follow this erasure.

        A ControlNet reads the prompt through cross-attention layers of its own, so one the erasure
        never reached (attached after the adapters were loaded, in a pipeline none of the
        ``*_cpe_adapter*`` calls has seen) would hand the erased concept back through its residuals.
        Erased ControlNets count their runs here; residuals with none since the last call are refused.
        """
        runs = getattr(self._companion_runs, "count", 0)
        self._companion_runs.count = 0
        if controlled and self.primary is None and runs == 0:
            raise ErasureIntegrityError(
                "The UNet received ControlNet residuals, but no ControlNet carrying the active CPE erasure ran "
                "before it: a ControlNet attached after the adapters were loaded would bring the erased concepts "
                "back. Call `pipe.enable_cpe_adapters()` on the pipeline that holds the ControlNet (it erases "
                "that pipeline's ControlNets too), or `pipe.disable_cpe_adapters()` to run without erasure."
            )

    def _check_siblings(self) -> None:
        """Fail closed when this erased ControlNet runs inside a ``MultiControlNetModel`` next to a net
        that does not follow the same erasure.

        The UNet's check (:meth:`_check_controlnets`) sees only the summed residuals of all nets, so one
        erased net would let an unerased sibling through. A multi that a ``*_cpe_adapter*`` call has
        seen erases nets put into it before it runs (``controlnets._erase_nets_added_in_place``); one
        it has not seen (a pipeline built later with ``controlnet=[...]``) is found here, as the
        ``self`` of the frame that called this net, a few frames up.
        """
        net = self.denoiser_ref()
        frame = sys._getframe(1)
        for _ in range(SIBLING_FRAMES):
            frame = frame.f_back
            if frame is None:
                return
            code = frame.f_code
            # ``f_locals`` only of a multi's ``forward``: reading it stores a snapshot of the frame's
            # locals on the frame, which would keep a caller's dropped objects alive while it runs.
            if code.co_name != "forward" or "nets" not in code.co_names:
                continue
            caller = frame.f_locals.get("self")
            nets = getattr(caller, "nets", None) if isinstance(caller, nn.Module) else None
            if isinstance(nets, nn.ModuleList) and any(n is net for n in nets):
                strangers = [n for n in nets if getattr(get_runtime(n), "primary", None) is not self.primary]
                if strangers and self.primary.applies():
                    raise ErasureIntegrityError(
                        f"A MultiControlNetModel runs {len(strangers)} ControlNet(s) that do not carry the active CPE "
                        "erasure next to one that does; their residuals would bring the erased concepts back. Call "
                        "`pipe.enable_cpe_adapters()` on the pipeline that holds it (it erases that pipeline's "
                        "ControlNets too), or `pipe.disable_cpe_adapters()` to run without erasure."
                    )
                return

    def after_forward(self) -> None:
        """Take the prepared projections back (a direct layer call later re-checks everything)."""
        self._forward_residual.value, self._forward_residual.inside = None, False
        for wrapper in self._wrappers:
            wrapper.__dict__["cpe_prepared"] = None

    # --------------------------------------------------------------------------- computing
    def _follow(self, adapter: CPEAdapter, like: torch.Tensor) -> None:
        ref = adapter.gate_v
        if ref.device != like.device or ref.dtype != like.dtype:
            # Never as inference tensors (a call under ``torch.inference_mode``): those have no
            # version counter, so a later in-place edit of the adapter would go unnoticed.
            with torch.inference_mode(False):
                adapter.to(device=like.device, dtype=like.dtype)
            adapter.check_finite(
                f"overflows in {like.dtype}, the dtype the pipeline was moved to after loading, and would turn "
                "erased images into NaN; move the pipeline back to a wider dtype, or load the adapter into it again."
            )

    def residual(self, embeds: torch.Tensor, like: torch.Tensor, remember: bool = False) -> torch.Tensor | None:
        """Routed residual of every layer for ``embeds`` ``[B, T, d]``: ``[B, T, sum(d_out)]``.

        Per token, the concept with the largest gate over all participating adapters wins
        (docs/concepts.md); only its residual is applied, times its adapter's scale
        (:mod:`~cpe_adapter.routing`). Each row is routed on its own; with ``remember`` (callers
        that may cache, so nothing needs autograd) the routing of recurring rows, such as the
        negative prompt of every call, comes from the :class:`~cpe_adapter.routing.RouteMemo`.
        Nothing waits on the device except the memo's one row comparison.
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
        state = (self.generation, self.routing_key(participants), like.dtype, like.device)
        if torch.is_grad_enabled() and any(p.requires_grad for _, a, _ in participants for p in a.parameters()):
            sets = concept_sets(participants)  # stacked copies would carry this call's autograd graph
        else:
            cached = self._concept_sets  # read once: threads with their own selections replace it
            if cached[0] != state:
                cached = self._concept_sets = (state, concept_sets(participants))
            sets = cached[1]
        if remember:
            routes = self._route_memo.routes(embeds, sets, state)
        else:
            routes = [route_row(row, sets) for row in embeds.split(1)]
        layer_sizes = [t.out_features for t in self.layers]
        residual = torch.stack([row_residual(route, sets, layer_sizes) for route in routes])
        return residual.squeeze(0) if squeeze else residual

    def project(self, layer: CPELinear, x: torch.Tensor) -> torch.Tensor:
        """``P(x) + R(x)`` for one wrapped layer, served from the per-prompt cache when valid.

        Three levels: everything cached (inference); only the residual cached (autograd needs the
        base weights, e.g. a UNet called outside ``torch.no_grad()``); nothing cached (autograd
        needs the embedding or the adapters, or the cache is switched off).
        """
        self.sync()
        if not self.applies():
            return F.linear(x, layer.weight, layer.bias)
        start, stop = self.layer_offsets[layer.cpe_index], self.layer_offsets[layer.cpe_index + 1]
        if not self._cacheable(x, projections=False):
            return (
                F.linear(x, layer.weight, layer.bias) + self._forward_shared_residual(x, layer.weight)[..., start:stop]
            )
        with self._lock:
            entry = self._lookup(x)
            if not self._cacheable(x, projections=True):
                residual = self._entry_residual(entry, x, layer.weight)
                return F.linear(x, layer.weight, layer.bias) + residual[..., start:stop]
            out = self._cached_output(entry, layer)
            return self._compute_output(entry, layer, x) if out is None else out

    def _forward_shared_residual(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The residual of every layer for ``x`` when autograd needs it (nothing may be cached across
        calls): computed by the first layer of a denoiser forward and shared by the others, whose
        gradients then meet in one graph, instead of routing once per layer. Outside a forward
        (a layer called directly) it is computed per call."""
        local = self._forward_residual
        if not getattr(local, "inside", False):
            return self.residual(x, weight)
        key = (x, _version_of(x), self.generation, weight.dtype, weight.device)
        shared = getattr(local, "value", None)
        if shared is not None and shared[0][0] is x and shared[0][1:] == key[1:]:
            return shared[1]
        residual = self.residual(x, weight)
        local.value = (key, residual)
        return residual

    def _cacheable(self, x: torch.Tensor, projections: bool) -> bool:
        """Whether the residual (and, with ``projections``, the full outputs) may be cached for ``x``."""
        if not (self.cache_enabled and cache_globally_enabled()) or self.thread_selections:
            return False  # per-thread choices (use_cpe_adapters) share nothing: each call computes its own
        if not torch.is_grad_enabled():
            return True
        if x.requires_grad or any(p.requires_grad for p in self._watched):
            return False
        if not projections:
            return True
        return not any(w.weight.requires_grad or (w.bias is not None and w.bias.requires_grad) for w in self._wrappers)

    @staticmethod
    def _projection_cacheable(layer: CPELinear) -> bool:
        """Whether ``layer``'s full output may be cached: not with weights that are inference
        tensors, which have no version counter, so an in-place edit of them could not be seen."""
        return not (layer.weight.is_inference() or (layer.bias is not None and layer.bias.is_inference()))

    def _cached_output(self, entry: _PromptEntry, layer: CPELinear) -> torch.Tensor | None:
        cached = entry.projections.get(layer.cpe_index)
        if cached is None:
            return None
        outer = self._outer(layer)
        out, signature = cached
        if signature != (*_weight_signature(layer, outer), _version_of(out)):
            return None
        if out.is_inference() and (layer._forward_hooks or (outer is not None and outer._forward_hooks)):
            return None  # a hook may edit what it is given, and an inference tensor shows no edit
        return out

    def _outer(self, layer: CPELinear) -> nn.Module | None:
        """The module in ``layer``'s slot (a PEFT layer wrapping it, or ``layer`` itself)."""
        slots = self._slots
        index = layer.cpe_index
        if index < len(slots) and slots[index][2] is layer:
            attn, proj, _ = slots[index]
            return attn._modules.get(proj)
        return None

    def _entry_residual(self, entry: _PromptEntry, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        residual = entry.residual
        if residual is None or residual.device != weight.device or residual.dtype != weight.dtype:
            residual = entry.residual = self.residual(x, weight, remember=True)
        return residual

    def _compute_output(self, entry: _PromptEntry, layer: CPELinear, x: torch.Tensor) -> torch.Tensor:
        weight = layer.weight
        residual = self._entry_residual(entry, x, weight)
        start, stop = self.layer_offsets[layer.cpe_index], self.layer_offsets[layer.cpe_index + 1]
        out = F.linear(x, weight, layer.bias) + residual[..., start:stop]
        if not self._projection_cacheable(layer):
            return out  # computed afresh on every call; the residual stays cached
        entry.projections[layer.cpe_index] = (out, (*_weight_signature(layer, self._outer(layer)), _version_of(out)))
        if len(entry.projections) == len(self.layers):
            entry.residual = None  # every layer has its projection; recomputed only if one goes stale
        return out

    def _lookup(self, x: torch.Tensor) -> _PromptEntry:
        """The live cache entry for the embedding tensor ``x`` (a new, empty one if none is valid)."""
        key = id(x)
        entry = self._cache.get(key)
        if (
            entry is not None
            and entry.embeds_ref() is x
            and entry.version == _version_of(x)
            and entry.generation == self.generation
            and entry.routing == self.routing_key()
            and _unchanged_inference_tensor(entry.snapshot, x)
        ):
            self._cache.move_to_end(key)
            return entry
        self.verify()
        cache = self._cache

        lock = self._lock

        def forget(ref: weakref.ref, key: int = key) -> None:
            with lock:
                stale = cache.get(key)
                if stale is not None and stale.embeds_ref is ref:
                    cache.pop(key, None)

        entry = _PromptEntry(
            embeds_ref=weakref.ref(x, forget),
            version=_version_of(x),
            generation=self.generation,
            routing=self.routing_key(),
            snapshot=x.clone() if x.is_inference() else None,
        )
        cache[key] = entry
        cache.move_to_end(key)
        while len(cache) > CACHE_ENTRIES:
            cache.popitem(last=False)
        return entry

    def cached_bytes(self) -> int:
        """Bytes held by the per-prompt cache now (projections and any pending residuals)."""
        with self._lock:
            total = 0
            for entry in self._cache.values():
                if entry.residual is not None:
                    total += entry.residual.numel() * entry.residual.element_size()
                total += sum(out.numel() * out.element_size() for out, _ in entry.projections.values())
            return total

    def routing_bytes(self) -> int:
        """Bytes held for routing: remembered routes of recurring rows, stacked concept sets.

        See :class:`~cpe_adapter.routing.RouteMemo` and :func:`~cpe_adapter.routing.concept_sets`.
        """
        with self._lock:
            return self._route_memo.nbytes() + sum(s.nbytes() for s in self._concept_sets[1])

    def clear_cache(self) -> None:
        """Drop every cached projection."""
        with self._lock:
            self._cache.clear()
            self._route_memo.clear()
            self._concept_sets = ((), [])
            for wrapper in self._wrappers:
                wrapper.__dict__["cpe_prepared"] = None


def _links_to(root: nn.Module, paths: list[str]) -> list[tuple[nn.Module, str, nn.Module]]:
    """Every ``(parent, key, child)`` step from ``root`` down the dotted ``paths``, each once."""
    links: dict[tuple[int, str], tuple[nn.Module, str, nn.Module]] = {}
    for path in paths:
        parent = root
        for key in path.split("."):
            child = parent._modules[key]
            links[(id(parent), key)] = (parent, key, child)
            parent = child
    return list(links.values())


def _offsets(sizes: list[int]) -> list[int]:
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    return offsets


def _embeds_argument(args: tuple, kwargs: dict) -> Any:
    if "encoder_hidden_states" in kwargs:
        return kwargs["encoder_hidden_states"]
    return args[2] if len(args) > 2 else None


# Keyword arguments through which a UNet receives ControlNet residuals.
_CONTROLNET_RESIDUALS = ("down_block_additional_residuals", "mid_block_additional_residual")


def _before_forward_impl(module: nn.Module, args: tuple, kwargs: dict) -> None:
    runtime = module.__dict__.get(RUNTIME_ATTR)
    if runtime is not None:
        controlled = any(kwargs.get(name) is not None for name in _CONTROLNET_RESIDUALS)
        runtime.before_forward(_embeds_argument(args, kwargs), controlled)


def _after_forward_impl(module: nn.Module) -> None:
    runtime = module.__dict__.get(RUNTIME_ATTR)
    if runtime is not None:
        runtime.after_forward()


# The bookkeeping reads weak references, version counters and Python state that torch.compile
# must not trace; under compilation it runs eagerly, outside the graph, before and after it.
_before_forward_untraced = torch.compiler.disable(_before_forward_impl)
_after_forward_untraced = torch.compiler.disable(_after_forward_impl)


def _before_forward(module: nn.Module, args: tuple, kwargs: dict) -> None:
    if is_compiling():
        _before_forward_untraced(module, args, kwargs)
    else:
        _before_forward_impl(module, args, kwargs)


def _after_forward(module: nn.Module, args: tuple, output: Any) -> None:
    if is_compiling():
        _after_forward_untraced(module)
    else:
        _after_forward_impl(module)


def _autocast_state() -> tuple:
    """``torch.autocast`` as it is now on the CPU and CUDA: results made under it differ in dtype
    and bits, so cached projections and remembered routes are kept apart per state."""
    return tuple(
        (torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None) for kind in ("cpu", "cuda")
    )


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
