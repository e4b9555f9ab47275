"""Layer weights ``c_l`` (docs/training.md): how much a change of K or V can move attention outputs.

For a cross-attention layer with query, value and output weights ``W_q``, ``W_v``, ``W_o`` and
``T`` text tokens, a change ``ΔK`` of the keys moves the attention output by at most
``σmax(W_o W_v) σmax(W_q) / T · ||ΔK||`` and a change ``ΔV`` of the values by at most
``σmax(W_o) ||ΔV||`` (σmax: the largest singular value). Training weighs each projection's loss
by these bounds and evaluation weighs each projection's change the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from .targets import cross_attention_modules, denoiser_of, innermost_linear


def _weight(module: nn.Module) -> torch.Tensor:
    return innermost_linear(module)[2].weight.detach().float()


def layer_weights(denoiser: nn.Module, tokens: int = 77) -> torch.Tensor:
    """``c_l`` of every target projection (``to_k``, ``to_v`` per attention, runtime order): ``[L]`` fp32 CPU."""
    if tokens < 1:
        raise ValueError(f"tokens must be a positive sequence length, got {tokens!r}.")
    weights = []
    with torch.no_grad():
        for _, attn in cross_attention_modules(denoiser_of(denoiser)):
            w_q, w_v = _weight(attn.to_q), _weight(attn.to_v)
            w_o = _weight(attn.to_out[0] if isinstance(attn.to_out, nn.ModuleList) else attn.to_out)
            weights.append(torch.linalg.matrix_norm(w_o @ w_v, ord=2) * torch.linalg.matrix_norm(w_q, ord=2) / tokens)
            weights.append(torch.linalg.matrix_norm(w_o, ord=2))
    return torch.stack(weights).float().cpu()
