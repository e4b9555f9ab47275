"""Routing prompt rows over the participating adapters, and remembering rows that recur.

Per token (docs/concepts.md), the concept with the largest gate over all participating adapters wins,
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
# Participating adapters are stacked into one concept set (a copy of their weights) only while the
# copy stays below this size; larger ones are routed one adapter at a time, without a copy.
STACK_BYTES = 64 << 20

Participants = Sequence[tuple[str, CPEAdapter, float]]


@dataclass
class ConceptSet:
    """Concepts routed together: their gate and residual weights stacked on one concept axis.

    ``scales`` ``[N]`` holds each concept's ``scale · alpha / r`` (its adapter's user scale), so
    adapters of different alpha and scale share one set; they must share the gate rank ``m`` and
    the residual rank ``r``. ``gate_b`` is the key side of every concept (``A`` itself for a tied
    adapter), or ``None`` when every concept is tied.
    """

    gate_a: torch.Tensor
    gate_b: torch.Tensor | None
    gate_v: torch.Tensor
    down: torch.Tensor
    up: torch.Tensor
    scales: torch.Tensor
    rank: int
    copied: bool = False

    def nbytes(self) -> int:
        """Bytes this set holds of its own (the stacked copies; a single adapter's weights are shared)."""
        tensors = [self.scales]
        if self.copied:
            tensors += [t for t in (self.gate_a, self.gate_b, self.gate_v, self.down, self.up) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    @classmethod
    def of(cls, participants: Participants) -> ConceptSet:
        """One set of ``participants`` in order (no copy for a single adapter)."""
        adapters = [adapter for _, adapter, _ in participants]
        scales = [
            adapter.gate_v.new_full((adapter.num_concepts,), scale * adapter.residual_scale)
            for _, adapter, scale in participants
        ]
        tied = all(adapter.config.tie_gate_qk for adapter in adapters)

        def stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
            return tensors[0] if len(tensors) == 1 else torch.cat(tensors)

        return cls(
            gate_a=stacked([a.gate_a for a in adapters]),
            gate_b=None if tied else stacked([a.key_weight() for a in adapters]),
            gate_v=stacked([a.gate_v for a in adapters]),
            down=stacked([a.down for a in adapters]),
            up=stacked([a.up for a in adapters]),
            scales=stacked(scales),
            rank=adapters[0].config.residual_rank,
            copied=len(adapters) > 1,
        )


def concept_sets(participants: Participants) -> list[ConceptSet]:
    """The participants as few concept sets as possible, in name order.

    Consecutive adapters of the same gate and residual ranks share a set while the stacked copy
    stays within :data:`STACK_BYTES` (twenty one-concept adapters route as one 20-concept set); a
    set routes in one pass instead of one pass per adapter. Keeping name order keeps the tie rule:
    the first concept in name order wins a tie, within a set as across sets.
    """
    groups: list[list[tuple[str, CPEAdapter, float]]] = []
    size = 0
    for participant in participants:
        adapter = participant[1]
        nbytes = sum(p.numel() * p.element_size() for p in adapter.parameters())
        if groups:
            last = groups[-1][-1][1].config
            same = (last.gate_rank, last.residual_rank) == (adapter.config.gate_rank, adapter.config.residual_rank)
            if same and size + nbytes <= STACK_BYTES:
                groups[-1].append(participant)
                size += nbytes
                continue
        groups.append([participant])
        size = nbytes
    return [ConceptSet.of(group) for group in groups]


@dataclass
class Route:
    """The winner of every token of one prompt row: gate ``[T]``, concept ``[T]``, ``Ē`` ``[T, d]``, set ``[T]``."""

    gate: torch.Tensor
    index: torch.Tensor
    mixed: torch.Tensor
    owner: torch.Tensor


def route_row(row: torch.Tensor, sets: Sequence[ConceptSet]) -> Route:
    """Top-1 routing of one row ``[1, T, d]`` over every concept of every set.

    Each set's winner comes from :func:`~cpe_adapter.gate.best_concepts`; across sets the larger
    gate wins, and the earlier set keeps a tie.
    """
    best = None
    for position, concepts in enumerate(sets):
        gate, index, mixed = best_concepts(row, concepts.gate_a, concepts.gate_b, concepts.gate_v)
        if best is None:
            best = Route(gate[0], index[0], mixed[0], torch.zeros_like(index[0]))
            continue
        better = gate[0] > best.gate  # strict: the earlier set keeps a tie
        best = Route(
            torch.where(better, gate[0], best.gate),
            torch.where(better, index[0], best.index),
            torch.where(better.unsqueeze(-1), mixed[0], best.mixed),
            torch.where(better, position, best.owner),
        )
    return best


def row_residual(route: Route, sets: Sequence[ConceptSet], layer_sizes: Sequence[int]) -> torch.Tensor:
    """``scale(c*) · (alpha/r) · g_c*(t) · Ē_c*[t] D_c* U_c*`` of every token of a row: ``[T, sum(d_out)]``."""
    residual = None
    for position, concepts in enumerate(sets):
        if concepts.scales.shape[0] == 1:  # one concept: no per-token gather of index or scale
            index, weight = route.index, route.gate * concepts.scales
        else:
            index = route.index.clamp(max=concepts.scales.shape[0] - 1)
            weight = route.gate * concepts.scales[index]
        if len(sets) > 1:
            weight = weight * (route.owner == position).to(weight.dtype)
        part = routed_residual(
            weight.unsqueeze(-1) * route.mixed, index, concepts.down, concepts.up, layer_sizes, concepts.rank
        )
        residual = part if residual is None else residual + part
    return residual


class RouteMemo:
    """The routing of the last :data:`ROUTE_MEMO_ROWS` distinct rows, valid for one routing state.

    ``state`` names everything a route depends on besides the row (the participating adapters and
    their weights' generation, dtype and device); a different state empties the memo. Rows are
    found by a fingerprint (each row's sum, one reduction and one host sync for the whole batch)
    and confirmed by an exact comparison, so a route is only ever served for an equal row.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = ROUTE_MEMO_ROWS if capacity is None else capacity
        self.state: tuple | None = None
        self.rows: list[tuple[torch.Tensor, Route, float]] = []

    def clear(self) -> None:
        self.state, self.rows = None, []

    def nbytes(self) -> int:
        """Bytes held by the remembered rows and their routes."""
        tensors = [t for row, route, _ in self.rows for t in (row, route.gate, route.index, route.mixed, route.owner)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def routes(self, embeds: torch.Tensor, sets: Sequence[ConceptSet], state: tuple) -> list[Route]:
        """The route of every row of ``embeds`` ``[B, T, d]``; each distinct row is routed at most once."""
        if state != self.state:
            self.clear()
            self.state = state
        rows = list(embeds.split(1))
        keys = fingerprints(embeds)
        routes: list[Route] = []
        for position, (row, key) in enumerate(zip(rows, keys, strict=True)):
            hit = next((seen for stored, seen, k in self.rows if k == key and _same(stored, row[0])), None)
            if hit is None:
                twin = next((j for j in range(position) if keys[j] == key and _same(rows[j], row)), None)
                hit = routes[twin] if twin is not None else route_row(row, sets)
            routes.append(hit)
        for row, route, key in zip(rows, routes, keys, strict=True):
            known = next((i for i, (_, seen, _) in enumerate(self.rows) if seen is route), None)
            self.rows.append(self.rows.pop(known) if known is not None else (row[0].detach().clone(), route, key))
        del self.rows[: max(0, len(self.rows) - self.capacity)]
        return routes


def fingerprints(embeds: torch.Tensor) -> list[float]:
    """Each row's sum (in float64): equal rows share it, so only rows that share it are compared."""
    return embeds.detach().flatten(1).sum(-1, dtype=torch.float64).tolist()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)
