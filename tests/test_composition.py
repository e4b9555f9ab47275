"""Several adapters at once (routing, scales, ties, order) and composition with diffusers LoRAs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch import nn

from conftest import PROMPT, generate, random_adapter, set_random_weights, unet_inputs, unet_output
from cpe_adapter import CPEAdapter, routing
from cpe_adapter.gate import gate_values
from cpe_adapter.layer import CPELinear
from cpe_adapter.runtime import get_runtime
from cpe_adapter.targets import cross_attention_modules
from cpe_adapter.testing import tiny_pipeline

LORA_TARGETS = ["to_k", "to_v", "to_q", "to_out.0"]


def with_adapters(*specs: tuple[str, CPEAdapter, float], dtype: torch.dtype | None = None):
    """A fresh pipeline with ``(name, adapter, scale)`` loaded in the given order."""
    pipe = tiny_pipeline("sd")
    if dtype is not None:
        pipe.to(dtype)
    for name, adapter, scale in specs:
        pipe.load_cpe_adapter(adapter, adapter_name=name, scale=scale)
    return pipe


def adapter_for(seed: int, concepts: int = 1, layers_of=None) -> CPEAdapter:
    pipe = layers_of or tiny_pipeline("sd")
    return random_adapter(pipe, [f"concept {seed}.{i}" for i in range(concepts)], seed=seed)


def copy_of(adapter: CPEAdapter) -> CPEAdapter:
    return CPEAdapter.from_state_dict(adapter.file_state_dict(), adapter.config.to_dict())


def expected_routed_residual(embeds: torch.Tensor, named: list[tuple[str, CPEAdapter, float]]) -> torch.Tensor:
    """docs/concepts.md by hand in float64: per token, the largest gate over all concepts of all adapters
    with non-zero scale (ties: first adapter by name, then first concept) applies only its residual."""
    embeds = embeds.double()
    candidates = []  # (gates [B, T], mixed [B, T, d], adapter, concept, scale) in routing order
    for _, adapter, scale in sorted(named, key=lambda item: item[0]):
        if scale == 0:
            continue
        a, b, v = (p.detach().double() for p in (adapter.gate_a, adapter.key_weight(), adapter.gate_v))
        gates, mixing = gate_values(embeds, a, b, v)
        for concept in range(adapter.num_concepts):
            candidates.append((gates[concept], mixing[concept] @ embeds, adapter, concept, scale))
    batch, tokens, _ = embeds.shape
    rows = []
    for bi in range(batch):
        for ti in range(tokens):
            values = [float(c[0][bi, ti]) for c in candidates]
            gate, mixed, adapter, concept, scale = candidates[values.index(max(values))]
            cfg = adapter.config
            pieces, column = [], 0
            for li, layer in enumerate(cfg.target_layers):
                down = adapter.down[concept].detach().double()[:, li * cfg.residual_rank : (li + 1) * cfg.residual_rank]
                up = adapter.up[concept].detach().double()[:, column : column + layer.out_features]
                column += layer.out_features
                factor = scale * cfg.alpha / cfg.residual_rank * gate[bi, ti]
                pieces.append(factor * (mixed[bi, ti] @ down) @ up)
            rows.append(torch.cat(pieces))
    return torch.stack(rows).reshape(batch, tokens, -1)


def like_weight(pipe) -> torch.Tensor:
    return cross_attention_modules(pipe.unet)[0][1].to_k.weight


# ------------------------------------------------------------------------------ routing by hand
@pytest.mark.parametrize("scales", [(1.0, 1.0, 1.0), (0.5, -2.0, 1.5), (1.0, 0.0, 1.0)])
def test_routed_residual_matches_hand_computation(scales):
    template = tiny_pipeline("sd")
    named = [
        ("zeta", adapter_for(11, concepts=2, layers_of=template), scales[0]),
        ("alpha", adapter_for(12, concepts=3, layers_of=template), scales[1]),
        ("mid", adapter_for(13, concepts=1, layers_of=template), scales[2]),
    ]
    pipe = with_adapters(*named, dtype=torch.float64)
    embeds = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        got = get_runtime(pipe.unet).residual(embeds, like_weight(pipe))
    expected = expected_routed_residual(embeds, named)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


def test_routing_really_mixes_adapters_per_token():
    # Guard for the test above: with these weights, tokens are routed to more than one adapter, so
    # the comparison exercises per-token selection and not one adapter's residual.
    template = tiny_pipeline("sd")
    adapters = [adapter_for(11, 2, template), adapter_for(12, 3, template), adapter_for(13, 1, template)]
    embeds = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    owners = torch.cat(
        [gate_values(embeds, *(p.detach().double() for p in (a.gate_a, a.gate_b, a.gate_v)))[0] for a in adapters]
    ).argmax(0)
    assert len(set(owners.flatten().tolist())) >= 3


def test_float32_runtime_residual_is_close_to_float64_reference():
    template = tiny_pipeline("sd")
    named = [("b", adapter_for(21, 2, template), 1.0), ("a", adapter_for(22, 2, template), 0.7)]
    pipe = with_adapters(*named)
    embeds = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = get_runtime(pipe.unet).residual(embeds, like_weight(pipe))
    torch.testing.assert_close(got.double(), expected_routed_residual(embeds, named), rtol=1e-4, atol=1e-5)


def test_scale_multiplies_the_residual():
    adapter = adapter_for(31)
    full = with_adapters(("x", copy_of(adapter), 1.0))
    third = with_adapters(("x", copy_of(adapter), 1.0 / 3.0))
    embeds = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        r_full = get_runtime(full.unet).residual(embeds, like_weight(full))
        r_third = get_runtime(third.unet).residual(embeds, like_weight(third))
    torch.testing.assert_close(r_third, r_full / 3.0, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------- pipeline level
@pytest.fixture(scope="module")
def pair() -> tuple[CPEAdapter, CPEAdapter]:
    template = tiny_pipeline("sd")
    return adapter_for(41, 2, template), adapter_for(42, 1, template)


@pytest.fixture(scope="module")
def only_second_image(pair) -> np.ndarray:
    return generate(with_adapters(("second", copy_of(pair[1]), 1.0)))


def test_loading_order_does_not_matter(pair):
    first, second = pair
    one = generate(with_adapters(("first", copy_of(first), 1.0), ("second", copy_of(second), 1.0)))
    other = generate(with_adapters(("second", copy_of(second), 1.0), ("first", copy_of(first), 1.0)))
    np.testing.assert_array_equal(one, other)


def test_scale_zero_equals_loading_only_the_other(pair, only_second_image):
    first, second = pair
    pipe = with_adapters(("first", copy_of(first), 1.0), ("second", copy_of(second), 1.0))
    pipe.set_cpe_adapters(["first", "second"], scales=[0.0, 1.0])
    np.testing.assert_array_equal(generate(pipe), only_second_image)
    assert pipe.get_active_cpe_adapters() == ["first", "second"]


def test_inactive_adapter_equals_loading_only_the_other(pair, only_second_image):
    first, second = pair
    pipe = with_adapters(("first", copy_of(first), 1.0), ("second", copy_of(second), 1.0))
    pipe.set_cpe_adapters("second")
    np.testing.assert_array_equal(generate(pipe), only_second_image)


def _zero_mixing(adapter: CPEAdapter) -> CPEAdapter:
    """Zero A and B so that ``S`` is exactly uniform and ``Ē_t`` is the token mean for every token."""
    with torch.no_grad():
        adapter.gate_a.zero_()
        adapter.gate_b.zero_()
    return adapter


def test_highest_gate_wins_every_token():
    pipe = tiny_pipeline("sd")
    positive, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    means = torch.cat([negative, positive]).mean(dim=1)  # Ē of every token, per CFG batch row
    direction = (means / means.norm(dim=-1, keepdim=True)).sum(0)
    assert torch.all(means @ direction > 0), "precondition: X's gate is above 0.5 on both batch rows"
    strong = _zero_mixing(set_random_weights(CPEAdapter.for_pipeline(pipe, "x"), seed=51))
    weak = _zero_mixing(set_random_weights(CPEAdapter.for_pipeline(pipe, "y"), seed=52))
    with torch.no_grad():
        strong.gate_v.copy_(direction * 4.0)
        weak.gate_v.zero_()  # gate exactly 0.5
    # "a" < "b": the weak adapter comes first by name, so only gate values can route to the strong one.
    both = generate(with_adapters(("b_strong", copy_of(strong), 1.0), ("a_weak", copy_of(weak), 1.0)))
    alone = generate(with_adapters(("b_strong", copy_of(strong), 1.0)))
    weak_alone = generate(with_adapters(("a_weak", copy_of(weak), 1.0)))
    np.testing.assert_allclose(both, alone, rtol=0, atol=1e-6)
    assert not np.allclose(both, weak_alone, atol=1e-3)


@pytest.mark.parametrize("stacked", [True, False], ids=["one-set", "separate-sets"])
def test_ties_break_by_adapter_name(stacked, monkeypatch):
    """Within one stacked concept set and across sets (adapters routed apart) alike."""
    if not stacked:
        monkeypatch.setattr(routing, "STACK_BYTES", 0)
    pipe = tiny_pipeline("sd")
    gate_source = set_random_weights(CPEAdapter.for_pipeline(pipe, "tie"), seed=61)
    one = set_random_weights(CPEAdapter.for_pipeline(pipe, "tie"), seed=62)
    two = set_random_weights(CPEAdapter.for_pipeline(pipe, "tie"), seed=63)
    with torch.no_grad():
        for adapter in (one, two):  # identical gates, different residuals
            for name in ("gate_a", "gate_b", "gate_v"):
                getattr(adapter, name).copy_(getattr(gate_source, name))
    inputs = unet_inputs(pipe)
    pair = with_adapters(("b", copy_of(two), 1.0), ("a", copy_of(one), 1.0))
    assert len(routing.concept_sets(get_runtime(pair.unet).participants())) == (1 if stacked else 2)
    loaded_b_first = unet_output(pair, inputs)
    loaded_a_first = unet_output(with_adapters(("a", copy_of(one), 1.0), ("b", copy_of(two), 1.0)), inputs)
    only_a = unet_output(with_adapters(("a", copy_of(one), 1.0)), inputs)
    only_b = unet_output(with_adapters(("b", copy_of(two), 1.0)), inputs)
    torch.testing.assert_close(loaded_b_first, only_a, rtol=0, atol=1e-6)
    torch.testing.assert_close(loaded_a_first, only_a, rtol=0, atol=1e-6)
    assert not torch.allclose(only_a, only_b, atol=1e-4)
    swapped = unet_output(with_adapters(("b", copy_of(one), 1.0), ("a", copy_of(two), 1.0)), inputs)
    torch.testing.assert_close(swapped, only_b, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ LoRA
def add_lora(pipe, seed: int = 2) -> None:
    config = LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe.unet.add_adapter(config, adapter_name="style")


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    """A diffusers LoRA (random A and B) saved with ``save_lora_weights``."""
    pipe = tiny_pipeline("sd")
    add_lora(pipe)
    folder = tmp_path_factory.mktemp("lora")
    layers = get_peft_model_state_dict(pipe.unet, adapter_name="style")
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def eraser() -> CPEAdapter:
    return adapter_for(1)


@pytest.fixture(scope="module")
def eraser_only_image(eraser) -> np.ndarray:
    return generate(with_adapters(("eraser", copy_of(eraser), 1.0)))


@pytest.fixture(scope="module")
def lora_only_image(lora_dir) -> np.ndarray:
    pipe = tiny_pipeline("sd")
    pipe.load_lora_weights(lora_dir, adapter_name="style")
    return generate(pipe)


def lora_and_eraser(lora_first: bool, lora_dir, eraser: CPEAdapter):
    """A tiny pipeline with the LoRA "style" and a copy of ``eraser`` loaded, in the given order."""
    pipe = tiny_pipeline("sd")
    if lora_first:
        pipe.load_lora_weights(lora_dir, adapter_name="style")
    pipe.load_cpe_adapter(copy_of(eraser), adapter_name="eraser")
    if not lora_first:
        pipe.load_lora_weights(lora_dir, adapter_name="style")
    return pipe


def projection_stack(pipe) -> list[list[type]]:
    """Module types from each cross-attention to_k/to_v down its ``base_layer`` chain."""
    stacks = []
    for _, attn in cross_attention_modules(pipe.unet):
        for proj in ("to_k", "to_v"):
            module, chain = getattr(attn, proj), []
            while True:
                chain.append(type(module))
                if not isinstance(getattr(module, "base_layer", None), nn.Module):
                    break
                module = module.base_layer
            stacks.append(chain)
    return stacks


@pytest.mark.parametrize("lora_first", [True, False], ids=["lora-then-eraser", "eraser-then-lora"])
def test_lora_and_eraser_both_apply(lora_first, lora_dir, eraser, eraser_only_image, lora_only_image):
    pipe = lora_and_eraser(lora_first, lora_dir, eraser)
    image = generate(pipe)
    assert not np.allclose(image, eraser_only_image, atol=1e-3)
    assert not np.allclose(image, lora_only_image, atol=1e-3)
    assert all(CPELinear in chain for chain in projection_stack(pipe))
    reference = tiny_pipeline("sd")
    reference.load_cpe_adapter(copy_of(eraser), adapter_name="eraser")
    reference.load_lora_weights(lora_dir, adapter_name="style")
    if lora_first:  # the order of adding LoRA and eraser does not matter
        np.testing.assert_array_equal(image, generate(reference))


@pytest.mark.parametrize("lora_first", [True, False], ids=["lora-then-eraser", "eraser-then-lora"])
def test_unloading_lora_leaves_the_eraser_exactly(lora_first, lora_dir, eraser, eraser_only_image):
    pipe = lora_and_eraser(lora_first, lora_dir, eraser)
    pipe.unload_lora_weights()
    assert all(chain == [CPELinear] for chain in projection_stack(pipe))
    assert pipe.get_active_cpe_adapters() == ["eraser"]
    np.testing.assert_array_equal(generate(pipe), eraser_only_image)


def test_fuse_and_unfuse_lora_keep_the_eraser(lora_dir, eraser, eraser_only_image):
    pipe = tiny_pipeline("sd")
    pipe.load_cpe_adapter(copy_of(eraser), adapter_name="eraser")
    pipe.load_lora_weights(lora_dir, adapter_name="style")
    unfused = generate(pipe)
    pipe.fuse_lora()
    fused = generate(pipe)
    np.testing.assert_allclose(fused, unfused, rtol=0, atol=1e-4)
    pipe.unfuse_lora()
    np.testing.assert_allclose(generate(pipe), unfused, rtol=0, atol=1e-4)
    pipe.unload_lora_weights()
    # Fusing adds and subtracts LoRA deltas in float32: the base weights may differ in the last bit.
    np.testing.assert_allclose(generate(pipe), eraser_only_image, rtol=0, atol=1e-4)
    loaded = pipe.get_cpe_adapter("eraser").file_state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in eraser.file_state_dict().items())
    assert all(chain == [CPELinear] for chain in projection_stack(pipe))


def test_fused_lora_with_eraser_is_still_erased(lora_dir, eraser):
    erased = tiny_pipeline("sd")
    erased.load_cpe_adapter(copy_of(eraser), adapter_name="eraser")
    erased.load_lora_weights(lora_dir, adapter_name="style")
    erased.fuse_lora()
    plain = tiny_pipeline("sd")
    plain.load_lora_weights(lora_dir, adapter_name="style")
    plain.fuse_lora()
    inputs = unet_inputs(plain)
    assert not torch.allclose(unet_output(erased, inputs), unet_output(plain, inputs), atol=1e-3)


@pytest.mark.parametrize("lora_first", [True, False], ids=["lora-then-eraser", "eraser-then-lora"])
def test_unloading_the_eraser_leaves_the_lora_exactly(lora_first, lora_dir, eraser, lora_only_image):
    pipe = lora_and_eraser(lora_first, lora_dir, eraser)
    pipe.unload_cpe_adapter()
    assert all(CPELinear not in chain and chain[-1] is nn.Linear for chain in projection_stack(pipe))
    assert all(len(chain) == 2 for chain in projection_stack(pipe)), "the LoRA layer stays in place"
    assert pipe.get_list_adapters() == {"unet": ["style"]}
    np.testing.assert_array_equal(generate(pipe), lora_only_image)


def test_peft_add_adapter_composes_like_load_lora_weights(eraser):
    pipe = tiny_pipeline("sd")
    pipe.load_cpe_adapter(copy_of(eraser), adapter_name="eraser")
    add_lora(pipe)
    erased = unet_output(pipe, unet_inputs(pipe))
    pipe.unet.delete_adapters("style")
    reference = with_adapters(("eraser", copy_of(eraser), 1.0))
    torch.testing.assert_close(unet_output(pipe, unet_inputs(pipe)), unet_output(reference, unet_inputs(pipe)))
    assert not torch.allclose(erased, unet_output(reference, unet_inputs(pipe)))


@pytest.mark.parametrize("lora_first", [True, False], ids=["lora-then-eraser", "eraser-then-lora"])
def test_fusing_lora_between_calls_with_the_same_embedding(lora_first, lora_dir, eraser):
    """PEFT merges with ``weight.data += delta`` (no version bump): a cached P(E) must not go stale."""
    pipe = lora_and_eraser(lora_first, lora_dir, eraser)
    inputs = unet_inputs(pipe)
    before = unet_output(pipe, inputs)
    pipe.fuse_lora()
    torch.testing.assert_close(unet_output(pipe, inputs), before, rtol=0, atol=1e-5)
    pipe.unfuse_lora()
    torch.testing.assert_close(unet_output(pipe, inputs), before, rtol=0, atol=1e-5)
    pipe.unload_lora_weights()
    without_lora = unet_output(with_adapters(("eraser", copy_of(eraser), 1.0)), inputs)
    torch.testing.assert_close(unet_output(pipe, inputs), without_lora, rtol=0, atol=1e-5)


def test_concatenated_adapter_routes_like_the_separate_ones():
    template = tiny_pipeline("sd")
    first, second = adapter_for(71, 2, template), adapter_for(72, 1, template)
    merged = CPEAdapter.concatenate([first, second], name="merged")
    assert merged.config.concept_names == first.config.concept_names + second.config.concept_names
    inputs = unet_inputs(template)
    one = unet_output(with_adapters(("merged", merged, 1.0)), inputs)
    separate = unet_output(with_adapters(("a", copy_of(first), 1.0), ("b", copy_of(second), 1.0)), inputs)
    torch.testing.assert_close(one, separate, rtol=0, atol=1e-5)
