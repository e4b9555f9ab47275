"""Red-teaming an erasure: a prompt attack (text only) and a norm-bounded embedding attack.

Both attacks look for an input whose *erased* cross-attention K/V (``P'``) come as close as possible
to the *original* K/V (``P``, adapters disabled) of the target prompt ``E_t``, in the layer-weighted
distance ``d(x) = sqrt(sum_l c_l ||P'_l(x) - P_l(E_t)||^2)``. The erasure leaves a gap
``d_0 = d(E_t)``; an attack that reaches ``d_best`` *recovers* ``clip(1 - d_best / d_0, 0, 1)`` of it
(0 = the attack gains nothing, 1 = the original K/V are back).

- :func:`prompt_attack` is the threat of a service whose users control only the text: a greedy
  coordinate search over token substitutions and insertions drawn from the tokenizer's vocabulary,
  with a fixed budget of candidate prompts, each encoded by the pipeline's own text encoder
  (candidates are batched). Candidates are real strings, so the best prompt can be typed in.
- :func:`embedding_attack` adds a perturbation ``Delta`` to the text embedding, bounded per token by
  ``||Delta_t|| <= eps ||E_t||``, found by projected normalised gradient descent. Unbounded
  perturbations recover nearly everything for every known erasure, so the budget is part of the figure.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .errors import CPEAdapterError
from .training_data import tokenizers_of

if TYPE_CHECKING:
    from .evaluation import KVProbe

__all__ = [
    "EmbeddingAttackResult",
    "PromptAttackResult",
    "coordinate_search",
    "embedding_attack",
    "prompt_attack",
    "recovery",
]


def recovery(start_distance: float, best_distance: float) -> float:
    """Fraction of the erased gap an attack closes, ``clip(1 - best / start, 0, 1)`` (0 when no gap)."""
    if not start_distance > 1e-12:
        return 0.0
    return float(min(1.0, max(0.0, 1.0 - best_distance / start_distance)))


@dataclass
class PromptAttackResult:
    """Outcome of :func:`prompt_attack`.

    Attributes:
        prompt: the attacked (erased) prompt.
        best_prompt: the candidate whose erased K/V came closest to the original K/V of ``prompt``.
        start_distance: ``d_0``, the distance of ``prompt``'s own erased K/V.
        best_distance: the distance reached by ``best_prompt``.
        recovery: ``clip(1 - best_distance / start_distance, 0, 1)``.
        evaluations: candidate prompts encoded (at most the budget).
        history: best distance after each batch of candidates (non-increasing).
    """

    prompt: str
    best_prompt: str
    start_distance: float
    best_distance: float
    recovery: float
    evaluations: int
    history: list[float] = field(default_factory=list)


@dataclass
class EmbeddingAttackResult:
    """Outcome of :func:`embedding_attack` (``delta`` is the best perturbation, ``[T, d]``)."""

    prompt: str
    epsilon: float
    start_distance: float
    best_distance: float
    recovery: float
    max_norm_ratio: float
    history: list[float] = field(default_factory=list)
    delta: torch.Tensor | None = None


def _distances(probe: KVProbe, embeds: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    from .evaluation import weighted_distance

    with torch.no_grad():
        return weighted_distance(probe.project(embeds, original=False), reference, probe.column_weights)


def _vocabulary(tokenizer: object) -> list[int]:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return [i for i in range(len(tokenizer)) if i not in special]


def coordinate_search(
    tokenizer: Any,
    start: str,
    score: Callable[[list[str]], torch.Tensor],
    *,
    budget: int,
    batch_size: int = 32,
    seed: int = 0,
    start_score: float | None = None,
) -> tuple[str, float, int, list[float]]:
    """Greedy coordinate search over token substitutions and insertions, minimising ``score``.

    Each round picks one coordinate (a token position, visited in a shuffled cycle) and tries a
    batch of random vocabulary tokens there, half as substitutions and half as insertions; the best
    candidate is kept if it lowers the score. ``score`` maps candidate strings to a ``[n]`` tensor.
    ``start_score`` is ``start``'s own score if known (otherwise it is scored, which counts against
    ``budget``). Returns the best prompt, its score, the candidates scored and the best score after
    each round.
    """
    rng = random.Random(seed)
    vocabulary = _vocabulary(tokenizer)
    max_tokens = max(1, int(getattr(tokenizer, "model_max_length", 77) or 77) - 2)
    current = list(tokenizer(start, add_special_tokens=False)["input_ids"])[:max_tokens]
    if start_score is None:
        current_score, evaluations = float(score([start])[0]), 1
    else:
        current_score, evaluations = float(start_score), 0
    best_prompt = start
    history: list[float] = []
    positions: list[int] = []
    while evaluations < budget:
        if not positions:
            positions = list(range(len(current) + 1))
            rng.shuffle(positions)
        position = min(positions.pop(), len(current))
        candidates = []
        for j in range(min(batch_size, budget - evaluations)):
            token = rng.choice(vocabulary)
            edited = list(current)
            if (j % 2 == 0 or len(edited) >= max_tokens) and position < len(edited):
                edited[position] = token
            elif len(edited) < max_tokens:
                edited.insert(position, token)
            else:
                edited[rng.randrange(len(edited))] = token
            candidates.append(edited)
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in candidates]
        scores = score(texts)
        evaluations += len(candidates)
        winner = int(torch.argmin(scores))
        if float(scores[winner]) < current_score:
            current_score = float(scores[winner])
            current = list(tokenizer(texts[winner], add_special_tokens=False)["input_ids"])[:max_tokens]
            best_prompt = texts[winner]
        history.append(current_score)
    return best_prompt, current_score, evaluations, history


def prompt_attack(
    probe: KVProbe,
    prompt: str,
    *,
    budget: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    start_prompt: str | None = None,
) -> PromptAttackResult:
    """Greedy coordinate search (:func:`coordinate_search`) for a prompt whose erased K/V match
    ``prompt``'s original K/V. The search starts from ``start_prompt`` (default: ``prompt`` itself,
    e.g. pass the neutral prompt instead) and stops after ``budget`` candidates.
    """
    if budget < 1 or batch_size < 1:
        raise CPEAdapterError(f"budget and batch_size must be positive, got {budget} and {batch_size}.")
    tokenizer = tokenizers_of(probe.pipe)[0]  # SDXL refiners have only ``tokenizer_2``
    target_embeds = probe.encode([prompt])
    reference = probe.project(target_embeds, original=True)
    start_distance = float(_distances(probe, target_embeds, reference)[0])

    def score(texts: list[str]) -> torch.Tensor:
        return _distances(probe, probe.encode(texts), reference)

    start = prompt if start_prompt is None else start_prompt
    best_prompt, current_distance, evaluations, history = coordinate_search(
        tokenizer,
        start,
        score,
        budget=budget,
        batch_size=batch_size,
        seed=seed,
        start_score=start_distance if start_prompt is None else None,
    )
    return PromptAttackResult(
        prompt=prompt,
        best_prompt=best_prompt,
        start_distance=start_distance,
        best_distance=current_distance,
        recovery=recovery(start_distance, current_distance),
        evaluations=evaluations,
        history=history,
    )


def embedding_attack(
    probe: KVProbe,
    prompt: str,
    *,
    epsilon: float = 0.1,
    steps: int = 50,
    step_size: float | None = None,
    embeds: torch.Tensor | None = None,
) -> EmbeddingAttackResult:
    """Projected gradient descent on an additive text-embedding perturbation with a per-token budget.

    Minimises ``d(E_t + Delta)^2``. Each step moves every token's ``Delta_t`` against its own
    normalised gradient by ``step_size * eps ||E_t||`` (default ``step_size = 2.5 / steps``, so the
    search can cross the whole ball) and projects back onto ``||Delta_t|| <= eps ||E_t||``.
    ``embeds`` (``[1, T, d]`` or ``[T, d]``) replaces the encoded ``prompt`` when given.
    """
    if not epsilon >= 0:
        raise CPEAdapterError(f"epsilon must be >= 0, got {epsilon!r}.")
    if steps < 1:
        raise CPEAdapterError(f"steps must be positive, got {steps!r}.")
    with torch.inference_mode(False):  # gradients are needed even when the caller runs in inference mode
        return _descend(probe, prompt, epsilon, steps, step_size, embeds)


def _descend(
    probe: KVProbe,
    prompt: str,
    epsilon: float,
    steps: int,
    step_size: float | None,
    embeds: torch.Tensor | None,
) -> EmbeddingAttackResult:
    """The projected descent of :func:`embedding_attack` (arguments already checked)."""
    from .evaluation import weighted_distance

    base = probe.encode([prompt]) if embeds is None else embeds.reshape(1, *embeds.shape[-2:])
    base = base.detach().float().clone()  # a normal tensor even if encoded in inference mode
    reference = probe.project(base, original=True)
    column_weights = probe.column_weights.clone()  # the probe may have been made in inference mode
    radius = epsilon * base.norm(dim=-1, keepdim=True)
    step = (2.5 / steps if step_size is None else step_size) * radius
    delta = torch.zeros_like(base)
    best_delta, best_distance, start_distance = delta.clone(), float("inf"), None
    history: list[float] = []
    for _ in range(steps + 1):
        delta.requires_grad_(True)
        with torch.enable_grad():
            distance = weighted_distance(probe.project(base + delta, original=False), reference, column_weights)
            loss = distance.pow(2).sum()
            (grad,) = torch.autograd.grad(loss, delta)
        value = float(distance.detach()[0])
        if start_distance is None:
            start_distance = value
        if value < best_distance:
            best_distance, best_delta = value, delta.detach().clone()
        history.append(best_distance)
        with torch.no_grad():
            direction = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-20)
            delta = delta.detach() - step * direction
            delta = delta * (radius / delta.norm(dim=-1, keepdim=True).clamp_min(1e-20)).clamp(max=1.0)
    ratio = best_delta.norm(dim=-1) / base.norm(dim=-1).clamp_min(1e-20)
    return EmbeddingAttackResult(
        prompt=prompt,
        epsilon=float(epsilon),
        start_distance=float(start_distance),
        best_distance=best_distance,
        recovery=recovery(float(start_distance), best_distance),
        max_norm_ratio=float(ratio.max()),
        history=history,
        delta=best_delta[0],
    )
