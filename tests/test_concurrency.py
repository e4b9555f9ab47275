"""Threads sharing one UNet: per-thread adapter choices and prompts never mix residuals."""

from __future__ import annotations

import contextvars
import copy
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

import cpe_adapter
from conftest import random_adapter
from cpe_adapter.testing import tiny_pipeline

PROMPTS = {"a": "a painting by Van Gogh", "b": "a photo of Taylor Swift on a stage"}


def latents(pipe: Any, prompt: str) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    out = pipe(prompt, num_inference_steps=2, height=64, width=64, generator=generator, output_type="latent")
    return out.images.numpy()


@pytest.fixture(scope="module")
def shared() -> tuple[Any, Any]:
    pipe = tiny_pipeline("sd")
    pipe.load_cpe_adapter(random_adapter(pipe, "Van Gogh", seed=1), adapter_name="a")
    pipe.load_cpe_adapter(random_adapter(pipe, "Taylor Swift", seed=2), adapter_name="b")
    # The Hugging Face tokenizer keeps its padding/truncation settings on the object, so two threads
    # tokenizing with one tokenizer can get each other's padding (diffusers asks "longest" for its
    # truncation warning, "max_length" for the prompt). Each thread's pipeline gets its own.
    other = StableDiffusionPipeline.from_pipe(pipe, tokenizer=copy.deepcopy(pipe.tokenizer))
    other.set_progress_bar_config(disable=True)
    assert other.unet is pipe.unet
    return pipe, other


def expected(shared: tuple[Any, Any], name: str, prompt: str) -> np.ndarray:
    pipe, _ = shared
    pipe.set_cpe_adapters([name])
    try:
        return latents(pipe, prompt)
    finally:
        pipe.set_cpe_adapters(["a", "b"])


def run_threads(work: dict[str, Any], rounds: int = 4) -> dict[str, list[np.ndarray]]:
    results: dict[str, list[np.ndarray]] = {key: [] for key in work}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(work))

    def worker(key: str) -> None:
        try:
            barrier.wait()
            for _ in range(rounds):
                results[key].append(work[key]())
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(key,)) for key in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    if errors:
        raise errors[0]
    return results


def test_each_thread_uses_its_own_adapters(shared: tuple[Any, Any]) -> None:
    pipe, other = shared
    want = {key: expected(shared, key, PROMPTS["a"]) for key in ("a", "b")}
    assert not np.array_equal(want["a"], want["b"]), "the two erasers must act differently on the prompt"

    def job(p: Any, key: str) -> Any:
        def run() -> np.ndarray:
            with cpe_adapter.use_cpe_adapters(p, [key]):
                return latents(p, PROMPTS["a"])

        return run

    results = run_threads({"a": job(pipe, "a"), "b": job(other, "b")})
    for key, images in results.items():
        for image in images:
            np.testing.assert_array_equal(image, want[key])
    assert pipe.get_active_cpe_adapters() == ["a", "b"], "a thread's choice must not leak into the shared state"


def test_threads_with_different_prompts_get_their_own_erasure(shared: tuple[Any, Any]) -> None:
    pipe, other = shared
    want = {key: latents(pipe, prompt) for key, prompt in PROMPTS.items()}
    pipes = dict(zip(PROMPTS, (pipe, other), strict=True))
    results = run_threads({key: (lambda p=pipes[key], q=q: latents(p, q)) for key, q in PROMPTS.items()})
    for key, images in results.items():
        for image in images:
            np.testing.assert_array_equal(image, want[key])


def test_thread_choice_ends_with_the_block_and_is_checked(shared: tuple[Any, Any]) -> None:
    pipe, _ = shared
    both = latents(pipe, PROMPTS["a"])
    with cpe_adapter.use_cpe_adapters(pipe, ["a"], scales=[0.0]):
        plain = latents(pipe, PROMPTS["a"])
    pipe.disable_cpe_adapters()
    try:
        np.testing.assert_array_equal(plain, latents(pipe, PROMPTS["a"]))
    finally:
        pipe.enable_cpe_adapters()
    np.testing.assert_array_equal(both, latents(pipe, PROMPTS["a"]))
    with pytest.raises(cpe_adapter.CPEAdapterError, match="nope"), cpe_adapter.use_cpe_adapters(pipe, ["nope"]):
        pass


