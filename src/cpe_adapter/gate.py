"""The Residual Attention Gate (ResAG) math, as pure functions on tensors.

For a prompt embedding ``E`` (T tokens x d) and concept ``c`` with gate parameters ``A_c``,
``B_c`` (d x m) and ``v_c`` (d):

1. token mixing ``S_c = softmax_rows((E A_c)(E B_c)^T)`` (no 1/sqrt(m), no mask);
2. mixed embedding ``Ē_c = S_c E``;
3. per-token gate ``g_c = sigmoid(Ē_c v_c)``;
4. residual for layer ``l``: ``R_l,c(E) = (alpha / r) (g_c ⊙ Ē_c) D_l,c U_l,c``.

Since ``Ē_c v_c = S_c (E v_c)``, the gate of every concept is found without forming ``Ē_c``;
``Ē`` is only built for the concept each token is routed to (top-1 over gate values, §3 of
METHOD.md). Everything here is batched over a concept axis ``N`` and a batch axis ``B``.
"""

from __future__ import annotations

import torch

# Concepts whose token-mixing matrices are formed at once; bounds memory at N x B x T x T.
GATE_CHUNK = 128


def token_mixing(embeds: torch.Tensor, gate_a: torch.Tensor, gate_b: torch.Tensor) -> torch.Tensor:
    """``S = softmax((E A)(E B)^T)`` for every concept: ``[B, T, d] -> [N, B, T, T]``."""
    queries = torch.einsum("btd,ndm->nbtm", embeds, gate_a)
    keys = queries if gate_b is gate_a else torch.einsum("btd,ndm->nbtm", embeds, gate_b)
    return torch.softmax(queries @ keys.transpose(-1, -2), dim=-1)


def gate_values(
    embeds: torch.Tensor, gate_a: torch.Tensor, gate_b: torch.Tensor, gate_v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate values ``g`` ``[N, B, T]`` and mixing matrices ``S`` ``[N, B, T, T]`` of N concepts."""
    mixing = token_mixing(embeds, gate_a, gate_b)
    projected = torch.einsum("btd,nd->nbt", embeds, gate_v)
    gates = torch.sigmoid((mixing @ projected.unsqueeze(-1)).squeeze(-1))
    return gates, mixing


def gated_mixed_embedding(
    embeds: torch.Tensor, gate_a: torch.Tensor, gate_b: torch.Tensor, gate_v: torch.Tensor
) -> torch.Tensor:
    """``g_c ⊙ (S_c E)`` for every concept: ``[B, T, d] -> [N, B, T, d]`` (used in training)."""
    gates, mixing = gate_values(embeds, gate_a, gate_b, gate_v)
    return gates.unsqueeze(-1) * (mixing @ embeds.unsqueeze(0))


def expand_residual(codes: torch.Tensor, up: torch.Tensor, layer_of_column: torch.Tensor) -> torch.Tensor:
    """Residuals of every layer, concatenated along the output axis.

    ``codes`` ``[..., L, r]`` are the low-rank codes ``H D_l``; ``up`` ``[..., r, sum(d_out)]`` holds
    every ``U_l`` side by side; ``layer_of_column`` maps each output column to its layer. Column
    ``o`` of the result is ``sum_k codes[l(o), k] * up[k, o]``: all layers in three kernels.
    """
    spread = codes.index_select(-2, layer_of_column)
    return (spread * up.transpose(-1, -2)).sum(-1)
