"""CPE adapters on every UNet family users run: SD 2.x and SDXL, their img2img / inpainting variants.

Each family gets one tiny offline pipeline per module (building one takes seconds); every test
starts from a pipeline without adapters and unloads what it loaded, so tests stay independent.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
)

import cpe_adapter
from conftest import random_adapter
from cpe_adapter import CPEAdapter, CPEAdapterError, IncompatibleAdapterError
from cpe_adapter.layer import CPELinear
from cpe_adapter.runtime import get_runtime
from cpe_adapter.testing import tiny_pipeline

PROMPT = "a painting by van gogh"
KINDS = ("sd2", "sdxl")
VARIANTS = {
    "sd2": {"img2img": StableDiffusionImg2ImgPipeline, "inpaint": StableDiffusionInpaintPipeline},
    "sdxl": {"img2img": StableDiffusionXLImg2ImgPipeline, "inpaint": StableDiffusionXLInpaintPipeline},
}

_PIPES: dict[str, Any] = {}


def _pipe(kind: str) -> Any:
    """One tiny pipeline per kind for the whole module (tests leave it without adapters)."""
    if kind not in _PIPES:
        _PIPES[kind] = tiny_pipeline(kind)
    return _PIPES[kind]


@pytest.fixture(params=KINDS)
def pipe(request: pytest.FixtureRequest) -> Iterator[Any]:
    pipeline = _pipe(request.param)
    assert get_runtime(pipeline.unet) is None, "a previous test left adapters loaded"
    yield pipeline
    pipeline.unload_cpe_adapter()


def generate(pipe: Any, prompt: str = PROMPT, **kwargs: Any) -> np.ndarray:
    """Final latents of a 2-step run (the VAE decode is a fixed function of them, so it is skipped)."""
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, generator=generator, output_type="latent", **kwargs).images.numpy()


def variant_inputs(variant: str) -> dict[str, Any]:
    """Image (and mask) inputs for the img2img / inpainting pipelines, fixed by a seed."""
    generator = torch.Generator().manual_seed(7)
    inputs: dict[str, Any] = {
        "image": torch.rand(1, 3, 64, 64, generator=generator),
        "strength": 0.5,
        "num_inference_steps": 2,
    }
    if variant == "inpaint":
        mask = torch.zeros(1, 1, 64, 64)
        mask[..., 16:48, 16:48] = 1.0
        inputs["mask_image"] = mask
    return inputs


def generate_variant(pipe: Any, variant: str, prompt: str = PROMPT) -> np.ndarray:
    inputs = variant_inputs(variant)
    steps = inputs.pop("num_inference_steps")
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=steps, generator=generator, output_type="latent", **inputs).images.numpy()


# ------------------------------------------------------------------------------------ text-to-image
def test_adapter_changes_output_and_every_off_switch_restores_it_bitwise(pipe: Any) -> None:
    untouched = generate(pipe)
    name = pipe.load_cpe_adapter(random_adapter(pipe), "eraser")
    erased = generate(pipe)
    assert np.abs(erased - untouched).max() > 1e-3

    pipe.disable_cpe_adapters()
    assert np.array_equal(generate(pipe), untouched)
    pipe.enable_cpe_adapters()
    assert np.array_equal(generate(pipe), erased)

    pipe.set_cpe_adapters([name], scales=[0.0])
    assert np.array_equal(generate(pipe), untouched)
    pipe.set_cpe_adapters([name])

    pipe.unload_cpe_adapter()
    assert np.array_equal(generate(pipe), untouched)


def test_saved_adapter_reloads_to_the_same_images(pipe: Any, tmp_path: Path) -> None:
    adapter = random_adapter(pipe, seed=3)
    pipe.load_cpe_adapter(adapter, "in_memory")
    from_memory = generate(pipe)
    adapter.save_pretrained(tmp_path / "eraser")
    pipe.unload_cpe_adapter()
    pipe.load_cpe_adapter(str(tmp_path / "eraser"))
    assert np.array_equal(generate(pipe), from_memory)


def test_only_cross_attention_key_value_projections_are_wrapped(pipe: Any) -> None:
    attn2 = [name for name, _ in pipe.unet.named_modules() if name.endswith("attn2")]
    pipe.load_cpe_adapter(random_adapter(pipe))
    wrapped = {name for name, module in pipe.unet.named_modules() if isinstance(module, CPELinear)}
    assert wrapped == {f"{path}.{proj}" for path in attn2 for proj in ("to_k", "to_v")}
    assert len(get_runtime(pipe.unet).layers) == 2 * len(attn2)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module) and component is not pipe.unet:
            assert not any(isinstance(m, CPELinear) for m in component.modules())


def test_sdxl_pooled_embeddings_and_added_conditioning_are_untouched() -> None:
    """SDXL conditions on text twice: cross-attention K/V (erased) and pooled + micro-conditioning
    through ``add_embedding`` (left alone, as in the paper). Only the former may change."""
    pipe = _pipe("sdxl")
    added: list[torch.Tensor] = []
    keys: list[torch.Tensor] = []
    first_key = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    hooks = [
        pipe.unet.add_embedding.register_forward_pre_hook(lambda _m, args: added.append(args[0].clone())),
        first_key.register_forward_pre_hook(
            lambda m, args, kwargs: keys.append(m.to_k(kwargs["encoder_hidden_states"]).clone()), with_kwargs=True
        ),
    ]
    try:
        encoded = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
        generate(pipe)
        pipe.load_cpe_adapter(random_adapter(pipe))
        encoded_after = pipe.encode_prompt(
            PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
        )
        generate(pipe)
    finally:
        for hook in hooks:
            hook.remove()
        pipe.unload_cpe_adapter()
    # prompt embeds, negative embeds, pooled embeds, negative pooled embeds
    assert len(encoded) == 4
    for before, after in zip(encoded, encoded_after, strict=True):
        assert torch.equal(before, after)
    steps = len(added) // 2
    assert steps == 2 and len(added) == 2 * steps
    for before, after in zip(added[:steps], added[steps:], strict=True):
        assert torch.equal(before, after)
    assert not torch.allclose(keys[0], keys[len(keys) // 2])


# ---------------------------------------------------------------------------- img2img / inpainting
@pytest.mark.parametrize("variant", ["img2img", "inpaint"])
def test_adapter_on_base_pipeline_acts_in_from_pipe_variant(pipe: Any, variant: str) -> None:
    kind = "sdxl" if pipe.unet.config.addition_embed_type == "text_time" else "sd2"
    derived = VARIANTS[kind][variant].from_pipe(pipe)
    derived.set_progress_bar_config(disable=True)
    assert derived.unet is pipe.unet
    untouched = generate_variant(derived, variant)

    name = pipe.load_cpe_adapter(random_adapter(pipe), "eraser")
    assert derived.get_active_cpe_adapters() == [name]
    erased = generate_variant(derived, variant)
    assert np.abs(erased - untouched).max() > 1e-3
    derived.disable_cpe_adapters()
    assert np.array_equal(generate_variant(derived, variant), untouched)
    derived.enable_cpe_adapters()

    derived.unload_cpe_adapter()
    assert pipe.get_active_cpe_adapters() == []
    derived.load_cpe_adapter(random_adapter(pipe), "direct")
    assert pipe.get_active_cpe_adapters() == ["direct"]
    assert np.array_equal(generate_variant(derived, variant), erased)


# ----------------------------------------------------------------------------------- compatibility
@pytest.mark.parametrize("kind", KINDS)
def test_sd1_adapter_is_refused_with_a_dimension_message(kind: str) -> None:
    sd_adapter = random_adapter(tiny_pipeline("sd"))
    target = _pipe(kind)
    with pytest.raises(IncompatibleAdapterError, match=r"32-d text embeddings") as info:
        target.load_cpe_adapter(sd_adapter)
    assert "64" in str(info.value)
    assert get_runtime(target.unet) is None


def test_adapter_for_another_layout_is_refused_and_loaded_ones_keep_working() -> None:
    sd2, sdxl = _pipe("sd2"), _pipe("sdxl")
    assert sd2.unet.config.cross_attention_dim == sdxl.unet.config.cross_attention_dim
    sdxl.load_cpe_adapter(random_adapter(sdxl), "xl")
    try:
        erased = generate(sdxl)
        with pytest.raises(IncompatibleAdapterError, match="layout"):
            sdxl.load_cpe_adapter(random_adapter(sd2))
        assert sdxl.get_active_cpe_adapters() == ["xl"]
        assert list(sdxl.list_cpe_adapters()) == ["xl"]
        assert np.array_equal(generate(sdxl), erased)
    finally:
        sdxl.unload_cpe_adapter()


def test_adapter_moves_between_fine_tunes_with_the_same_layout() -> None:
    """Same architecture, other weights (a fine-tune): the adapter loads and acts."""
    original, fine_tune = tiny_pipeline("sd", seed=0), tiny_pipeline("sd", seed=1)
    assert not torch.equal(original.unet.conv_in.weight, fine_tune.unet.conv_in.weight)
    adapter = random_adapter(original)
    untouched = generate(fine_tune)
    fine_tune.load_cpe_adapter(adapter)
    assert np.abs(generate(fine_tune) - untouched).max() > 1e-3
    fine_tune.disable_cpe_adapters()
    assert np.array_equal(generate(fine_tune), untouched)


# ------------------------------------------------------------------------------------------ training
TRAIN_TEMPLATES = ["{}", "a photo of {}", "a painting by {}", "{} walking in the park", "art by {}", "a portrait of {}"]
TRAIN_ANCHORS = ["a dog", "a red car", "a house", "a tree", "Picasso", "Monet"]


def relative_kv_change(pipe: Any, prompt: str) -> float:
    """‖P'(E) − P(E)‖ / ‖P(E)‖ over every wrapped to_k/to_v projection for ``prompt``'s embedding."""
    embeds = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    changed, original = 0.0, 0.0
    with torch.no_grad():
        for layer in get_runtime(pipe.unet).layers:
            projection = pipe.unet.get_submodule(layer.name)
            pipe.enable_cpe_adapters()
            erased = projection(embeds)
            pipe.disable_cpe_adapters()
            plain = projection(embeds)
            changed += (erased - plain).pow(2).sum().item()
            original += plain.pow(2).sum().item()
    pipe.enable_cpe_adapters()
    return (changed / original) ** 0.5


def test_training_erases_the_target_more_than_its_neighbours(pipe: Any) -> None:
    """A short train_cpe run on the pipeline's own (two, for SDXL) text encoders and K/V weights."""
    from cpe_adapter.training import train_cpe

    adapter = train_cpe(
        pipe,
        "Van Gogh",
        preset="styles",
        steps=200,
        seed=0,
        progress=False,
        templates=TRAIN_TEMPLATES,
        anchors=TRAIN_ANCHORS,
        anchor_weight=10.0,
        first_stage_lr=1e-2,
        lr=1e-3,
        stages=2,
    )
    assert adapter.config.text_embed_dim == pipe.unet.config.cross_attention_dim
    pipe.load_cpe_adapter(adapter)
    target = relative_kv_change(pipe, "a painting by Van Gogh")
    anchored_neighbour = relative_kv_change(pipe, "a painting by Monet")
    unseen_neighbour = relative_kv_change(pipe, "a painting by Rembrandt")
    assert target > 0.1
    assert target > 3 * anchored_neighbour
    assert target > 3 * unseen_neighbour


