"""The erase, anchoring, adversarial and attack losses of training, as closed-form energies.

Every loss is a layer-weighted squared error of the form ``||u W^T + R(x)||²_w`` where ``x`` is
the embedding the gate reads, ``u`` an offset in *embedding* space whose projection is the base
error, ``W`` ``[sum(d_out), d]`` all target layers' frozen weights stacked (config.target_layers
order) and ``w`` the per-column weight ``c_l / (L * d_out_l)`` (so the sum is the mean over layers
of ``c_l`` times each layer's mean squared error; one more division by ``T`` averages tokens):

- erase: ``x = E_t``, ``u = (1 + eta)(E_t - E_n)`` — since ``P`` is affine, the erase error
  ``P(E_t) - (1 + eta) P(E_n) + eta P(E_t)`` is ``u W^T`` (the bias cancels);
- adversarial (erase stage): ``x = E_t + Delta``, ``u = (1 + eta)(E_t - E_n) + Delta``;
- anchoring: ``P'(x) - P(x) = R(x)``, so ``u = 0`` (no projection needed at all);
- attack: ``x = E_t + Delta``, ``u = Delta`` (distance to the *original* ``P(E_t)``).

With the residual ``R[t, o] = sum_k h[t, l(o), k] U[k, o]`` (``h`` the gated low-rank codes),

    ||u W^T + R||²_w = u G u^T + 2 <h, u M> + sum_l h_l Q_l h_l^T

where ``G = W^T diag(w) W`` (``d x d``, fixed), ``M[:, (l, k)] = W_l^T (w_l ⊙ U_l[k])``
(``d x L r``) and ``Q_l = U_l diag(w_l) U_l^T`` (``r x r``): the residual never has to be formed,
each step costs a few ``T x d x (2m + L r + 1)`` products, and the cost does not grow with the
UNet's channel widths. ``M`` and ``Q`` are rebuilt from ``U`` each step (cheap, grouped by
``d_out`` so every layer is one batched product).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import TargetLayer
from .lipschitz import layer_weights
from .targets import innermost_linear

__all__ = [
    "ProjectionStack",
    "base_energy",
    "build_stack",
    "codes_from_projection",
    "coupling",
    "cross_term",
    "gate_codes",
    "gate_matrix",
    "residual_energy",
]


@dataclass
class _Group:
    layers: torch.Tensor  # indices (into target layers) of the layers with this d_out
    columns: torch.Tensor  # their output columns, layer-major
    weight_t: torch.Tensor  # [n_g, d, d_out]: W_l^T of each layer


@dataclass
class ProjectionStack:
    """Frozen ``to_k``/``to_v`` weights of all target layers and their loss weights."""

    weight: torch.Tensor  # [sum_out, d]
    layer_weight: torch.Tensor  # [L] c_l
    column_weight: torch.Tensor  # [sum_out] c_l / (L * d_out_l)
    gram: torch.Tensor  # [d, d] W^T diag(w) W
    eigenvalues: torch.Tensor  # [d] of gram (clamped at 0)
    eigenvectors: torch.Tensor  # [d, d] orthonormal columns: gram = V diag(lambda) V^T
    groups: list[_Group]
    inverse: torch.Tensor  # position of each layer in the concatenation of the groups
    num_layers: int

    @property
    def dim(self) -> int:
        return self.weight.shape[1]


def projection_weights(denoiser: nn.Module, layers: list[TargetLayer]) -> torch.Tensor:
    """``[sum(d_out), d]``: the base weights of every target projection, in ``layers`` order."""
    modules = dict(denoiser.named_modules())
    parts = []
    for layer in layers:
        parent_path, _, proj = layer.name.rpartition(".")
        linear = innermost_linear(getattr(modules[parent_path], proj))[2]
        parts.append(linear.weight.detach().float())
    return torch.cat(parts)


def build_stack(denoiser: nn.Module, layers: list[TargetLayer], tokens: int, device: Any) -> ProjectionStack:
    """Everything fixed during training, computed once per pipeline (fp32, on ``device``)."""
    weight = projection_weights(denoiser, layers).to(device)
    c = layer_weights(denoiser, tokens).to(device)
    sizes = torch.tensor([t.out_features for t in layers], device=device)
    layer_of_column = torch.repeat_interleave(torch.arange(len(layers), device=device), sizes)
    column_weight = (c / (len(layers) * sizes.float()))[layer_of_column]
    gram = weight.T @ (column_weight.unsqueeze(1) * weight)
    gram = 0.5 * (gram + gram.T)
    offsets = torch.cumsum(sizes, 0) - sizes
    groups, order = [], []
    for size in sorted({t.out_features for t in layers}):
        idx = [i for i, t in enumerate(layers) if t.out_features == size]
        cols = torch.cat([torch.arange(int(offsets[i]), int(offsets[i]) + size, device=device) for i in idx])
        w_t = weight[cols].view(len(idx), size, -1).transpose(1, 2).contiguous()
        groups.append(_Group(torch.tensor(idx, device=device), cols, w_t))
        order += idx
    inverse = torch.empty(len(layers), dtype=torch.long, device=device)
    inverse[torch.tensor(order, device=device)] = torch.arange(len(layers), device=device)
    values, vectors = torch.linalg.eigh(gram.double())
    values, vectors = values.clamp_min(0).float(), vectors.float()
    return ProjectionStack(weight, c, column_weight, gram, values, vectors, groups, inverse, len(layers))


def coupling(stack: ProjectionStack, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``M`` ``[d, L*r]`` (layer-major) and ``Q`` ``[L, r, r]`` for the current ``U`` ``[r, sum_out]``."""
    rank = up.shape[0]
    weighted = up * stack.column_weight
    m_parts, q_parts = [], []
    for group in stack.groups:
        n_g, size = group.weight_t.shape[0], group.weight_t.shape[2]
        u_g = up[:, group.columns].view(rank, n_g, size).permute(1, 2, 0)
        wu_g = weighted[:, group.columns].view(rank, n_g, size).permute(1, 2, 0)
        m_parts.append(group.weight_t @ wu_g)  # [n_g, d, r]
        q_parts.append(u_g.transpose(1, 2) @ wu_g)  # [n_g, r, r]
    m = torch.cat(m_parts)[stack.inverse]
    q = torch.cat(q_parts)[stack.inverse]
    return m.permute(1, 0, 2).reshape(stack.dim, -1), q


