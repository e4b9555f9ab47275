"""The per-prompt K/V cache: identical to recomputing, never stale, bounded, and actually used."""

from __future__ import annotations

import gc

import pytest
import torch

import cpe_adapter  # noqa: F401  (installs the pipeline methods)
from cpe_adapter import CPEAdapter, gate, routing
from cpe_adapter.runtime import CACHE_ENTRIES, get_runtime, no_cache
from cpe_adapter.targets import denoiser_of
from cpe_adapter.testing import tiny_pipeline


def random_adapter(pipe, count: int, seed: int, spread: float = 0.5, **overrides) -> CPEAdapter:
    """An adapter with random nonzero weights (an untrained one has a zero residual)."""
    adapter = CPEAdapter.for_pipeline(pipe, [f"concept {seed} {i}" for i in range(count)], **overrides)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * spread)
    return adapter


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd")


@pytest.fixture
def fresh(pipe):
    yield pipe
    pipe.unload_cpe_adapter()


def unet_call(pipe, embeds: torch.Tensor, seed: int = 0) -> torch.Tensor:
    unet = denoiser_of(pipe)
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(embeds.shape[0], 4, 8, 8, generator=generator).to(embeds.dtype)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=embeds).sample


def embeddings(batch: int, seed: int, dim: int = 32) -> torch.Tensor:
    return torch.randn(batch, 77, dim, generator=torch.Generator().manual_seed(seed))


