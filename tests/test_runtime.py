"""The runtime on a real (tiny) pipeline: bitwise no-ops, unloading, the per-prompt cache,
dtype moves, attention processors and fused projections."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch import nn

import cpe_adapter
from conftest import OTHER_PROMPT, PROMPT, generate, random_adapter, set_random_weights, unet_inputs, unet_output
from cpe_adapter import CPEAdapterError, ErasureIntegrityError
from cpe_adapter import runtime as runtime_module
from cpe_adapter.layer import CPELinear
from cpe_adapter.runtime import get_runtime, no_cache
from cpe_adapter.targets import cross_attention_modules
from cpe_adapter.testing import tiny_pipeline


def projections(unet: nn.Module) -> list[nn.Module]:
    return [getattr(attn, proj) for _, attn in cross_attention_modules(unet) for proj in ("to_k", "to_v")]


def fresh_with_adapter(seed: int = 1, dtype: torch.dtype | None = None):
    pipe = tiny_pipeline("sd")
    if dtype is not None:
        pipe.to(dtype)
    pipe.load_cpe_adapter(random_adapter(pipe, seed=seed), adapter_name="eraser")
    return pipe


@pytest.fixture(scope="module")
def erased_image() -> np.ndarray:
    """The default prompt through a pipeline with the seed-1 random adapter (fresh cache)."""
    return generate(fresh_with_adapter())


# ------------------------------------------------------------------------------ bitwise no-ops
def test_active_adapter_changes_output(sd_pipe, reference_images, erased_image):
    assert not np.allclose(erased_image, reference_images(), atol=1e-3)


def test_untrained_adapter_is_exactly_a_no_op(sd_pipe, reference_images):
    # Freshly initialised: U = 0, so the residual is exactly zero (docs/concepts.md).
    sd_pipe.load_cpe_adapter(cpe_adapter.CPEAdapter.for_pipeline(sd_pipe, "Van Gogh"))
    np.testing.assert_array_equal(generate(sd_pipe), reference_images())


def test_disabled_is_bitwise_original(sd_pipe, reference_images, erased_image):
    sd_pipe.load_cpe_adapter(random_adapter(sd_pipe), adapter_name="eraser")
    sd_pipe.disable_cpe_adapters()
    assert sd_pipe.get_active_cpe_adapters() == ["eraser"], "the active set is reported while disabled"
    np.testing.assert_array_equal(generate(sd_pipe), reference_images())
    sd_pipe.enable_cpe_adapters()
    np.testing.assert_array_equal(generate(sd_pipe), erased_image)


def test_all_scales_zero_is_bitwise_original(sd_pipe, reference_images):
    sd_pipe.load_cpe_adapter(random_adapter(sd_pipe, seed=1), adapter_name="a")
    sd_pipe.load_cpe_adapter(random_adapter(sd_pipe, seed=2), adapter_name="b", scale=0.0)
    sd_pipe.set_cpe_adapters(["a", "b"], scales=[0.0, 0.0])
    np.testing.assert_array_equal(generate(sd_pipe), reference_images())


def test_empty_active_set_is_bitwise_original(sd_pipe, reference_images):
    sd_pipe.load_cpe_adapter(random_adapter(sd_pipe), adapter_name="a")
    sd_pipe.set_cpe_adapters([])
    assert sd_pipe.get_active_cpe_adapters() == []
    np.testing.assert_array_equal(generate(sd_pipe), reference_images())


def test_unload_restores_the_original_model(sd_pipe, reference_images):
    original_types = [type(p) for p in projections(sd_pipe.unet)]
    original_state = {k: v.clone() for k, v in sd_pipe.unet.state_dict().items()}
    original_params = [p for p in projections(sd_pipe.unet)]
    sd_pipe.load_cpe_adapter(random_adapter(sd_pipe), adapter_name="eraser")
    wrapped = projections(sd_pipe.unet)
    assert all(isinstance(p, CPELinear) and isinstance(p, nn.Linear) for p in wrapped)
    loaded_state = sd_pipe.unet.state_dict()
    assert list(loaded_state) == list(original_state), "adapter weights must stay out of unet.state_dict()"
    assert all(torch.equal(loaded_state[k], original_state[k]) for k in original_state)
    assert all(w.weight is o.weight for w, o in zip(wrapped, original_params, strict=True)), "weights are shared"

    sd_pipe.unload_cpe_adapter()
    assert [type(p) for p in projections(sd_pipe.unet)] == original_types
    assert all(type(p) is nn.Linear for p in projections(sd_pipe.unet))
    assert get_runtime(sd_pipe.unet) is None
    assert sd_pipe.list_cpe_adapters() == {} and sd_pipe.get_active_cpe_adapters() == []
    state = sd_pipe.unet.state_dict()
    assert list(state) == list(original_state)
    assert all(torch.equal(state[k], original_state[k]) for k in original_state)
    assert not sd_pipe.unet._forward_pre_hooks and not sd_pipe.unet._forward_hooks
    np.testing.assert_array_equal(generate(sd_pipe), reference_images())


def test_unload_one_of_two_keeps_the_other(sd_pipe, erased_image):
    sd_pipe.load_cpe_adapter(random_adapter(sd_pipe, seed=1), adapter_name="eraser")
    sd_pipe.load_cpe_adapter(random_adapter(sd_pipe, seed=5), adapter_name="other")
    sd_pipe.unload_cpe_adapter("other")
    assert list(sd_pipe.list_cpe_adapters()) == ["eraser"] and sd_pipe.get_active_cpe_adapters() == ["eraser"]
    np.testing.assert_array_equal(generate(sd_pipe), erased_image)


def test_gradient_path_equals_cached_path(sd_pipe):
    sd_pipe.load_cpe_adapter(random_adapter(sd_pipe), adapter_name="eraser")
    inputs = unet_inputs(sd_pipe)
    cached = unet_output(sd_pipe, inputs)
    latents, timestep, embeds = inputs
    uncached = sd_pipe.unet(latents, timestep, encoder_hidden_states=embeds).sample  # grad on: no cache
    assert uncached.requires_grad
    torch.testing.assert_close(uncached.detach(), cached, rtol=0, atol=0)


# -------------------------------------------------------------------------------- the cache
def test_second_prompt_is_not_served_the_first_prompts_residual(erased_image):
    pipe = fresh_with_adapter()
    generate(pipe, OTHER_PROMPT)
    np.testing.assert_array_equal(generate(pipe), erased_image)
    np.testing.assert_array_equal(generate(fresh_with_adapter(), OTHER_PROMPT), generate(pipe, OTHER_PROMPT))


@pytest.mark.parametrize(
    ("prompt", "kwargs"),
    [
        (PROMPT, {"num_images_per_prompt": 2}),
        ([PROMPT, OTHER_PROMPT], {}),
        (PROMPT, {"guidance_scale": 1.0}),
        ([OTHER_PROMPT, PROMPT], {"guidance_scale": 1.0, "num_images_per_prompt": 2}),
    ],
    ids=["images-per-prompt-2", "two-prompts", "no-cfg", "two-prompts-no-cfg-x2"],
)
def test_batch_shapes_and_cfg_after_other_calls(prompt, kwargs, warm_pipe):
    """One pipeline goes through every shape in turn; each call must equal a fresh pipeline's."""
    got = generate(warm_pipe, prompt, **kwargs)
    expected = generate(fresh_with_adapter(), prompt, **kwargs)
    np.testing.assert_array_equal(got, expected)


