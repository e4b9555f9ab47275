"""Routing prompt rows over the participating adapters, and remembering rows that recur.

METHOD.md §3: per token, the concept with the largest gate over all participating adapters wins,
and only its residual is applied, times its adapter's scale. The routing (every concept's gate) is
the part whose cost grows with the number of concepts, ``O(N·T·(d·m + T·m))`` per prompt row.

A pipeline call with classifier-free guidance routes two rows: the prompt and the negative
prompt, and the negative prompt is usually the same (``""``) on every call. :class:`RouteMemo`
keeps the routing of the last few rows seen (their embedding, winning gate, concept, mixed
embedding and owner, about ``2·T·d`` numbers each), so a recurring row is routed once, not on
every call. Rows are always routed one at a time, whether remembered or not: a matrix product's
last bits can depend on how many rows it is given, and a remembered row must equal a fresh one
bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .adapter import CPEAdapter
from .gate import best_concepts, routed_residual

# Prompt rows whose routing is remembered per denoiser (the negative prompt, recent prompts).
ROUTE_MEMO_ROWS = 8

Participants = Sequence[tuple[str, CPEAdapter, float]]


@dataclass
class Route:
    """The winner of every token of one prompt row: gate ``[T]``, concept ``[T]``, ``Ē`` ``[T, d]``, adapter ``[T]``."""

    gate: torch.Tensor
    index: torch.Tensor
    mixed: torch.Tensor
    owner: torch.Tensor


def route_row(row: torch.Tensor, participants: Participants) -> Route:
    """Top-1 routing of one row ``[1, T, d]`` over every concept of every participating adapter.

    Each adapter's own winner comes from :func:`~cpe_adapter.gate.best_concepts`; across adapters
    the larger gate wins, and the adapter first by name keeps a tie.
    """
    best = None
    for position, (_, adapter, _) in enumerate(participants):
        key = None if adapter.config.tie_gate_qk else adapter.gate_b
        gate, index, mixed = best_concepts(row, adapter.gate_a, key, adapter.gate_v)
        if best is None:
            best = Route(gate[0], index[0], mixed[0], torch.zeros_like(index[0]))
            continue
        better = gate[0] > best.gate  # strict: the adapter first by name keeps a tie
        best = Route(
            torch.where(better, gate[0], best.gate),
            torch.where(better, index[0], best.index),
            torch.where(better.unsqueeze(-1), mixed[0], best.mixed),
            torch.where(better, position, best.owner),
        )
    return best


def row_residual(route: Route, participants: Participants, layer_sizes: Sequence[int]) -> torch.Tensor:
    """``scale(c*) · (alpha/r) · g_c*(t) · Ē_c*[t] D_c* U_c*`` of every token of a row: ``[T, sum(d_out)]``."""
    residual = None
    for position, (_, adapter, scale) in enumerate(participants):
        weight = route.gate * (scale * adapter.residual_scale)
        if len(participants) > 1:
            weight = weight * (route.owner == position).to(weight.dtype)
        part = routed_residual(
            weight.unsqueeze(-1) * route.mixed,
            route.index.clamp(max=adapter.num_concepts - 1),
            adapter.down,
            adapter.up,
            layer_sizes,
            adapter.config.residual_rank,
        )
        residual = part if residual is None else residual + part
    return residual


class RouteMemo:
    """The routing of the last :data:`ROUTE_MEMO_ROWS` distinct rows, valid for one routing state.

    ``state`` names everything a route depends on besides the row (the participating adapters and
    their weights' generation, dtype and device); a different state empties the memo. Finding the
    rows costs one elementwise comparison against the remembered rows and one host sync.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = ROUTE_MEMO_ROWS if capacity is None else capacity
        self.state: tuple | None = None
        self.rows: list[tuple[torch.Tensor, Route]] = []

    def clear(self) -> None:
        self.state, self.rows = None, []

    def nbytes(self) -> int:
        """Bytes held by the remembered rows and their routes."""
        tensors = [t for row, route in self.rows for t in (row, route.gate, route.index, route.mixed, route.owner)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def routes(self, embeds: torch.Tensor, participants: Participants, state: tuple) -> list[Route]:
        """The route of every row of ``embeds`` ``[B, T, d]``; each distinct row is routed at most once."""
        if state != self.state:
            self.clear()
            self.state = state
        rows = list(embeds.split(1))
        routes: list[Route] = []
        for row, (hit, twin) in zip(rows, self._matches(embeds), strict=True):
            if hit is not None:
                routes.append(self.rows[hit][1])
            elif twin is not None:
                routes.append(routes[twin])
            else:
                routes.append(route_row(row, participants))
        for row, route in zip(rows, routes, strict=True):
            known = next((i for i, (_, seen) in enumerate(self.rows) if seen is route), None)
            self.rows.append(self.rows.pop(known) if known is not None else (row[0].detach().clone(), route))
        del self.rows[: max(0, len(self.rows) - self.capacity)]
        return routes

    def _matches(self, embeds: torch.Tensor) -> list[tuple[int | None, int | None]]:
        """Per row: the index of an equal remembered row, else of an equal earlier row of the batch."""
        stored = [i for i, (row, _) in enumerate(self.rows) if row.shape == embeds.shape[1:]]
        candidates = torch.cat([torch.stack([self.rows[i][0] for i in stored]), embeds]) if stored else embeds
        equal = (embeds.unsqueeze(1) == candidates.unsqueeze(0)).flatten(2).all(-1).tolist()
        found = []
        for position, same in enumerate(equal):
            hit = next((stored[k] for k in range(len(stored)) if same[k]), None)
            twin = next((j for j in range(position) if same[len(stored) + j]), None)
            found.append((hit, twin))
        return found
