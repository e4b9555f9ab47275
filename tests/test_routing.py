"""Routing memo: a recurring prompt row (the negative prompt) is routed once, never served stale."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import cpe_adapter  # noqa: F401  (installs the pipeline methods)
from conftest import random_adapter
from cpe_adapter import routing
from cpe_adapter.runtime import get_runtime, no_cache
from cpe_adapter.targets import denoiser_of
from cpe_adapter.testing import tiny_pipeline


@pytest.fixture(scope="module")
def pipe() -> Any:
    pipe = tiny_pipeline("sd")
    pipe.load_cpe_adapter(random_adapter(pipe, ["Van Gogh", "Monet", "Tom Hanks"], seed=3), adapter_name="many")
    pipe.load_cpe_adapter(random_adapter(pipe, "Taylor Swift", seed=4), adapter_name="one")
    return pipe


@pytest.fixture
def routed_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the rows :func:`routing.route_row` routes (the memo looks it up at call time)."""
    calls: list[int] = []
    original = routing.route_row

    def counting(row: torch.Tensor, sets: Any) -> routing.Route:
        calls.append(row.shape[0])
        return original(row, sets)

    monkeypatch.setattr(routing, "route_row", counting)
    return calls


def generate(pipe: Any, prompt: str, per_prompt: int = 1) -> torch.Tensor:
    return pipe(
        prompt,
        num_inference_steps=2,
        num_images_per_prompt=per_prompt,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images


def test_negative_prompt_is_routed_once_across_calls(pipe: Any, routed_rows: list[int]) -> None:
    get_runtime(denoiser_of(pipe)).clear_cache()
    first = generate(pipe, "a painting by Van Gogh")
    assert len(routed_rows) == 2, "a fresh memo routes the prompt and the negative prompt"
    generate(pipe, "a photo of Tom Hanks")
    assert len(routed_rows) == 3, "only the new prompt is routed; the negative prompt is remembered"
    again = generate(pipe, "a painting by Van Gogh")
    assert len(routed_rows) == 3, "both rows of a repeated prompt come from the memo"
    assert torch.equal(first, again)


def test_remembered_routes_give_bitwise_the_uncached_result(pipe: Any) -> None:
    prompts = ["a painting by Van Gogh", "a photo of Tom Hanks", "Taylor Swift singing", "a red car"]
    with no_cache():
        want = [generate(pipe, prompt) for prompt in prompts]
    get_runtime(denoiser_of(pipe)).clear_cache()
    for _ in range(2):  # the second round serves every row from the memo
        for prompt, expected in zip(prompts, want, strict=True):
            assert torch.equal(generate(pipe, prompt), expected)


def test_equal_rows_of_one_batch_are_routed_once(pipe: Any, routed_rows: list[int]) -> None:
    get_runtime(denoiser_of(pipe)).clear_cache()
    images = generate(pipe, "a painting by Van Gogh", per_prompt=3)
    assert len(routed_rows) == 2, "three copies of the prompt and of the negative prompt: two distinct rows"
    with no_cache():
        assert torch.equal(images, generate(pipe, "a painting by Van Gogh", per_prompt=3))


def test_rows_sharing_a_fingerprint_are_told_apart(
    pipe: Any, routed_rows: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fingerprint only narrows the search: with every row's fingerprint equal, the exact
    comparison alone decides, so different prompts keep their own routes."""
    prompts = ["a painting by Van Gogh", "a photo of Tom Hanks", "a red car"]
    with no_cache():
        want = [generate(pipe, prompt) for prompt in prompts]
    get_runtime(denoiser_of(pipe)).clear_cache()
    monkeypatch.setattr(routing, "fingerprints", lambda embeds: [0.0] * embeds.shape[0])
    got = [generate(pipe, prompt) for prompt in prompts]
    assert len(routed_rows) == 4, "three prompts and one negative prompt: four distinct rows"
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert torch.equal(generate(pipe, prompts[1]), want[1])
    assert len(routed_rows) == 4, "a repeated prompt is still found among rows of the same fingerprint"


def test_memo_follows_adapter_changes(pipe: Any, routed_rows: list[int]) -> None:
    runtime = get_runtime(denoiser_of(pipe))
    runtime.clear_cache()
    generate(pipe, "a painting by Van Gogh")
    assert len(routed_rows) == 2
    adapter = runtime.adapters["many"]
    try:
        with torch.no_grad():
            adapter.gate_v.mul_(-1.0)  # edited in place: every remembered route is stale
        edited = generate(pipe, "a painting by Van Gogh")
        assert len(routed_rows) == 4
        with no_cache():
            assert torch.equal(edited, generate(pipe, "a painting by Van Gogh"))
    finally:
        with torch.no_grad():
            adapter.gate_v.mul_(-1.0)
    pipe.set_cpe_adapters(["one"])
    try:
        generate(pipe, "a painting by Van Gogh")
        assert len(routed_rows) == 6, "another set of participating adapters routes afresh"
    finally:
        pipe.set_cpe_adapters(["many", "one"])


def test_memo_is_bounded(pipe: Any) -> None:
    runtime = get_runtime(denoiser_of(pipe))
    runtime.clear_cache()
    for index in range(routing.ROUTE_MEMO_ROWS + 4):
        generate(pipe, f"prompt number {index}")
    generate(pipe, "one more")
    dim = pipe.unet.config.cross_attention_dim
    per_row = 2 * 77 * dim * 4 + 77 * 4 + 2 * 77 * 8  # embedding and Ē (fp32), gate, concept and owner
    stacked = sum(s.nbytes() for s in routing.concept_sets(runtime.participants()))
    assert stacked > 0, "the two adapters route as one stacked set"
    assert runtime.routing_bytes() == routing.ROUTE_MEMO_ROWS * per_row + stacked
    runtime.clear_cache()
    assert runtime.routing_bytes() == 0


# --------------------------------------------------------------------------------- concept sets
def stacked_pipe(**second: Any) -> Any:
    pipe = tiny_pipeline("sd")
    for index in range(6):
        pipe.load_cpe_adapter(random_adapter(pipe, f"concept {index}", seed=10 + index), adapter_name=f"a{index}")
    pipe.load_cpe_adapter(random_adapter(pipe, ["x", "y"], seed=20, **second), adapter_name="b", scale=0.6)
    return pipe


def routed_apart(pipe: Any, embeds: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """The residual with every adapter routed on its own (no stacking), for reference."""
    runtime = get_runtime(denoiser_of(pipe))
    with monkeypatch.context() as patch:
        patch.setattr(routing, "STACK_BYTES", 0)
        runtime.clear_cache()
        assert len(routing.concept_sets(runtime.participants())) == len(runtime.participants())
        with torch.no_grad():
            return runtime.residual(embeds, runtime._wrappers[0].weight)


def test_stacked_adapters_route_as_one_set_like_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = stacked_pipe()
    runtime = get_runtime(denoiser_of(pipe))
    sets = routing.concept_sets(runtime.participants())
    assert len(sets) == 1 and sets[0].gate_a.shape[0] == 8
    assert sets[0].scales.tolist()[-2:] == pytest.approx([0.6 * runtime.adapters["b"].residual_scale] * 2)
    embeds = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        together = runtime.residual(embeds, runtime._wrappers[0].weight)
    torch.testing.assert_close(together, routed_apart(pipe, embeds, monkeypatch), rtol=1e-5, atol=1e-6)
    assert together.abs().max() > 0.1


def test_adapters_of_other_ranks_get_their_own_set(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = stacked_pipe(gate_rank=8, residual_rank=2)
    runtime = get_runtime(denoiser_of(pipe))
    sets = routing.concept_sets(runtime.participants())
    assert [s.gate_a.shape[0] for s in sets] == [6, 2]
    embeds = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        together = runtime.residual(embeds, runtime._wrappers[0].weight)
    torch.testing.assert_close(together, routed_apart(pipe, embeds, monkeypatch), rtol=1e-5, atol=1e-6)


def test_stacked_sets_follow_trained_weights_at_every_autograd_call() -> None:
    """While adapters train (weights need grad), no stacked copy is kept between calls: each call
    sees the weights as the optimizer left them, and gradients reach every adapter."""
    pipe = stacked_pipe()
    runtime = get_runtime(denoiser_of(pipe))
    for adapter in runtime.adapters.values():
        adapter.requires_grad_(True)
    embeds = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(3))
    first = runtime.residual(embeds, runtime._wrappers[0].weight)
    first.square().sum().backward()
    assert all(a.up.grad is not None and a.up.grad.abs().sum() > 0 for a in runtime.adapters.values())
    with torch.no_grad():  # an optimizer step: in place, no pipeline call in between
        for adapter in runtime.adapters.values():
            adapter.up.mul_(2.0)
    second = runtime.residual(embeds, runtime._wrappers[0].weight)
    torch.testing.assert_close(second, 2.0 * first.detach())