@pytest.fixture(scope="module")
def warm_pipe(erased_image):
    pipe = fresh_with_adapter()
    np.testing.assert_array_equal(generate(pipe), erased_image)  # fills the cache with batch 2 (CFG)
    return pipe


def test_in_place_edit_of_the_embedding_invalidates(sd_pipe):
    sd_pipe.load_cpe_adapter(random_adapter(sd_pipe), adapter_name="eraser")
    latents, timestep, embeds = unet_inputs(sd_pipe)
    first = unet_output(sd_pipe, (latents, timestep, embeds))
    with torch.no_grad():
        embeds.mul_(-1.0)
    second = unet_output(sd_pipe, (latents, timestep, embeds))
    expected = unet_output(fresh_with_adapter(), (latents, timestep, embeds.clone()))
    torch.testing.assert_close(second, expected, rtol=0, atol=0)
    assert not torch.allclose(first, second)


def test_in_place_edit_under_inference_mode_invalidates(sd_pipe):
    sd_pipe.load_cpe_adapter(random_adapter(sd_pipe), adapter_name="eraser")
    latents, timestep, embeds = unet_inputs(sd_pipe)
    with torch.inference_mode():
        embeds = embeds.clone()
        sd_pipe.unet(latents, timestep, encoder_hidden_states=embeds)
        embeds.mul_(-1.0)
        second = sd_pipe.unet(latents, timestep, encoder_hidden_states=embeds).sample
        expected = fresh_with_adapter().unet(latents, timestep, encoder_hidden_states=embeds.clone()).sample
    torch.testing.assert_close(second, expected, rtol=0, atol=0)


