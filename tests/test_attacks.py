"""Tests for `cpe_adapter.attacks`: both attacks improve their objective against an untrained but
non-zero adapter, respect their budgets, report honest numbers, and do nothing against no erasure."""

from __future__ import annotations

import pytest
import torch

import cpe_adapter
from cpe_adapter import CPEAdapter
from cpe_adapter.attacks import embedding_attack, prompt_attack, recovery
from cpe_adapter.evaluation import KVProbe, weighted_distance
from cpe_adapter.testing import tiny_pipeline

PROMPT = "a painting by Van Gogh"


def random_adapter(pipe, seed: int = 0, scale: float = 1.0) -> CPEAdapter:
    adapter = CPEAdapter.for_pipeline(pipe, "Van Gogh", preset="styles")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (adapter.gate_a, adapter.gate_b, adapter.gate_v, adapter.down, adapter.up):
            param.copy_(torch.randn(param.shape, generator=generator))
        adapter.gate_a.mul_(0.1), adapter.gate_b.mul_(0.1), adapter.up.mul_(scale)
    return adapter


@pytest.fixture(scope="module")
def probe():
    pipe = tiny_pipeline("sd")
    pipe.load_cpe_adapter(random_adapter(pipe), "vg")
    return KVProbe(pipe)


def _distance(probe: KVProbe, prompt: str, reference: torch.Tensor) -> float:
    with torch.no_grad():
        current = probe.project(probe.encode([prompt]), original=False)
    return float(weighted_distance(current, reference, probe.column_weights)[0])


def test_recovery_is_the_clipped_fraction_of_the_gap() -> None:
    assert recovery(2.0, 1.5) == pytest.approx(0.25)
    assert recovery(2.0, 3.0) == 0.0
    assert recovery(2.0, 0.0) == 1.0
    assert recovery(0.0, 0.0) == 0.0


def test_prompt_attack_finds_a_typeable_prompt_closer_to_the_original(probe) -> None:
    result = prompt_attack(probe, PROMPT, budget=48, batch_size=16, seed=0)
    assert result.evaluations == 48
    assert result.best_distance < result.start_distance
    assert 0.0 < result.recovery <= 1.0
    assert result.recovery == pytest.approx(1 - result.best_distance / result.start_distance)
    assert result.best_prompt != PROMPT
    assert all(a >= b for a, b in zip(result.history, result.history[1:], strict=False))  # greedy: never worse
    # the reported prompt, typed in again, really reaches the reported distance
    reference = probe.project(probe.encode([PROMPT]), original=True)
    assert _distance(probe, PROMPT, reference) == pytest.approx(result.start_distance, rel=1e-5)
    assert _distance(probe, result.best_prompt, reference) == pytest.approx(result.best_distance, rel=1e-4)


def test_prompt_attack_is_deterministic_for_a_seed(probe) -> None:
    first = prompt_attack(probe, PROMPT, budget=16, batch_size=8, seed=3)
    again = prompt_attack(probe, PROMPT, budget=16, batch_size=8, seed=3)
    assert (first.best_prompt, first.best_distance) == (again.best_prompt, again.best_distance)


def test_prompt_attack_can_start_from_the_neutral_prompt(probe) -> None:
    result = prompt_attack(probe, PROMPT, budget=9, batch_size=8, start_prompt="a painting by real photograph")
    assert result.evaluations == 9  # the start prompt costs one evaluation
    assert (
        result.best_distance
        <= _distance(probe, "a painting by real photograph", probe.project(probe.encode([PROMPT]), original=True))
        + 1e-6
    )


def test_embedding_attack_improves_within_its_norm_budget(probe) -> None:
    result = embedding_attack(probe, PROMPT, epsilon=0.1, steps=8)
    assert result.best_distance < result.start_distance
    assert result.recovery > 0.0
    assert result.max_norm_ratio <= 0.1 + 1e-5
    embeds = probe.encode([PROMPT])[0]
    ratios = result.delta.norm(dim=-1) / embeds.norm(dim=-1)
    assert float(ratios.max()) <= 0.1 + 1e-5
    # the reported distance is what the perturbed embedding really gives
    reference = probe.project(embeds[None], original=True)
    with torch.no_grad():
        attacked = probe.project(embeds[None] + result.delta[None], original=False)
    assert float(weighted_distance(attacked, reference, probe.column_weights)[0]) == pytest.approx(
        result.best_distance, rel=1e-4
    )


def test_a_larger_budget_recovers_more(probe) -> None:
    small = embedding_attack(probe, PROMPT, epsilon=0.02, steps=4)
    large = embedding_attack(probe, PROMPT, epsilon=0.5, steps=4)
    none = embedding_attack(probe, PROMPT, epsilon=0.0, steps=2)
    assert none.recovery == 0.0 and float(none.delta.abs().max()) == 0.0
    assert large.recovery > small.recovery > 0.0


def test_attacks_gain_nothing_without_an_erasure() -> None:
    pipe = tiny_pipeline("sd")
    pipe.load_cpe_adapter(random_adapter(pipe), "vg")
    cpe_adapter.disable_cpe_adapters(pipe)
    probe = KVProbe(pipe)
    assert prompt_attack(probe, PROMPT, budget=8, batch_size=8).recovery == 0.0
    assert embedding_attack(probe, PROMPT, steps=2).recovery == 0.0


def test_prompt_attack_works_with_a_wordpiece_tokenizer() -> None:
    """sd-semantic: a BERT WordPiece tokenizer and a real pretrained text encoder."""
    pipe = tiny_pipeline("sd-semantic")
    pipe.load_cpe_adapter(random_adapter(pipe, scale=0.05), "vg")
    probe = KVProbe(pipe)
    result = prompt_attack(probe, PROMPT, budget=8, batch_size=8, seed=0)
    assert result.evaluations == 8
    assert result.best_distance < result.start_distance and result.best_prompt != PROMPT
    reference = probe.project(probe.encode([PROMPT]), original=True)
    assert _distance(probe, result.best_prompt, reference) == pytest.approx(result.best_distance, rel=1e-4)