# Width multiple of the ``[v | D]`` block: matrix kernels on CPU run several times faster on
# 16-wide operands than on, e.g., 9-wide ones, so the block is padded with zero columns.
GATE_BLOCK = 16


def gate_matrix(
    gate_a: torch.Tensor, gate_b: torch.Tensor | None, gate_v: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """``[A | B | v | D | 0]`` (``B`` left out when tied; zero columns pad ``[v | D | 0]`` to a multiple
    of ``GATE_BLOCK``): one product reads all of ``E``'s projections the gate and the residual need."""
    mats = [gate_a] if gate_b is None else [gate_a, gate_b]
    pad = -(1 + down.shape[1]) % GATE_BLOCK
    zeros = down.new_zeros(down.shape[0], pad)
    return torch.cat([*mats, gate_v.unsqueeze(1), down, zeros], dim=1)


def codes_from_projection(
    proj: torch.Tensor, rank: int, tied: bool, scale: float, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated low-rank codes ``h = scale * g ⊙ (S (E D))`` ``[n, T, width]`` and gates ``g`` ``[n, T]``
    from ``proj = E`` :func:`gate_matrix` (``rank`` = gate rank m, ``width`` = ``L r``).

    Uses ``S E D = S (E D)`` and ``Ē v = S (E v)``: the mixed embedding ``Ē`` (``T x d``) is never
    formed, and since ``proj`` is linear in ``E``, sums of embeddings (mixup, ``E_t + Delta``) can be
    projected piece by piece.
    """
    if tied:
        queries, rest = proj.split([rank, proj.shape[-1] - rank], dim=-1)
        keys = queries
    else:
        queries, keys, rest = proj.split([rank, rank, proj.shape[-1] - 2 * rank], dim=-1)
    mixing = torch.softmax(queries @ keys.transpose(-1, -2), dim=-1)
    mixed = mixing @ rest
    gates = torch.sigmoid(mixed[..., 0])
    return scale * gates.unsqueeze(-1) * mixed[..., 1 : 1 + width], gates


def gate_codes(
    embeds: torch.Tensor,
    gate_a: torch.Tensor,
    gate_b: torch.Tensor | None,
    gate_v: torch.Tensor,
    down: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and gates of :func:`codes_from_projection` for embeddings ``[n, T, d]``
    (``gate_b=None`` ties the key side to ``gate_a``, as ``tie_gate_qk``)."""
    proj = embeds @ gate_matrix(gate_a, gate_b, gate_v, down)
    return codes_from_projection(proj, gate_a.shape[1], gate_b is None, scale, down.shape[1])


def residual_energy(codes: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``mean_t sum_l h_l Q_l h_l^T`` per sample: ``||R||²_w`` averaged over tokens, ``[n]``."""
    layers, rank = q.shape[0], q.shape[1]
    h = codes.unflatten(-1, (layers, rank))
    return torch.einsum("ntlk,lkj,ntlj->n", h, q, h) / codes.shape[1]


def cross_term(codes: torch.Tensor, offsets: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``mean_t 2 <h, u M>`` per sample ``[n]`` for codes ``[n, T, Lr]`` and offsets ``u`` ``[n, T, d]``."""
    return 2.0 * (codes * (offsets @ m)).sum((-1, -2)) / codes.shape[1]


class _QuadraticForm(torch.autograd.Function):
    """``sum_t x_t G x_t^T`` per sample with one matrix product (G symmetric: the gradient is ``2 x G``);
    a 1-d ``G`` is a diagonal, applied elementwise."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        y = x * gram if gram.dim() == 1 else x @ gram
        ctx.save_for_backward(y)
        return (x * y).sum((-1, -2))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (y,) = ctx.saved_tensors
        return 2.0 * y * grad.view(-1, 1, 1), None


def base_energy(offsets: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``mean_t u G u^T`` per sample ``[n]``: the weighted error with no residual (differentiable in ``u``;
    a 1-d ``gram`` is a diagonal)."""
    return _QuadraticForm.apply(offsets, gram) / offsets.shape[1]