def test_a_selection_made_while_another_thread_prepares_is_never_served_its_projections(
    shared: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thread A prepares the shared projections of a global-selection call; thread B enters
    ``use_cpe_adapters`` meanwhile and runs on the very same embedding while A's forward is still
    in flight. B must get its own selection, not A's prepared K/V. Events, not sleeps, order the
    two threads: A holds in its integrity check until B has started, and in its first block until
    B is done."""
    from cpe_adapter.runtime import CPERuntime
    from cpe_adapter.targets import denoiser_of

    pipe, _ = shared
    unet = denoiser_of(pipe)
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))

    def call() -> torch.Tensor:
        with torch.no_grad():
            return unet(sample, 10, encoder_hidden_states=embeds).sample.clone()

    with cpe_adapter.use_cpe_adapters(pipe, ["b"]):
        want_b = call()
    b_started, a_in_forward, b_done = threading.Event(), threading.Event(), threading.Event()
    original_check = CPERuntime._check_slots

    def held_check(self: CPERuntime) -> None:
        if threading.current_thread() is thread_a:
            b_started.wait(timeout=30)
        original_check(self)

    def hold_a(module: Any, args: Any) -> None:
        if threading.current_thread() is thread_a:
            a_in_forward.set()
            b_done.wait(timeout=30)

    results: dict[str, torch.Tensor] = {}

    def run_b() -> None:
        b_started.set()
        with cpe_adapter.use_cpe_adapters(pipe, ["b"]):
            a_in_forward.wait(timeout=30)
            results["b"] = call()
        b_done.set()

    monkeypatch.setattr(CPERuntime, "_check_slots", held_check)
    handle = unet.down_blocks[0].register_forward_pre_hook(hold_a)
    thread_a = threading.Thread(target=lambda: results.setdefault("a", call()))
    thread_b = threading.Thread(target=run_b)
    try:
        thread_a.start()
        thread_b.start()
        thread_a.join(timeout=120)
        thread_b.join(timeout=120)
    finally:
        handle.remove()
    assert a_in_forward.is_set() and b_done.is_set()
    assert torch.equal(results["b"], want_b)


def test_an_adapter_an_open_block_uses_cannot_be_unloaded_from_any_thread(shared: tuple[Any, Any]) -> None:
    """The block would otherwise lose that erasure without a word (or, unloading all, every erasure)."""
    pipe, other = shared
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with cpe_adapter.use_cpe_adapters(other, ["a"]):
            inside.set()
            release.wait(timeout=60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert inside.wait(timeout=60)
        for names in ("a", None):
            with pytest.raises(cpe_adapter.CPEAdapterError, match=r"\['a'\] are in use by an open `use_cpe_adapters`"):
                pipe.unload_cpe_adapter(names)
        assert set(pipe.list_cpe_adapters()) == {"a", "b"}
    finally:
        release.set()
        holder.join(timeout=60)
    with cpe_adapter.use_cpe_adapters(pipe, ["b"]), pytest.raises(cpe_adapter.CPEAdapterError, match=r"\['b'\]"):
        pipe.unload_cpe_adapter("b")
    name = pipe.load_cpe_adapter(random_adapter(pipe, "Monet", seed=3), adapter_name="c")
    pipe.unload_cpe_adapter(name)  # no block holds it: unloads as before
    assert set(pipe.list_cpe_adapters()) == {"a", "b"} and pipe.get_active_cpe_adapters() == ["a", "b"]


def test_a_block_left_in_another_context_gives_its_adapters_back(shared: tuple[Any, Any]) -> None:
    """A generator stepped from copied contexts (a streaming response in a thread pool) enters its
    block in one context and leaves it in another."""
    pipe, _ = shared

    def stream() -> Iterator[int]:
        with cpe_adapter.use_cpe_adapters(pipe, ["a"]):
            yield 1

    steps = stream()
    contextvars.copy_context().run(next, steps)
    with pytest.raises(StopIteration):
        contextvars.copy_context().run(next, steps)
    name = pipe.load_cpe_adapter(random_adapter(pipe, "Monet", seed=4), adapter_name="d")
    pipe.unload_cpe_adapter(name)
    with cpe_adapter.use_cpe_adapters(pipe, ["a"]):
        pass
    runtime = cpe_adapter.runtime.get_runtime(pipe.unet)
    assert runtime.thread_selections == 0
    runtime.check_not_held(["a", "b"])


def test_a_context_copied_inside_an_ended_block_cannot_switch_erasure_off(shared: tuple[Any, Any]) -> None:
    """Say an asyncio task started inside ``use_cpe_adapters(pipe, [])``: after the block, a change
    it makes must be judged by the shared state, not by the choice its copied context still holds."""
    pipe, _ = shared
    erased = latents(pipe, PROMPTS["a"])
    with cpe_adapter.use_cpe_adapters(pipe, []):
        copied = contextvars.copy_context()
    copied.run(pipe.set_cpe_adapters, ["a", "b"])
    np.testing.assert_array_equal(latents(pipe, PROMPTS["a"]), erased)
