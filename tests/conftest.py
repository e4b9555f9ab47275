"""Shared helpers and fixtures for the adapter-format and runtime tests.

Everything runs offline on CPU with ``tiny_pipeline("sd")``: 2 denoising steps at 64x64,
``output_type="np"`` and a fixed generator, so two runs of the same thing are bitwise equal and any
difference is a real change in behaviour.

Helpers are plain functions (importable as ``from conftest import ...``); fixtures build what is
expensive once per module or session. The fake Hub fixtures come from ``tests/fake_hub.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

import cpe_adapter
from cpe_adapter import CPEAdapter
from cpe_adapter.runtime import get_runtime
from cpe_adapter.targets import cross_attention_modules, find_target_layers
from cpe_adapter.testing import tiny_pipeline
from fake_hub import fake_hub, offline_hub_cache, populate_hub_cache

__all__ = [
    "FAST_TRAINING",
    "PROMPT",
    "SHORT_TRAINING",
    "adapter_weights",
    "fake_hub",
    "generate",
    "kv_projections",
    "offline_hub_cache",
    "populate_hub_cache",
    "random_adapter",
    "set_random_weights",
    "unet_inputs",
    "unet_output",
]

PROMPT = "a painting by Van Gogh"
OTHER_PROMPT = "a photo of a red car in the city"
STEPS = 2
# Training settings that learn in seconds on the tiny pipelines (few templates and anchors, high rates).
FAST_TRAINING = {
    "templates": ["{}", "a photo of {}", "a painting by {}", "{} walking in the park", "art by {}", "a portrait of {}"],
    "anchors": ["a dog", "a red car", "a house", "a tree", "Picasso", "Monet", "Van Gogh"],
    "anchor_weight": 10.0,
    "first_stage_lr": 1e-2,
    "lr": 1e-3,
    "stages": 4,
    "progress": False,
}
# A shorter run of the same settings: three stages, 60 erase steps.
SHORT_TRAINING = {**FAST_TRAINING, "steps": 60, "stages": 3}


def generate(pipe: Any, prompt: str | list[str] = PROMPT, seed: int = 0, **kwargs: Any) -> np.ndarray:
    """Images of ``pipe`` for ``prompt`` with a fixed generator (2 steps, 64x64, float numpy)."""
    kwargs.setdefault("num_inference_steps", STEPS)
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, height=64, width=64, generator=generator, output_type="np", **kwargs).images


def set_random_weights(adapter: CPEAdapter, seed: int = 1, std: float = 0.3) -> CPEAdapter:
    """Fill every parameter of ``adapter`` from a seeded generator (non-zero residual, non-trivial gate)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32) * std)
    return adapter


def random_adapter(
    pipe: Any, concepts: str | list[str] = "Van Gogh", seed: int = 1, std: float = 0.3, **overrides: Any
) -> CPEAdapter:
    """A CPE adapter sized for ``pipe`` whose weights are all random (deterministic for ``seed``)."""
    adapter = CPEAdapter.for_pipeline(pipe, concepts, **overrides)
    return set_random_weights(adapter, seed=seed, std=std)


def unet_inputs(pipe: Any, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(latents, timestep, encoder_hidden_states)`` for a direct UNet call, fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    latents = torch.randn(batch, unet.config.in_channels, 8, 8, generator=generator)
    embeds = torch.randn(batch, 11, unet.config.cross_attention_dim, generator=generator)
    return latents, torch.tensor(500), embeds


def unet_output(pipe: Any, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One UNet forward under ``no_grad`` (the path the pipeline takes, where the cache is used)."""
    latents, timestep, embeds = inputs
    with torch.no_grad():
        return pipe.unet(latents, timestep, encoder_hidden_states=embeds).sample


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_worker() -> Iterator[None]:
    """One intra-op thread per test process: tiny models run far faster without thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def sd_pipe() -> Iterator[Any]:
    """A fresh tiny SD 1.x pipeline (about 0.1 s to build), discarded after the test."""
    pipe = tiny_pipeline("sd")
    yield pipe
    runtime = get_runtime(pipe.unet)
    if runtime is not None:
        cpe_adapter.unload_cpe_adapter(pipe)


@pytest.fixture(scope="session")
def reference_images() -> Callable[..., np.ndarray]:
    """Outputs of a never-touched tiny SD pipeline, memoised by their arguments.

    The pipeline behind it never gets an adapter, a LoRA or a dtype change, so its images are the
    "pipeline without adapters" of docs/api.md.
    """
    pipe = tiny_pipeline("sd")
    memo: dict[str, np.ndarray] = {}

    def images(prompt: str | list[str] = PROMPT, seed: int = 0, **kwargs: Any) -> np.ndarray:
        key = repr((prompt, seed, sorted(kwargs.items())))
        if key not in memo:
            memo[key] = generate(pipe, prompt, seed, **kwargs)
        return memo[key].copy()

    return images


@pytest.fixture(scope="session")
def sd_layers() -> list:
    """The target layers (``attn2.to_k`` / ``to_v``) of the tiny SD UNet."""
    return find_target_layers(tiny_pipeline("sd").unet)


def kv_projections(pipe: Any, embeds: torch.Tensor) -> torch.Tensor:
    """``[n, T, sum(d_out)]``: what the UNet's (possibly wrapped) to_k/to_v layers output for ``embeds``."""
    outs = []
    with torch.no_grad():
        for _, attn in cross_attention_modules(pipe.unet):
            outs += [attn.to_k(embeds), attn.to_v(embeds)]
    return torch.cat(outs, dim=-1)


def adapter_weights(adapter: CPEAdapter) -> dict[str, torch.Tensor]:
    """Every tensor of ``adapter`` under its file name (to compare two trained adapters bit for bit)."""
    return adapter.file_state_dict()
