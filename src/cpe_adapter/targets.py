"""Finding what an eraser acts on: a pipeline's denoiser and its cross-attention K/V projections.

An adapter covers the ``to_k`` and ``to_v`` projections of every cross-attention layer of a UNet
(docs/concepts.md); :func:`find_target_layers` lists them, with the dimensions read from the model,
in module order (the order of an adapter's ``target_layers``). PEFT wrappers are looked through
(:func:`innermost_linear`), and fused projections are recognised (:func:`is_fused`) so they can be
refused.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import TargetLayer
from .errors import CPEAdapterError
from .layer import CPELinear

__all__ = [
    "PROJECTED_TEXT",
    "cross_attention_modules",
    "denoiser_of",
    "find_target_layers",
    "innermost_linear",
    "is_fused",
]

# Forwards the eraser reproduces: nn.Linear's own, and its wrapper's (already attached).
_PLAIN_FORWARDS = (nn.Linear.forward, CPELinear.forward)


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
    # diffusers' Attention keeps ``is_cross_attention`` in its __dict__; looking there first spares
    # nn.Module.__getattr__'s slow miss on the hundreds of other modules (this runs once per prompt).
    flag = module.__dict__.get("is_cross_attention")
    if flag is None and hasattr(type(module), "is_cross_attention"):
        flag = module.is_cross_attention
    return bool(flag) and hasattr(module, "to_k") and hasattr(module, "to_v")


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
        if getattr(attn, "added_kv_proj_dim", None) is not None:
            raise CPEAdapterError(
                f"{path} reads the text through add_k_proj/add_v_proj, and its to_k/to_v project the image "
                "(a DeepFloyd IF or unCLIP UNet); cpe-adapter erases the text's to_k/to_v of SD 1.x, SD 2.x and "
                "SDXL UNets."
            )
        for proj in ("to_k", "to_v"):
            _, _, linear = innermost_linear(getattr(attn, proj))
            if not isinstance(linear, nn.Linear):
                raise CPEAdapterError(f"{path}.{proj} is a {type(linear).__name__}, not a linear projection.")
            if type(linear).forward not in _PLAIN_FORWARDS:
                raise CPEAdapterError(
                    f"{path}.{proj} is a {type(linear).__name__}, a linear layer with a forward of its own (a "
                    "quantized or custom layer, e.g. GGUF, bitsandbytes, quanto); the eraser computes the projection "
                    "from its weight and bias, so it cannot take that layer's place. Load the UNet unquantized."
                )
            layers.append(TargetLayer(f"{path}.{proj}", linear.in_features, linear.out_features))
    if not layers:
        raise CPEAdapterError(
            f"{type(denoiser).__name__} has no cross-attention layers (attn2.to_k/to_v); cpe-adapter needs a "
            "text-conditioned UNet."
        )
    return layers


def is_fused(attn: nn.Module) -> bool:
    """Whether this attention computes K/V through a fused ``to_kv`` instead of ``to_k``/``to_v``.

    Fusing builds ``to_kv`` *and* installs a ``Fused*`` processor; ``unfuse_qkv_projections``
    only restores the processors (``to_kv`` and ``fused_projections`` stay), after which
    ``to_k``/``to_v`` are used again. So the processor decides.
    """
    has_fused = bool(getattr(attn, "fused_projections", False)) or getattr(attn, "to_kv", None) is not None
    return has_fused and type(getattr(attn, "processor", None)).__name__.startswith("Fused")


# UNet ``encoder_hid_dim_type`` values whose cross-attention sees a projection of the UNet's
# ``encoder_hidden_states`` rather than the tensor itself (``ip_image_proj`` passes it through).
PROJECTED_TEXT = ("text_proj", "text_image_proj", "image_proj")