def test_in_place_edit_of_adapter_parameters_invalidates(sd_pipe):
    sd_pipe.load_cpe_adapter(random_adapter(sd_pipe), adapter_name="eraser")
    inputs = unet_inputs(sd_pipe)
    first = unet_output(sd_pipe, inputs)
    with torch.no_grad():
        sd_pipe.get_cpe_adapter("eraser").up.mul_(3.0)
    second = unet_output(sd_pipe, inputs)
    reference = tiny_pipeline("sd")
    adapter = random_adapter(reference)
    with torch.no_grad():
        adapter.up.mul_(3.0)
    reference.load_cpe_adapter(adapter)
    torch.testing.assert_close(second, unet_output(reference, inputs), rtol=0, atol=0)
    assert not torch.allclose(first, second)


def test_in_place_edit_of_base_weight_invalidates(sd_pipe):
    sd_pipe.load_cpe_adapter(random_adapter(sd_pipe), adapter_name="eraser")
    inputs = unet_inputs(sd_pipe)
    first = unet_output(sd_pipe, inputs)
    with torch.no_grad():
        projections(sd_pipe.unet)[1].weight.add_(0.5)
    second = unet_output(sd_pipe, inputs)
    reference = tiny_pipeline("sd")
    with torch.no_grad():
        projections(reference.unet)[1].weight.add_(0.5)
    reference.load_cpe_adapter(random_adapter(reference))
    torch.testing.assert_close(second, unet_output(reference, inputs), rtol=0, atol=0)
    assert not torch.allclose(first, second)


def test_scale_change_between_calls_invalidates(sd_pipe):
    sd_pipe.load_cpe_adapter(random_adapter(sd_pipe), adapter_name="eraser")
    inputs = unet_inputs(sd_pipe)
    full = unet_output(sd_pipe, inputs)
    sd_pipe.set_cpe_adapters("eraser", 0.5)
    half = unet_output(sd_pipe, inputs)
    reference = tiny_pipeline("sd")
    reference.load_cpe_adapter(random_adapter(reference), scale=0.5)
    torch.testing.assert_close(half, unet_output(reference, inputs), rtol=0, atol=0)
    assert not torch.allclose(full, half)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_moving_to_another_dtype_after_loading(dtype, reference_images):
    pipe = fresh_with_adapter()
    generate(pipe)  # caches fp32 projections
    pipe.to(dtype)
    got = generate(pipe)
    expected = generate(fresh_with_adapter(dtype=dtype))
    np.testing.assert_array_equal(got, expected)
    plain = tiny_pipeline("sd").to(dtype)
    assert not np.allclose(got, generate(plain), atol=1e-3), "the erasure must still apply after the move"
    assert pipe.get_cpe_adapter("eraser").gate_v.dtype == dtype


def test_loading_into_a_moved_pipeline_follows_its_dtype():
    pipe = fresh_with_adapter(dtype=torch.float64)
    adapter = pipe.get_cpe_adapter("eraser")
    assert all(p.dtype == torch.float64 for p in adapter.parameters())


# ------------------------------------------------------------------------- attention processors
@pytest.mark.parametrize("switch", ["AttnProcessor", "default", "AttnProcessor2_0"])
def test_erasure_survives_processor_changes(switch, sd_pipe, erased_image, reference_images):
    sd_pipe.load_cpe_adapter(random_adapter(sd_pipe), adapter_name="eraser")
    if switch == "AttnProcessor":
        sd_pipe.unet.set_attn_processor(AttnProcessor())
    elif switch == "default":
        sd_pipe.unet.set_default_attn_processor()
    else:
        sd_pipe.unet.set_attn_processor(AttnProcessor())
        sd_pipe.unet.set_attn_processor(AttnProcessor2_0())
    assert all(isinstance(p, CPELinear) for p in projections(sd_pipe.unet))
    image = generate(sd_pipe)
    np.testing.assert_allclose(image, erased_image, rtol=0, atol=1e-4)
    assert np.abs(image - reference_images()).max() > 1e-2


