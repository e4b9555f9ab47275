"""Prompts and text embeddings for training (docs/training.md).

Training never runs the UNet: every prompt is encoded once with the pipeline's own text
encoder(s), exactly as generation encodes it (``pipe.encode_prompt``), and cached. This module
builds the prompt lists (templates x target / neutral / anchors), picks the anchor concepts most
similar to the target, checks concepts against the tokenizer, and encodes in batches.

Bit-exactness across processes: an encoder call's result depends on how prompts are batched
(matrix kernels may sum in another order for another batch shape). Every prompt list here is
therefore encoded by one call whose batches depend only on that list, and the in-process cache
is keyed by the whole list, so a cached result has the very bits a fresh call would give. That
keeps one concept's training independent of which other concepts share the process.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import pools
from .errors import CPEAdapterError

ENCODE_BATCH = 128
# Caches larger than this (bytes, fp32) are kept in half precision on the CPU.
HALF_PRECISION_BYTES = 256 * 1024**2
# Each training run encodes a handful of lists (target, neutral, shared and specific anchors);
# keep several runs' worth so training concepts one after another never re-encodes shared anchors.
CACHE_CALLS = 64

_cache: weakref.WeakKeyDictionary[nn.Module, OrderedDict[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()


@dataclass
class PromptSet:
    """Encoded prompts of one concept: ``[n_templates, T, d]`` target and neutral, ``[n_anchor, T, d]`` anchors.

    ``empty`` is the embedding of the empty prompt ``""`` (``[T, d]``), always anchored.
    """

    templates: list[str]
    target: torch.Tensor
    neutral: torch.Tensor
    anchors: torch.Tensor
    empty: torch.Tensor
    anchor_prompts: list[str]


def tokenizers_of(pipe: Any) -> list[Any]:
    """The pipeline's tokenizers (one for SD 1.x/2.x, two for SDXL)."""
    found = [getattr(pipe, name, None) for name in ("tokenizer", "tokenizer_2")]
    found = [t for t in found if t is not None]
    if not found:
        raise CPEAdapterError(
            f"{type(pipe).__name__} has no tokenizer (`tokenizer` or `tokenizer_2`); cpe-adapter reads prompts with "
            "the pipeline's own tokenizer and text encoder."
        )
    return found


def text_encoders_of(pipe: Any) -> list[nn.Module]:
    found = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")]
    found = [t for t in found if t is not None]
    if not found:
        raise CPEAdapterError(f"{type(pipe).__name__} has no text encoder; training needs one to encode prompts.")
    return found


def check_concept(pipe: Any, name: str) -> str:
    """Return ``name`` stripped; raise if it is empty or does not fit the tokenizer's window."""
    if not isinstance(name, str) or not name.strip():
        raise CPEAdapterError(f"Concept {name!r} is empty; pass a non-empty string such as 'Van Gogh'.")
    name = name.strip()
    for tokenizer in tokenizers_of(pipe):
        limit = int(tokenizer.model_max_length)
        length = len(tokenizer(name, truncation=False)["input_ids"])
        if length > limit:
            raise CPEAdapterError(
                f"Concept {name[:40]!r}... is {length} tokens long (special tokens included), more than the "
                f"tokenizer's {limit}; shorten it, e.g. to the name or phrase alone."
            )
    return name


def fill(templates: Sequence[str], concept: str) -> list[str]:
    return [t.replace("{}", concept) for t in templates]


def fill_rotating(templates: Sequence[str], concepts: Sequence[str], per_concept: int | None) -> list[str]:
    """Each concept in ``per_concept`` templates, the window moving on by ``per_concept`` from one
    concept to the next (so consecutive concepts cover every template); ``None``: every template."""
    if per_concept is None or per_concept >= len(templates):
        return [p for concept in concepts for p in fill(templates, concept)]
    n = len(templates)
    return [
        templates[(i * per_concept + j) % n].replace("{}", concept)
        for i, concept in enumerate(concepts)
        for j in range(per_concept)
    ]