# ------------------------------------------------------------------------------- not supported yet
def tiny_mmdit(kind: str) -> torch.nn.Module:
    if kind == "sd3":
        return SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=16,
            pooled_projection_dim=16,
            pos_embed_max_size=16,
        )
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    )


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_mmdit_denoisers_are_refused_with_a_pointer_to_the_design(kind: str) -> None:
    """SD3 / Flux put text into joint attention (add_k_proj / add_v_proj), not attn2: see docs/design/mmdit.md."""
    transformer = tiny_mmdit(kind)
    pipeline_like = types.SimpleNamespace(transformer=transformer)
    with pytest.raises(CPEAdapterError, match=r"MMDiT.*docs/design/mmdit\.md"):
        CPEAdapter.for_pipeline(pipeline_like, ["van gogh"])
    with pytest.raises(CPEAdapterError, match="no cross-attention layers"):
        CPEAdapter.for_pipeline(transformer, ["van gogh"])
    assert not any(isinstance(m, CPELinear) for m in transformer.modules())


def test_unets_reading_text_through_added_key_value_projections_are_refused() -> None:
    """DeepFloyd IF / unCLIP blocks feed the text to add_k_proj/add_v_proj; their to_k/to_v see the image."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        cross_attention_dim=32,
        encoder_hid_dim=24,
        encoder_hid_dim_type="text_proj",
        attention_head_dim=8,
        norm_num_groups=8,
        resnet_time_scale_shift="scale_shift",
    )
    with pytest.raises(CPEAdapterError, match=r"add_k_proj/add_v_proj.*DeepFloyd IF or unCLIP"):
        CPEAdapter.for_pipeline(unet, ["van gogh"])
    sd_adapter = CPEAdapter.for_pipeline(_pipe("sd2"), ["van gogh"])
    with pytest.raises(CPEAdapterError, match="add_k_proj/add_v_proj"):
        cpe_adapter.load_cpe_adapter(unet, sd_adapter)
    assert get_runtime(unet) is None
    assert not any(isinstance(m, CPELinear) for m in unet.modules())


class _StoredInBfloat16(torch.nn.Linear):
    """A linear layer with a forward of its own (weights stored in bfloat16, computed in the input's
    dtype), as quantized layers (GGUF, bitsandbytes, quanto) are."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)


