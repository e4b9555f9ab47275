"""`CPELinear`: the wrapper that replaces a cross-attention ``to_k`` / ``to_v`` projection.

It *is* an ``nn.Linear`` (PEFT's LoRA wraps it like any linear layer, and fusing a LoRA writes
into the very ``weight`` it uses) and it shares the original layer's ``weight`` and ``bias``
parameters, so the denoiser's state dict keeps its keys and values. The erasure itself lives in
the denoiser's :class:`~cpe_adapter.runtime.CPERuntime`, which the layer reaches through a plain
attribute (not a submodule, so adapter weights never enter the denoiser's state dict).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .runtime import CPERuntime


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        runtime = self.cpe_runtime
        if not runtime.applies():
            return F.linear(x, self.weight, self.bias)
        return runtime.project(self, x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, cpe_index={self.cpe_index}"