def _encoder_key(pipe: Any) -> nn.Module:
    return text_encoders_of(pipe)[0]


def _versions(pipe: Any) -> tuple:
    return tuple(p._version for enc in text_encoders_of(pipe) for p in enc.parameters())


def _cached(pipe: Any, key: tuple, compute) -> torch.Tensor:
    owner = _encoder_key(pipe)
    store = _cache.setdefault(owner, OrderedDict())
    full_key = (*key, _versions(pipe))
    if full_key in store:
        store.move_to_end(full_key)
        return store[full_key]
    value = compute()
    store[full_key] = value
    while len(store) > CACHE_CALLS:
        store.popitem(last=False)
    return value


def clear_embedding_cache() -> None:
    """Forget every cached prompt encoding (e.g. after changing text-encoder weights by ``.data``)."""
    _cache.clear()


def encode_prompts(
    pipe: Any, prompts: Sequence[str], *, batch_size: int = ENCODE_BATCH, cache: bool = True
) -> torch.Tensor:
    """``[n, T, d]`` text embeddings of ``prompts``, as the pipeline's ``encode_prompt`` makes them.

    For SD 1.x/2.x this is the text encoder's last hidden state; for SDXL the concatenated
    penultimate states of both encoders, exactly what generation feeds the UNet. Encoded without
    gradients in batches of ``batch_size``; kept in fp32, or fp16 on the CPU when the result
    would exceed ``HALF_PRECISION_BYTES``. ``cache=False`` bypasses the in-process cache (for
    one-off lists such as search candidates).
    """
    prompts = list(prompts)
    if not prompts:
        raise CPEAdapterError("No prompts to encode.")

    def compute() -> torch.Tensor:
        encoder = _encoder_key(pipe)
        device = next(encoder.parameters()).device
        parts: list[torch.Tensor] = []
        half = False
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start : start + batch_size]
                embeds = pipe.encode_prompt(
                    prompt=batch, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
                )[0]
                embeds = embeds.float().cpu()
                if start == 0:
                    half = embeds[0].numel() * 4 * len(prompts) > HALF_PRECISION_BYTES
                parts.append(embeds.half() if half else embeds)
        return torch.cat(parts)

    if not cache:
        return compute()
    return _cached(pipe, ("encode", tuple(prompts), batch_size), compute)


