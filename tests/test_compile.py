"""``torch.compile`` with adapters attached: same outputs as eager, no graph breaks, no recompiles on changes."""

from __future__ import annotations

import pytest
import torch

import cpe_adapter  # noqa: F401  (installs the pipeline methods)
from cpe_adapter import CPEAdapter
from cpe_adapter.runtime import get_runtime, no_cache
from cpe_adapter.targets import denoiser_of
from cpe_adapter.testing import tiny_pipeline

dynamo = pytest.importorskip("torch._dynamo")


def random_adapter(pipe, count: int, seed: int) -> CPEAdapter:
    adapter = CPEAdapter.for_pipeline(pipe, [f"concept {seed} {i}" for i in range(count)])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return adapter


class CountingBackend:
    """A dynamo backend that records every graph it is given and runs it as traced (no codegen)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


@pytest.fixture(scope="module", autouse=True)
def isolated_compiler(tmp_path_factory):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
    dynamo.reset()
    yield
    dynamo.reset()
    mp.undo()
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_pipeline("sd")
    pipe.load_cpe_adapter(random_adapter(pipe, 3, seed=1), "a")
    pipe.load_cpe_adapter(random_adapter(pipe, 2, seed=2), "b")
    return pipe


def embeddings(seed: int) -> torch.Tensor:
    return torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(seed))


def linear_calls(graph_module) -> int:
    return sum(node.op == "call_function" and "linear" in str(node.target) for node in graph_module.graph.nodes)


def compare(compiled, unet, embeds: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(step))
    timestep = torch.tensor(10 * step + 1)
    with torch.no_grad():
        return (
            compiled(sample, timestep, encoder_hidden_states=embeds).sample,
            unet(sample, timestep, encoder_hidden_states=embeds).sample,
        )


def test_compiled_unet_follows_prompts_scales_and_active_set_without_recompiling(pipe):
    unet = denoiser_of(pipe)
    backend = CountingBackend()
    compiled = torch.compile(unet, backend=backend)
    first, second = embeddings(0), embeddings(1)
    pipe.set_cpe_adapters(["a", "b"])
    for step, embeds in enumerate([first, first, second, second]):
        assert torch.equal(*compare(compiled, unet, embeds, step))
    warm = backend.graphs
    outputs = []
    for names, scales in [(["a", "b"], [0.5, 2.0]), (["b"], None), (["a", "b"], None)]:
        pipe.set_cpe_adapters(names, scales)
        got, expected = compare(compiled, unet, second, 1)
        assert torch.equal(got, expected)
        outputs.append(got)
    assert backend.graphs == warm  # changing scales or the active set reuses the graph
    assert not torch.equal(outputs[0], outputs[1])
    pipe.disable_cpe_adapters()
    off, expected = compare(compiled, unet, second, 1)
    assert torch.equal(off, expected) and not torch.equal(off, outputs[2])
    pipe.enable_cpe_adapters()
    assert torch.equal(compare(compiled, unet, second, 1)[0], outputs[2])
    assert backend.graphs <= warm + 1  # on/off selects one of two graphs


def test_compiled_first_with_erasure_off_then_on_compiles_two_graphs():
    """Compiled while erasure is off (so no integrity scan has run yet), then switched on and fed new
    prompts: the integrity bookkeeping (its watched-module set, filled by the first scan) must not
    become a guard of the graph; erasure on and off are the only two graphs."""
    fresh = tiny_pipeline("sd")
    fresh.load_cpe_adapter(random_adapter(fresh, 2, seed=3), "only")
    unet = denoiser_of(fresh)
    backend = CountingBackend()
    compiled = torch.compile(unet, backend=backend)
    fresh.disable_cpe_adapters()
    assert torch.equal(*compare(compiled, unet, embeddings(5), 0))
    fresh.enable_cpe_adapters()
    for step, seed in enumerate([5, 6, 7]):
        assert torch.equal(*compare(compiled, unet, embeddings(seed), step))
    fresh.unet.add_module("unrelated_extra", torch.nn.Identity())  # a registration: the next call rescans
    assert torch.equal(*compare(compiled, unet, embeddings(8), 4))
    assert backend.graphs == 2


def test_no_graph_breaks_with_adapters_active(pipe):
    unet = denoiser_of(pipe)
    pipe.set_cpe_adapters(["a", "b"], [1.0, 0.5])
    sample, embeds = torch.randn(2, 4, 8, 8), embeddings(2)
    with torch.no_grad():
        explained = dynamo.explain(unet)(sample, torch.tensor(5), encoder_hidden_states=embeds)
        pipe.disable_cpe_adapters()
        plain = dynamo.explain(unet)(sample, torch.tensor(5), encoder_hidden_states=embeds)
        pipe.enable_cpe_adapters()
    assert explained.graph_break_count == 0
    assert explained.graph_count == 1
    # The prepared K/V enter the graph as inputs: every wrapped projection's matmul is gone from it.
    projections = len(get_runtime(unet).layers)
    assert linear_calls(plain.graphs[0]) - linear_calls(explained.graphs[0]) == projections


def test_compiled_pipeline_matches_eager(pipe):
    pipe.set_cpe_adapters(["a", "b"])
    kwargs = {"num_inference_steps": 2, "output_type": "latent", "guidance_scale": 5.0}
    eager = pipe("a red car", generator=torch.Generator().manual_seed(0), **kwargs).images
    original = pipe.unet
    pipe.unet = torch.compile(original, backend="aot_eager")
    try:
        compiled = pipe("a red car", generator=torch.Generator().manual_seed(0), **kwargs).images
        pipe.set_cpe_adapters(["a"], [0.3])
        rescaled = pipe("a red car", generator=torch.Generator().manual_seed(0), **kwargs).images
    finally:
        pipe.unet = original
    with no_cache():
        expected = pipe("a red car", generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rescaled, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(rescaled, compiled)