def test_projections_with_a_forward_of_their_own_are_refused_and_the_pipeline_keeps_working() -> None:
    pipe = tiny_pipeline("sd")
    adapter = random_adapter(pipe)
    attn = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    stored = _StoredInBfloat16(attn.to_k.in_features, attn.to_k.out_features, bias=attn.to_k.bias is not None)
    stored.weight = torch.nn.Parameter(attn.to_k.weight.detach().to(torch.bfloat16))
    attn.to_k = stored
    before = generate(pipe)
    with pytest.raises(CPEAdapterError, match=r"to_k is a _StoredInBfloat16, a linear layer with a forward of its own"):
        pipe.load_cpe_adapter(adapter)
    assert not pipe.list_cpe_adapters() and attn.to_k is stored
    np.testing.assert_array_equal(generate(pipe), before)


def _tiny_refiner() -> Any:
    """An SDXL-refiner-like img2img pipeline: only ``text_encoder_2`` (a CLIPTextModelWithProjection)
    and ``tokenizer_2``, aesthetic-score conditioning."""
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from transformers import CLIPTextModelWithProjection

    from cpe_adapter import testing

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer = testing.tiny_clip_tokenizer()
        pipe = StableDiffusionXLImg2ImgPipeline(
            vae=testing._vae(),
            text_encoder=None,
            text_encoder_2=CLIPTextModelWithProjection(testing._clip_text_config(tokenizer, 32, projection_dim=32)),
            tokenizer=None,
            tokenizer_2=tokenizer,
            unet=testing._unet(
                32,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(2, 4),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=5 * 8 + 32,
            ),
            scheduler=testing._scheduler(),
            requires_aesthetics_score=True,
            add_watermarker=False,
        )
    return testing.ready_for_tests(pipe)


def test_a_refiner_with_only_its_second_text_encoder_trains_erases_and_is_red_teamed() -> None:
    """Its one encoder's output starts with the pooled projection, and it has only ``tokenizer_2``."""
    pipe = _tiny_refiner()
    adapter = cpe_adapter.train_cpe(pipe, "Van Gogh", preset="styles", steps=4, progress=False)
    assert adapter.config.text_embed_dim == 32
    pipe.load_cpe_adapter(random_adapter(pipe))
    report = cpe_adapter.evaluate(
        pipe, ["Van Gogh"], ["Monet"], attack_budget=8, attack_prompts=1, embedding_steps=2, progress=False
    )
    assert report.figures["attack_recovery"] is not None and report.figures["attack_best_prompt"]