def generate(pipe, prompt, guidance: float = 5.0, per_prompt: int = 1) -> torch.Tensor:
    return pipe(
        prompt,
        num_inference_steps=2,
        guidance_scale=guidance,
        num_images_per_prompt=per_prompt,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images


def reference_residual(embeds: torch.Tensor, adapters: list[tuple[str, CPEAdapter, float]]) -> torch.Tensor:
    """docs/concepts.md written out naively: every concept's residual, then top-1 gate per token."""
    gates, residuals, scales = [], [], []
    for _, adapter, scale in sorted(adapters, key=lambda item: item[0]):
        with torch.no_grad():
            key = adapter.key_weight()
            values, _ = gate.gate_values(embeds, adapter.gate_a, key, adapter.gate_v)
            gates.append(values)
            residuals.append(adapter.residuals(embeds))
            scales += [scale] * adapter.num_concepts
    gates, residuals = torch.cat(gates), torch.cat(residuals)
    winner = gates.argmax(0)
    picked = residuals.gather(0, winner[None, :, :, None].expand(1, *residuals.shape[1:])).squeeze(0)
    return picked * torch.tensor(scales)[winner].unsqueeze(-1)


# ------------------------------------------------------------------------- cached == uncached
@pytest.mark.parametrize(
    ("prompt", "guidance", "per_prompt"),
    [("a photo of a cat", 5.0, 1), (["a dog", "a red car in the city"], 1.0, 2)],
    ids=["cfg-single", "no-cfg-batch"],
)
def test_pipeline_cached_equals_uncached(fresh, prompt, guidance, per_prompt):
    fresh.load_cpe_adapter(random_adapter(fresh, 3, seed=1), "a")
    fresh.load_cpe_adapter(random_adapter(fresh, 2, seed=2), "b", scale=0.7)
    cached = generate(fresh, prompt, guidance, per_prompt)
    with no_cache():
        uncached = generate(fresh, prompt, guidance, per_prompt)
    assert torch.equal(cached, uncached)
    fresh.disable_cpe_adapters()
    base = generate(fresh, prompt, guidance, per_prompt)
    assert not torch.allclose(cached, base)


def test_runtime_switch_and_env_var_turn_cache_off(fresh, monkeypatch):
    fresh.load_cpe_adapter(random_adapter(fresh, 2, seed=3), "a")
    runtime = get_runtime(denoiser_of(fresh))
    embeds = embeddings(2, seed=0)
    unet_call(fresh, embeds)
    assert runtime.cached_bytes() > 0
    runtime.clear_cache()
    monkeypatch.setenv("CPE_ADAPTER_NO_CACHE", "1")
    unet_call(fresh, embeds)
    assert runtime.cached_bytes() == 0
    monkeypatch.delenv("CPE_ADAPTER_NO_CACHE")
    runtime.cache_enabled = False
    unet_call(fresh, embeds)
    assert runtime.cached_bytes() == 0
    runtime.cache_enabled = True
    unet_call(fresh, embeds)
    assert runtime.cached_bytes() > 0


def test_steps_after_the_first_reuse_the_projections(fresh):
    fresh.load_cpe_adapter(random_adapter(fresh, 2, seed=4), "a")
    unet = denoiser_of(fresh)
    seen: list[torch.Tensor] = []
    handle = (
        unet.down_blocks[0]
        .attentions[0]
        .transformer_blocks[0]
        .attn2.to_k.register_forward_hook(lambda module, args, out: seen.append(out))
    )
    embeds = embeddings(2, seed=1)
    unet_call(fresh, embeds, seed=0)
    unet_call(fresh, embeds, seed=1)
    with no_cache():
        unet_call(fresh, embeds, seed=2)
    handle.remove()
    assert seen[0] is seen[1]  # served from the cache, no matmul
    assert seen[2] is not seen[0] and torch.equal(seen[2], seen[0])


def test_residual_matches_naive_routing_with_chunking(fresh, monkeypatch):
    monkeypatch.setattr(gate, "GATHER_BUDGET", 5000)  # several token chunks
    adapters = [
        ("b", random_adapter(fresh, 37, seed=5), 0.5),
        ("a", random_adapter(fresh, 1, seed=6), 1.0),
        ("c", random_adapter(fresh, 5, seed=7, tie_gate_qk=True, residual_rank=2), 2.0),
    ]
    for name, adapter, scale in adapters:
        fresh.load_cpe_adapter(adapter, name, scale=scale)
    runtime = get_runtime(denoiser_of(fresh))
    embeds = embeddings(2, seed=2)
    expected = reference_residual(embeds, adapters)
    with torch.no_grad():
        full = runtime.residual(embeds, runtime._wrappers[0].weight)
        monkeypatch.setattr(gate, "GATE_CHUNK", 4)  # concepts streamed in chunks
        chunked = gate.best_concepts(embeds, adapters[0][1].gate_a, adapters[0][1].gate_b, adapters[0][1].gate_v, 4)
        whole = gate.best_concepts(embeds, adapters[0][1].gate_a, adapters[0][1].gate_b, adapters[0][1].gate_v, 64)
    torch.testing.assert_close(full, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(chunked[1], whole[1])
    torch.testing.assert_close(chunked[2], whole[2])


def test_ties_go_to_the_adapter_first_by_name(fresh):
    twin = random_adapter(fresh, 2, seed=8)
    fresh.load_cpe_adapter(twin, "zeta", scale=3.0)
    fresh.load_cpe_adapter(random_adapter(fresh, 2, seed=8), "alpha", scale=1.0)
    runtime = get_runtime(denoiser_of(fresh))
    embeds = embeddings(1, seed=3)
    with torch.no_grad():
        sets = routing.concept_sets(runtime.participants())
        winners = routing.route_row(embeds, sets)
        both = runtime.residual(embeds, runtime._wrappers[0].weight)
        fresh.set_cpe_adapters(["alpha"])
        alone = runtime.residual(embeds, runtime._wrappers[0].weight)
    # "alpha" comes first in name order: as one stacked set its concepts are 0 and 1, the twin's 2 and 3
    assert len(sets) == 1 and bool((winners.index < 2).all()) and winners.index.unique().numel() == 2
    torch.testing.assert_close(both, alone, rtol=1e-6, atol=1e-5)  # stacked vs alone: only rounding differs


# ------------------------------------------------------------------- changes take effect at once
def test_scale_and_active_set_changes_apply_to_the_next_call(fresh):
    fresh.load_cpe_adapter(random_adapter(fresh, 2, seed=9), "a")
    fresh.load_cpe_adapter(random_adapter(fresh, 3, seed=10), "b")
    embeds = embeddings(2, seed=4)
    outputs = {}
    for key, names, scales in [("ab", ["a", "b"], None), ("half", ["a", "b"], [0.5, 1.0]), ("b", ["b"], None)]:
        fresh.set_cpe_adapters(names, scales)
        outputs[key] = unet_call(fresh, embeds)
        with no_cache():
            assert torch.equal(outputs[key], unet_call(fresh, embeds))
    assert not torch.equal(outputs["ab"], outputs["half"])
    assert not torch.equal(outputs["ab"], outputs["b"])
    runtime = get_runtime(denoiser_of(fresh))
    runtime.scales["b"] = 0.0  # even a change made behind the loaders' back is noticed
    fresh.disable_cpe_adapters()
    base = unet_call(fresh, embeds)
    fresh.enable_cpe_adapters()
    assert torch.equal(unet_call(fresh, embeds), base)


# --------------------------------------------------------------------------------- never stale
def test_new_prompt_tensor_in_reused_memory_is_not_served_stale(fresh):
    fresh.load_cpe_adapter(random_adapter(fresh, 4, seed=11), "a")
    runtime = get_runtime(denoiser_of(fresh))
    first = embeddings(2, seed=5)
    unet_call(fresh, first)
    del first
    gc.collect()
    assert runtime.cached_bytes() == 0  # the entry died with its tensor
    reused = torch.empty(2, 77, 32)
    reused.copy_(embeddings(2, seed=6))
    out = unet_call(fresh, reused)
    with no_cache():
        expected = unet_call(fresh, reused)
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    "edit", ["embeds", "weight", "bias", "adapter", "adapter_gate", "adapter_assigned", "adapter_parameter", "dtype"]
)
def test_in_place_edits_invalidate(fresh, edit):
    adapter = random_adapter(fresh, 3, seed=12)
    fresh.load_cpe_adapter(adapter, "a")
    unet = denoiser_of(fresh)
    embeds = embeddings(2, seed=7)
    before = unet_call(fresh, embeds)
    to_v = unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_v
    saved_weight, saved_bias = to_v.weight.detach().clone(), to_v.bias
    with torch.no_grad():
        if edit == "embeds":
            embeds.mul_(1.5)
        elif edit == "weight":
            to_v.weight.add_(0.1)
        elif edit == "bias":
            to_v.bias = torch.nn.Parameter(torch.full((to_v.out_features,), 0.2))
        elif edit == "adapter":
            fresh.get_cpe_adapter("a").up.mul_(-1.0)
        elif edit == "adapter_gate":
            fresh.get_cpe_adapter("a").gate_v.add_(1.0)
        elif edit == "adapter_assigned":  # new Parameter objects: no version counter moved
            loaded = fresh.get_cpe_adapter("a")
            loaded.load_state_dict({k: -v for k, v in loaded.state_dict().items()}, assign=True)
        elif edit == "adapter_parameter":
            loaded = fresh.get_cpe_adapter("a")
            loaded.up = torch.nn.Parameter(-loaded.up.detach())
        else:
            unet.to(torch.float64)
            embeds = embeds.double()
    try:
        after = unet_call(fresh, embeds)
        with no_cache():
            expected = unet_call(fresh, embeds)
        assert torch.equal(after, expected)
        assert after.dtype == embeds.dtype
        if edit != "dtype":
            assert not torch.allclose(after, before, atol=1e-6)
    finally:
        unet.to(torch.float32)
        with torch.no_grad():
            to_v.weight.copy_(saved_weight)
        to_v.bias = saved_bias


def test_lora_fused_again_at_another_scale_is_not_served_stale():
    """PEFT fuses with ``weight.data += delta``: neither storage nor version moves, and
    ``merged_adapters`` reads the same after unfuse and fuse; the scaling tells them apart."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    fresh = tiny_pipeline("sd")  # loading a LoRA freezes the base weights: a pipeline of its own
    donor = tiny_pipeline("sd")
    donor.unet.add_adapter(LoraConfig(r=4, target_modules=["to_k", "to_v"], init_lora_weights=False))
    lora = {f"unet.{k}": v for k, v in get_peft_model_state_dict(donor.unet).items()}
    fresh.load_cpe_adapter(random_adapter(fresh, 2, seed=21), "a")
    fresh.load_lora_weights(lora, adapter_name="style")
    embeds = embeddings(2, seed=3)
    fresh.fuse_lora(lora_scale=1.0)
    full = unet_call(fresh, embeds)
    fresh.unfuse_lora()
    fresh.fuse_lora(lora_scale=0.3)
    weaker = unet_call(fresh, embeds)
    with no_cache():
        assert torch.equal(weaker, unet_call(fresh, embeds))
    assert not torch.allclose(weaker, full, atol=1e-5)


def test_inference_tensors_weights_and_adapters_are_never_served_stale():
    """Under ``torch.inference_mode`` tensors have no version counter: weights made there are not
    cached as projections, adapters are never converted into inference tensors, and a hook that
    edits an inference-mode output in place is not handed the cached tensor."""
    fresh = tiny_pipeline("sd")  # its weights end up as inference tensors: a pipeline of its own
    fresh.load_cpe_adapter(random_adapter(fresh, 2, seed=22), "a")
    unet = denoiser_of(fresh)
    embeds = embeddings(2, seed=4)

    def call(mode=torch.inference_mode):
        sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        with mode():
            return unet(sample.to(unet.dtype), 10, encoder_hidden_states=embeds.to(unet.dtype)).sample.clone()

    def check(mode=torch.inference_mode) -> torch.Tensor:
        got = call(mode)
        with no_cache():
            assert torch.equal(got, call(mode))
        return got

    unet.to(torch.bfloat16)
    call()  # the adapter follows the UNet to bfloat16 inside inference mode
    assert not any(p.is_inference() for p in fresh.get_cpe_adapter("a").parameters())
    before = check()
    with torch.inference_mode():
        fresh.get_cpe_adapter("a").up.mul_(-1.0)
    assert not torch.equal(check(), before)

    with torch.inference_mode():
        unet.to(torch.float32)  # the UNet's weights are inference tensors from here on
    before = check()
    state = {k: v.clone() * 1.1 for k, v in unet.state_dict().items()}
    with torch.inference_mode():
        unet.load_state_dict(state)
    assert not torch.equal(check(), before)

    to_k = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
    to_k.register_forward_hook(lambda module, args, out: out.mul_(0.5))
    assert torch.equal(check(), check()), "the hook halves a fresh output on every call, never twice"


@pytest.mark.parametrize("source", ["object", "folder"])
def test_adapters_loaded_inside_inference_mode_are_normal_tensors(fresh, source, tmp_path):
    adapter = random_adapter(fresh, 2, seed=23)
    if source == "folder":
        adapter = adapter.save_pretrained(tmp_path / "ad")
    with torch.inference_mode():
        fresh.load_cpe_adapter(adapter, "a")
    loaded = fresh.get_cpe_adapter("a")
    assert not any(p.is_inference() for p in loaded.parameters())
    embeds = embeddings(2, seed=5)
    before = unet_call(fresh, embeds)
    with torch.inference_mode():
        loaded.up.mul_(-1.0)  # counted, so the cached projections of ``embeds`` are dropped
    after = unet_call(fresh, embeds)
    with no_cache():
        assert torch.equal(after, unet_call(fresh, embeds))
    assert not torch.equal(after, before)


def test_autocast_and_plain_calls_never_share_cached_results(fresh):
    fresh.load_cpe_adapter(random_adapter(fresh, 2, seed=24), "a")
    embeds = embeddings(2, seed=6)

    def call(autocast: bool) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return unet_call(fresh, embeds)

    def uncached(autocast: bool) -> torch.Tensor:
        with no_cache():
            return call(autocast)

    plain = call(False)
    assert torch.equal(call(True), uncached(True)), "an autocast call is not served the float32 projections"
    assert torch.equal(call(False), plain), "nor a plain call the bfloat16 ones"
    again = embeddings(2, seed=6)  # equal rows in a new tensor: the routing memo's turn
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unet_call(fresh, again)
    assert torch.equal(unet_call(fresh, embeddings(2, seed=6)), plain)


def test_direct_layer_call_after_adapter_edit_is_fresh(fresh):
    fresh.load_cpe_adapter(random_adapter(fresh, 2, seed=13), "a")
    unet = denoiser_of(fresh)
    to_k = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
    embeds = embeddings(1, seed=8)
    unet_call(fresh, embeds)
    with torch.no_grad():
        fresh.get_cpe_adapter("a").down.mul_(2.0)
        direct = to_k(embeds)
        with no_cache():
            expected = to_k(embeds)
    assert torch.equal(direct, expected)


def test_autograd_gets_fresh_graphs(fresh):
    fresh.load_cpe_adapter(random_adapter(fresh, 2, seed=14), "a")
    runtime = get_runtime(denoiser_of(fresh))
    unet = denoiser_of(fresh)
    to_k = unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_k
    sample = torch.randn(1, 4, 8, 8)
    embeds = embeddings(1, seed=9).requires_grad_(True)
    unet(sample, 10, encoder_hidden_states=embeds).sample.sum().backward()
    assert runtime.cached_bytes() == 0  # the residual depends on a tensor that needs grad
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    plain = embeddings(1, seed=10)  # the weights need grad, the prompt does not: only R(E) is reused
    first = unet(sample, 10, encoder_hidden_states=plain).sample
    first.sum().backward()
    assert runtime.cached_bytes() > 0
    assert to_k.weight.grad is not None and to_k.weight.grad.abs().sum() > 0
    with no_cache():
        assert torch.equal(unet(sample, 10, encoder_hidden_states=plain).sample, first)
    unet.zero_grad(set_to_none=True)


def test_autograd_routes_once_per_forward_with_the_same_gradients(fresh, monkeypatch):
    """When the embedding needs gradients nothing is cached across calls, but within one UNet forward
    the routed residual is computed once for every layer, with the gradients of per-layer routing."""
    from cpe_adapter.runtime import CPERuntime

    fresh.load_cpe_adapter(random_adapter(fresh, 2, seed=16), "a")
    unet = denoiser_of(fresh)
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def gradient() -> tuple[torch.Tensor, torch.Tensor]:
        embeds = embeddings(1, seed=11).requires_grad_(True)
        out = unet(sample, 10, encoder_hidden_states=embeds).sample
        out.square().sum().backward()
        return out.detach(), embeds.grad

    calls = []
    real = CPERuntime.residual
    monkeypatch.setattr(CPERuntime, "residual", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    shared = gradient()
    assert len(calls) == 1, "one routing for all layers of the forward"
    layer = unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_k
    embeds = embeddings(1, seed=11).requires_grad_(True)
    layer(embeds), layer(embeds)
    assert len(calls) == 3, "a layer called outside a forward computes its own"
    monkeypatch.setattr(CPERuntime, "_forward_shared_residual", lambda self, x, weight: self.residual(x, weight))
    reference = gradient()  # every layer routes on its own, as before sharing
    assert len(calls) == 3 + len(get_runtime(unet).layers)
    torch.testing.assert_close(shared[0], reference[0], rtol=0, atol=0)
    torch.testing.assert_close(shared[1], reference[1], rtol=1e-4, atol=1e-5)  # summed in another order


# --------------------------------------------------------------------------------- bounded memory
def test_cache_holds_only_projections_of_live_prompts(fresh):
    fresh.load_cpe_adapter(random_adapter(fresh, 3, seed=15), "a")
    runtime = get_runtime(denoiser_of(fresh))
    total_out = sum(layer.out_features for layer in runtime.layers)
    alive = [embeddings(2, seed=20 + i) for i in range(CACHE_ENTRIES + 3)]
    for embeds in alive:
        unet_call(fresh, embeds)
    per_prompt = 2 * 77 * total_out * 4  # one [B, T, sum(d_out)] fp32 tensor: no residual kept
    assert runtime.cached_bytes() == CACHE_ENTRIES * per_prompt
    del alive, embeds
    gc.collect()
    assert runtime.cached_bytes() == 0