def test_processors_set_before_loading(sd_pipe, erased_image):
    sd_pipe.unet.set_attn_processor(AttnProcessor())
    sd_pipe.load_cpe_adapter(random_adapter(sd_pipe), adapter_name="eraser")
    np.testing.assert_allclose(generate(sd_pipe), erased_image, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- integrity guards
def test_loading_into_fused_projections_is_refused(sd_pipe):
    sd_pipe.fuse_qkv_projections()
    with pytest.raises(CPEAdapterError, match="fused") as info:
        sd_pipe.load_cpe_adapter(random_adapter(sd_pipe))
    assert "unfuse_qkv_projections" in str(info.value)
    assert get_runtime(sd_pipe.unet) is None and sd_pipe.list_cpe_adapters() == {}
    assert not any(isinstance(p, CPELinear) for p in projections(sd_pipe.unet))


def test_fusing_after_loading_fails_closed(sd_pipe, reference_images):
    sd_pipe.load_cpe_adapter(random_adapter(sd_pipe), adapter_name="eraser")
    sd_pipe.fuse_qkv_projections()
    with pytest.raises(ErasureIntegrityError, match="fused"):
        generate(sd_pipe)
    with pytest.raises(ErasureIntegrityError):
        unet_output(sd_pipe, unet_inputs(sd_pipe))
    sd_pipe.disable_cpe_adapters()  # the advice in the message: running unerased on purpose works
    plain = tiny_pipeline("sd")
    plain.fuse_qkv_projections()
    np.testing.assert_array_equal(generate(sd_pipe), generate(plain))


def test_unfusing_restores_erased_generation(sd_pipe, erased_image):
    sd_pipe.load_cpe_adapter(random_adapter(sd_pipe), adapter_name="eraser")
    sd_pipe.fuse_qkv_projections()
    sd_pipe.unfuse_qkv_projections()
    np.testing.assert_allclose(generate(sd_pipe), erased_image, rtol=0, atol=1e-5)


def test_replaced_projection_fails_closed(sd_pipe):
    sd_pipe.load_cpe_adapter(random_adapter(sd_pipe), adapter_name="eraser")
    attn = cross_attention_modules(sd_pipe.unet)[0][1]
    attn.to_v = nn.Linear(attn.to_v.in_features, attn.to_v.out_features, bias=False)
    with pytest.raises(ErasureIntegrityError, match="to_v"):
        unet_output(sd_pipe, unet_inputs(sd_pipe))


def test_attention_block_swapped_mid_prompt_fails_closed(sd_pipe):
    """A whole cross-attention module replaced while a prompt's projections are cached: the next call of
    that very prompt (no new cache entry, so no per-prompt check) still refuses to run unerased."""
    sd_pipe.load_cpe_adapter(random_adapter(sd_pipe), adapter_name="eraser")
    inputs = unet_inputs(sd_pipe)
    unet_output(sd_pipe, inputs)  # cached
    path, _ = cross_attention_modules(sd_pipe.unet)[-1]
    parent_path, _, name = path.rpartition(".")
    fresh = dict(tiny_pipeline("sd").unet.named_modules())[path]  # plain to_k / to_v
    setattr(sd_pipe.unet.get_submodule(parent_path), name, fresh)
    with pytest.raises(ErasureIntegrityError, match="replaced"):
        unet_output(sd_pipe, inputs)


@pytest.mark.parametrize("edit", ["insert_and_delete", "modules_dict"])
def test_container_edited_without_registration_fails_closed(sd_pipe, edit):
    """``ModuleList.insert`` and ``del`` write ``_modules`` directly (no registration hook fires):
    the per-call check of the path to every wrapped attention module still sees the swap."""
    sd_pipe.load_cpe_adapter(random_adapter(sd_pipe), adapter_name="eraser")
    inputs = unet_inputs(sd_pipe)
    unet_output(sd_pipe, inputs)  # cached, scanned
    blocks = sd_pipe.unet.down_blocks[0].attentions
    plain = tiny_pipeline("sd").unet.down_blocks[0].attentions[0]
    if edit == "insert_and_delete":
        blocks.insert(0, plain)
        del blocks[1]
    else:
        blocks._modules["0"] = plain
    with pytest.raises(ErasureIntegrityError, match="replaced"):
        unet_output(sd_pipe, inputs)


def test_integrity_scan_runs_again_only_after_a_registration(sd_pipe, monkeypatch):
    sd_pipe.load_cpe_adapter(random_adapter(sd_pipe), adapter_name="eraser")
    unet_output(sd_pipe, unet_inputs(sd_pipe, seed=0))
    scans = []
    original = runtime_module.cross_attention_modules
    monkeypatch.setattr(runtime_module, "cross_attention_modules", lambda d: scans.append(1) or original(d))
    for seed in (1, 2, 3):  # new prompts, nothing registered: no scan
        unet_output(sd_pipe, unet_inputs(sd_pipe, seed=seed))
    assert scans == []
    sd_pipe.unet.register_buffer("unrelated", torch.zeros(1))  # buffers are not modules or parameters
    unet_output(sd_pipe, unet_inputs(sd_pipe, seed=4))
    assert scans == []
    sd_pipe.unet.add_module("extra", nn.Identity())  # any registration: one scan, then none again
    for seed in (5, 6):
        unet_output(sd_pipe, unet_inputs(sd_pipe, seed=seed))
    assert len(scans) == 1
    sd_pipe.set_cpe_adapters("eraser", scales=0.5)  # a change of adapters or scales: one scan
    unet_output(sd_pipe, unet_inputs(sd_pipe, seed=7))
    assert len(scans) == 2


def test_weight_swapped_through_data_is_caught_without_a_registration(sd_pipe):
    sd_pipe.load_cpe_adapter(random_adapter(sd_pipe), adapter_name="eraser")
    unet_output(sd_pipe, unet_inputs(sd_pipe))
    _, attn = cross_attention_modules(sd_pipe.unet)[0]
    linear = attn.to_k
    linear.weight.data = torch.zeros(linear.out_features + 1, linear.in_features)
    with pytest.raises(ErasureIntegrityError, match="shape"):
        unet_output(sd_pipe, unet_inputs(sd_pipe, seed=1))


def test_one_adapter_object_in_two_pipelines_of_different_dtypes():
    adapter = random_adapter(tiny_pipeline("sd"))
    first = tiny_pipeline("sd")
    first.load_cpe_adapter(adapter, adapter_name="shared")
    inputs = unet_inputs(first)
    before = unet_output(first, inputs)
    second = tiny_pipeline("sd").to(torch.bfloat16)
    second.load_cpe_adapter(adapter, adapter_name="shared")
    latents, timestep, embeds = inputs
    low = unet_output(second, (latents.bfloat16(), timestep, embeds.bfloat16()))
    plain = unet_output(tiny_pipeline("sd").to(torch.bfloat16), (latents.bfloat16(), timestep, embeds.bfloat16()))
    assert not torch.allclose(low, plain, atol=1e-2)
    assert adapter.gate_v.dtype == torch.float32, "the caller's object keeps its precision"
    torch.testing.assert_close(unet_output(first, (latents, timestep, embeds.clone())), before, rtol=0, atol=0)


def test_the_callers_adapter_object_is_never_changed():
    """Loading stores a copy: the caller's object keeps training mode and ``requires_grad``, a later
    ``pipe.to`` converts only the copy, and editing the caller's object afterwards changes nothing."""
    pipe = tiny_pipeline("sd")
    adapter = random_adapter(pipe).train()
    pipe.load_cpe_adapter(adapter, adapter_name="mine")
    inputs = unet_inputs(pipe)
    erased = unet_output(pipe, inputs)
    assert adapter.training and all(p.requires_grad for p in adapter.parameters())
    latents, timestep, embeds = inputs
    with torch.no_grad():
        adapter.up.zero_()
    torch.testing.assert_close(unet_output(pipe, (latents, timestep, embeds.clone())), erased, rtol=0, atol=0)
    pipe.to(torch.bfloat16)
    unet_output(pipe, (latents.bfloat16(), timestep, embeds.bfloat16()))
    assert adapter.gate_v.dtype == torch.float32


def test_unet_with_encoder_hid_proj():
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            norm_num_groups=8,
            attention_head_dim=8,
            cross_attention_dim=32,
            encoder_hid_dim=48,
            encoder_hid_dim_type="text_proj",
        ).eval()
    adapter = set_random_weights(cpe_adapter.CPEAdapter.for_pipeline(unet, "x"))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds = torch.randn(1, 7, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = unet(latents, 10, encoder_hidden_states=embeds).sample
    # The layers read the 32-d output of ``encoder_hid_proj``, not the 48-d input: that is the
    # width the adapter must match, and the residual is computed on the projected embeddings.
    cpe_adapter.load_cpe_adapter(unet, adapter)
    with torch.no_grad():
        erased = unet(latents, 10, encoder_hidden_states=embeds).sample
        with no_cache():
            uncached = unet(latents, 10, encoder_hidden_states=embeds).sample
    assert not torch.allclose(plain, erased, atol=1e-4)
    assert torch.equal(erased, uncached)
    get_runtime(unet).enabled = False
    with torch.no_grad():
        assert torch.equal(unet(latents, 10, encoder_hidden_states=embeds).sample, plain)
