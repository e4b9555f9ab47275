"""`CPELinear`: the wrapper that replaces a cross-attention ``to_k`` / ``to_v`` projection.

It *is* an ``nn.Linear`` (PEFT's LoRA wraps it like any linear layer, and fusing a LoRA writes
into the very ``weight`` it uses) and it shares the original layer's ``weight`` and ``bias``
parameters, so the denoiser's state dict keeps its keys and values. The erasure itself lives in
the denoiser's :class:`~cpe_adapter.runtime.CPERuntime`, which the layer reaches through a plain
attribute (not a submodule, so adapter weights never enter the denoiser's state dict).

The forward is written for ``torch.compile``: it reads two plain attributes the runtime sets
(``cpe_active``: whether any erasure applies; ``cpe_prepared``: ``(E, P'(E))`` for the prompt
of the current UNet call) and makes one identity test, so a compiled UNet serves the cached
projection without a graph break. Changing scales or the active set does not change what the
graph sees; only switching erasure on/off, or whether a projection is prepared, selects one of
two graphs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .runtime import CPERuntime


def is_compiling() -> bool:
    """Whether ``torch.compile`` is tracing the caller (False on torch versions without the query)."""
    check = getattr(torch.compiler, "is_compiling", None)
    return bool(check()) if check is not None else False


def _project(layer: CPELinear, x: torch.Tensor) -> torch.Tensor:
    return layer.cpe_runtime.project(layer, x)


# The full path (cache lookup by weak reference, version checks) runs outside compiled graphs.
_project_untraced = torch.compiler.disable(_project)


class CPELinear(nn.Linear):
    """``P'(E) = P(E) + R(E)``: a linear projection plus the routed ResAG residual."""

    def __init__(self, original: nn.Linear, runtime: CPERuntime, index: int) -> None:
        nn.Module.__init__(self)
        self.in_features = original.in_features
        self.out_features = original.out_features
        self.weight = original.weight
        self.bias = original.bias
        self.cpe_index = index
        # Plain attributes: neither becomes a submodule nor enters state_dict().
        self.__dict__["cpe_runtime"] = runtime
        self.__dict__["cpe_original"] = original
        self.__dict__["cpe_active"] = False
        self.__dict__["cpe_prepared"] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cpe_active:
            return F.linear(x, self.weight, self.bias)
        prepared = self.cpe_prepared
        if prepared is not None and x is prepared[0]:
            return prepared[1]
        if is_compiling():
            return _project_untraced(self, x)
        return _project(self, x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, cpe_index={self.cpe_index}"