def name_embeddings(pipe: Any, names: Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
    """Unit-norm ``[n, d]`` embeddings of bare names, for ranking concepts by similarity.

    The first text encoder's hidden states of the name's tokens (special tokens included), averaged
    over the real tokens (the attention mask) and normalised: cheap (no padding to the full window;
    names are batched by token count, so a batch pads to little) and, on the pipeline's own encoder,
    a faithful measure of which names it confuses.
    """
    names = list(names)

    def compute() -> torch.Tensor:
        tokenizer = tokenizers_of(pipe)[0]
        encoder = _encoder_key(pipe)
        device = next(encoder.parameters()).device
        ids_of = tokenizer(names, truncation=True)["input_ids"]
        order = sorted(range(len(names)), key=lambda i: (len(ids_of[i]), i))
        result = torch.empty(len(names), 0)
        with torch.no_grad():
            for start in range(0, len(names), batch_size):
                chunk = order[start : start + batch_size]
                batch = tokenizer([names[i] for i in chunk], padding="longest", truncation=True, return_tensors="pt")
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                # ``last_hidden_state`` by name: element 0 of a CLIPTextModelWithProjection's output is its
                # pooled projection (an SDXL refiner's only encoder).
                hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
                weights = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
                if result.shape[1] == 0:
                    result = torch.empty(len(names), pooled.shape[1])
                result[chunk] = torch.nn.functional.normalize(pooled, dim=-1).cpu()
        return result

    return _cached(pipe, ("names", tuple(names)), compute)


def similar_concepts(pipe: Any, target: str, pool: Sequence[str], count: int) -> list[str]:
    """The ``count`` pool names most similar to ``target`` (cosine of bare-name embeddings).

    Names containing the target (case-insensitive) and the target itself are excluded: they would
    teach the eraser to keep what it must erase. Ties keep the pool order.
    """
    if count <= 0:
        return []
    lowered = target.lower()
    candidates = [p for p in dict.fromkeys(pool) if lowered not in p.lower() and p.lower() != lowered]
    if not candidates:
        return []
    embeds = name_embeddings(pipe, [target, *candidates])
    scores = embeds[1:] @ embeds[0]
    order = sorted(range(len(candidates)), key=lambda i: (-float(scores[i]), i))
    return [candidates[i] for i in order[:count]]


def anchor_prompts(
    pipe: Any,
    target: str,
    domain: str,
    templates: Sequence[str],
    *,
    anchors: Sequence[str] | None,
    similar: int,
    per_concept: int | None = None,
    erased: Sequence[str] = (),
) -> tuple[list[str], list[str]]:
    """Anchor prompts as two lists: shared by every concept of ``domain``, and specific to ``target``.

    Default: the domain's general words and the ``similar`` most similar pool concepts, each in
    ``per_concept`` templates (:func:`fill_rotating`; ``None``: every template); for ``"explicit"``
    the everyday sentences as they are. A user ``anchors`` list replaces both (concepts filled into
    templates the same way; whole sentences for ``"explicit"``). Every anchor that contains the
    target is left out (a general word such as "cubism" when "Cubism" is erased): anchoring it
    would hold in place what the erase loss moves. So is every pool concept that contains another
    concept of the same run (``erased``): those are to be erased, not kept.
    """
    lowered = target.lower()
    others = [e.lower() for e in erased if e.lower() != lowered]

    def without_target(entries: Sequence[str]) -> list[str]:
        return [e for e in entries if lowered not in e.lower()]

    if anchors is not None:
        anchors = without_target([a for a in (str(x).strip() for x in anchors) if a])
        if not anchors:
            raise CPEAdapterError(
                "`anchors` is empty (entries containing the target are left out); pass some concepts to preserve, "
                "or None for the defaults."
            )
        if domain == "explicit":
            return [], list(anchors)
        return [], fill_rotating(templates, anchors, per_concept)
    if domain == "explicit":
        return without_target(pools.concept_pool("explicit")), []
    shared = fill_rotating(templates, without_target(pools.general_words(domain)), per_concept)
    pool = [p for p in pools.concept_pool(domain) if not any(e in p.lower() for e in others)]
    chosen = similar_concepts(pipe, target, pool, similar)
    return shared, fill_rotating(templates, chosen, per_concept)


def build_prompt_set(
    pipe: Any,
    target: str,
    neutral: str,
    domain: str,
    *,
    templates: Sequence[str] | None = None,
    anchors: Sequence[str] | None = None,
    similar: int = 50,
    anchor_templates: int | None = None,
    erased: Sequence[str] = (),
) -> PromptSet:
    """Encode everything one concept's training needs (see :class:`PromptSet`); ``anchor_templates``
    is the number of templates per anchor concept (:func:`fill_rotating`); ``erased``: the run's
    other concepts, never anchors."""
    templates = list(templates) if templates is not None else pools.templates(domain)
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise CPEAdapterError("Every template needs exactly one '{}' placeholder for the concept.")
    shared, specific = anchor_prompts(
        pipe, target, domain, templates, anchors=anchors, similar=similar, per_concept=anchor_templates, erased=erased
    )
    parts = [encode_prompts(pipe, p) for p in (shared, specific) if p]
    anchor_embeds = torch.cat(parts) if len(parts) > 1 else parts[0]
    return PromptSet(
        templates=templates,
        target=encode_prompts(pipe, fill(templates, target)).float(),
        neutral=encode_prompts(pipe, fill(templates, neutral)).float(),
        anchors=anchor_embeds,
        empty=encode_prompts(pipe, [""])[0].float(),
        anchor_prompts=[*shared, *specific],
    )
