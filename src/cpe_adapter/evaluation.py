"""Measuring an erasure: `evaluate` compares a pipeline *as it is now* with the same pipeline unerased.

Everything is measured on the cross-attention keys and values, where CPE acts (docs/concepts.md).
With ``P_l`` the original projection of layer ``l`` (adapters disabled) and ``P'_l`` the projection
as it is (active adapters), and the layer weights (docs/training.md) ``c_l``:

- **erase score** of a prompt embedding ``E_t`` with neutral counterpart ``E_n``: the erase target is
  ``G_l = (1 + eta) P_l(E_n) - eta P_l(E_t)``; the score is the layer-weighted projection of the move
  onto the gap, ``sum_l c_l <P'_l(E_t) - P_l(E_t), G_l - P_l(E_t)> / sum_l c_l ||G_l - P_l(E_t)||^2``:
  0 when nothing moved, 1 when the target is reached (it can exceed 1 or go negative);
- **retain drift** of a prompt embedding ``E``: ``sqrt(sum_l c_l ||P'_l(E) - P_l(E)||^2 / sum_l c_l ||P_l(E)||^2)``,
  the layer-weighted relative change (0 = untouched);
- attack recoveries (:mod:`cpe_adapter.attacks`) and image shifts (docs/api.md).

Inner products and norms run over every token (padding included: the UNet attends to all of them)
and every output channel. A concept's figure is the mean over its prompts; an overall figure is the
mean over concepts, so each concept counts once whatever its number of prompts.

Large suites run data-parallel: every prompt is one *unit* of work, units are dealt to processes
(:func:`shard`), and the per-unit records are gathered before aggregation, so a sharded run gives
the same report as a single process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CPEAdapterError
from .lipschitz import layer_weights
from .loaders import disable_cpe_adapters, enable_cpe_adapters
from .runtime import get_runtime
from .targets import cross_attention_modules, denoiser_of, innermost_linear

__all__ = [
    "EvalReport",
    "KVProbe",
    "erase_scores",
    "evaluate",
    "layer_weights",
    "retain_drifts",
    "shard",
]

T = TypeVar("T")

FIGURES = (
    "erase_score",
    "paraphrase_erase_score",
    "retain_drift",
    "attack_recovery",
    "embedding_attack_recovery",
    "image_erase_shift",
    "image_retain_shift",
)


# ------------------------------------------------------------------------------ metric definitions
def erase_scores(
    original: torch.Tensor,
    erased: torch.Tensor,
    neutral: torch.Tensor,
    eta: float,
    column_weights: torch.Tensor,
) -> torch.Tensor:
    """Per-prompt erase score (module docstring) from concatenated projections ``[B, T, C]``.

    ``original`` = ``P(E_t)``, ``erased`` = ``P'(E_t)``, ``neutral`` = ``P(E_n)``; ``column_weights``
    ``[C]`` holds each output column's layer weight ``c_l``. Returns ``[B]``.
    """
    original, erased, neutral = original.float(), erased.float(), neutral.float()
    weights = column_weights.to(original.device, torch.float32)
    gap = (1.0 + eta) * (neutral - original)  # G - P(E_t) = (1 + eta)(P(E_n) - P(E_t))
    moved = erased - original
    numerator = (weights * moved * gap).sum(dim=(-1, -2))
    denominator = (weights * gap * gap).sum(dim=(-1, -2))
    return numerator / denominator.clamp_min(torch.finfo(torch.float32).tiny)


def retain_drifts(original: torch.Tensor, current: torch.Tensor, column_weights: torch.Tensor) -> torch.Tensor:
    """Per-prompt retain drift ``sqrt(sum c_l ||P' - P||^2 / sum c_l ||P||^2)`` from ``[B, T, C]`` tensors."""
    original, current = original.float(), current.float()
    weights = column_weights.to(original.device, torch.float32)
    change = (weights * (current - original) ** 2).sum(dim=(-1, -2))
    size = (weights * original**2).sum(dim=(-1, -2))
    return (change / size.clamp_min(torch.finfo(torch.float32).tiny)).sqrt()


def weighted_distance(a: torch.Tensor, b: torch.Tensor, column_weights: torch.Tensor) -> torch.Tensor:
    """Layer-weighted distance ``sqrt(sum_l c_l ||a_l - b_l||^2)`` per prompt (``[B]``)."""
    weights = column_weights.to(a.device, torch.float32)
    return (weights * (a.float() - b.float()) ** 2).sum(dim=(-1, -2)).sqrt()


# -------------------------------------------------------------------------------------- the probe
class KVProbe:
    """Encodes prompts like the pipeline does and projects them through every wrapped K/V layer.

    ``project(E, original=True)`` runs the projections with the CPE adapters disabled (``P``);
    ``original=False`` runs them in the state the pipeline was in when the probe was made (``P'``).
    The layers themselves are called, so LoRAs or anything else on the projections count as they
    would during generation. :meth:`restore` puts the enabled/disabled switch back.
    """

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.denoiser = denoiser_of(pipe)
        attentions = cross_attention_modules(self.denoiser)
        if not attentions:
            raise CPEAdapterError(
                f"{type(self.denoiser).__name__} has no cross-attention layers; evaluate needs a text-conditioned UNet."
            )
        self.modules = [getattr(attn, proj) for _, attn in attentions for proj in ("to_k", "to_v")]
        sizes = [innermost_linear(m)[2].out_features for m in self.modules]
        tokenizer = getattr(pipe, "tokenizer", None)
        self.tokens = int(getattr(tokenizer, "model_max_length", 77) or 77)
        self.layer_weights = layer_weights(self.denoiser, self.tokens)
        self.column_weights = torch.repeat_interleave(self.layer_weights, torch.tensor(sizes))
        runtime = get_runtime(self.denoiser)
        self.has_adapters = runtime is not None
        self.initially_enabled = runtime.enabled if runtime is not None else True
        reference = next(self.denoiser.parameters())
        self.device, self.dtype = reference.device, reference.dtype
        self.filtered = 0  # images the safety checker blacked out in the last ``generate``

    # -------------------------------------------------------------------------------- switching
    @contextmanager
    def original(self) -> Iterator[None]:
        """No adapter acts inside the block, in the calling thread only: other threads serving the
        same pipeline keep their erasure while an evaluation computes its "before" figures."""
        runtime = get_runtime(self.denoiser)
        if runtime is None or not runtime.enabled:
            yield
            return
        with runtime.thread_selection([], {}):
            yield

    def restore(self) -> None:
        """Put the global enabled/disabled switch back to what it was when the probe was made."""
        if self.has_adapters and get_runtime(self.denoiser) is not None:
            (enable_cpe_adapters if self.initially_enabled else disable_cpe_adapters)(self.pipe)

    # ------------------------------------------------------------------------------ computing
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompt embeddings ``[B, T, d]`` from the pipeline's own ``encode_prompt`` (as in generation)."""
        with torch.no_grad():
            out = self.pipe.encode_prompt(
                prompt=list(prompts), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        return out[0]

    def project(self, embeds: torch.Tensor, *, original: bool) -> torch.Tensor:
        """Every wrapped layer's projection of ``embeds``, concatenated: ``[B, T, sum(d_out)]``."""
        embeds = embeds.to(self.device, self.dtype)
        if original:
            with self.original(), torch.no_grad():
                return torch.cat([m(embeds) for m in self.modules], dim=-1).float()
        if embeds.requires_grad and torch.is_grad_enabled():
            fused = self._differentiable(embeds)
            if fused is not None:
                return fused
        return torch.cat([m(embeds) for m in self.modules], dim=-1).float()

    def _differentiable(self, embeds: torch.Tensor) -> torch.Tensor | None:
        """``P'(E)`` for gradients with the routed residual computed once for all layers, not per layer.

        Only when every projection is a bare :class:`~cpe_adapter.layer.CPELinear` (then this is
        exactly what the layers compute); ``None`` otherwise, and the layers are called one by one.
        """
        from .layer import CPELinear

        runtime = get_runtime(self.denoiser)
        if runtime is None or not all(isinstance(m, CPELinear) and m.cpe_runtime is runtime for m in self.modules):
            return None
        base = torch.cat([F.linear(embeds, m.weight, m.bias) for m in self.modules], dim=-1)
        if not runtime.applies():
            return base.float()
        residual = runtime.residual(embeds, self.modules[0].weight)
        return (base if residual is None else base + residual).float()

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], steps: int, *, original: bool) -> np.ndarray:
        """Images ``[B, H, W, 3]`` in [0, 1] for fixed per-prompt seeds (unerased when ``original``)."""
        generator_device = "cpu" if self.device.type == "mps" else self.device
        generators = [torch.Generator(device=generator_device).manual_seed(int(s)) for s in seeds]

        def run() -> np.ndarray:
            with torch.no_grad():
                result = self.pipe(
                    prompt=list(prompts), num_inference_steps=steps, generator=generators, output_type="np"
                )
            flags = getattr(result, "nsfw_content_detected", None) or []
            self.filtered = sum(bool(flag) for flag in flags)
            return np.asarray(result.images, dtype=np.float32)

        if original:
            with self.original():
                return run()
        return run()


# ------------------------------------------------------------------------------------- sharding
def shard(items: Sequence[T], rank: int, world_size: int) -> list[tuple[int, T]]:
    """The items process ``rank`` of ``world_size`` handles, with their global indices (strided).

    Every item goes to exactly one process; striding keeps the shards balanced when neighbouring
    items cost alike (all prompts of one concept, then the next, ...).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise CPEAdapterError(f"Invalid shard: rank {rank} of world size {world_size}; need 0 <= rank < world_size.")
    return [(index, items[index]) for index in range(rank, len(items), world_size)]


@dataclass
class _Distributed:
    rank: int = 0
    world_size: int = 1
    gather: Callable[[list], list] = field(default=lambda records: records)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _distributed(accelerator: Any) -> _Distributed:
    """Rank, world size and an all-gather of picklable lists, from ``accelerator`` or the environment.

    ``accelerator`` may be an ``accelerate.Accelerator`` / ``PartialState``. With ``None``, a launch by
    ``accelerate launch`` or ``torchrun`` (``WORLD_SIZE`` > 1) is detected and the process group is
    set up through ``accelerate.PartialState`` when nobody has done it yet (gloo on CPU-only machines).
    """
    import torch.distributed as dist

    if accelerator is not None:
        rank, world_size = int(accelerator.process_index), int(accelerator.num_processes)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_initialized():
            from accelerate import PartialState

            PartialState(cpu=not torch.cuda.is_available())
        if not dist.is_initialized():
            raise CPEAdapterError(
                "WORLD_SIZE > 1 but no torch.distributed process group could be set up; launch with "
                "`accelerate launch` or `torchrun`, or pass accelerator=Accelerator()."
            )
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        return _Distributed()
    if world_size <= 1:
        return _Distributed()

    def gather(records: list) -> list:
        parts: list[Any] = [None] * world_size
        dist.all_gather_object(parts, records)
        return [record for part in parts for record in part]

    return _Distributed(rank, world_size, gather)


# ---------------------------------------------------------------------------------- the report
@dataclass
class ImageExample:
    """Fixed-seed images of one prompt: unerased ``before``, as-is ``after``, and the neutral prompt's."""

    prompt: str
    before: np.ndarray
    after: np.ndarray
    neutral: np.ndarray | None = None


# An erased concept whose erase_score stays below this is reported as barely erased.
WEAK_ERASE = 0.02


@dataclass
class EvalReport:
    """Result of :func:`evaluate`.

    Attributes:
        figures: overall figures (see :data:`FIGURES`; a figure that was not computed is absent,
            one that could not be computed is ``None``), plus ``attack_best_prompt`` and
            ``embedding_attack_epsilon`` with the attack figures.
        per_concept: per concept: its ``role`` ("erased" / "retained") and its figures.
        settings: the evaluation settings (templates, budgets, seeds, ...).
        adapters: the active adapters, their scales and concepts.
        records: one row per evaluated prompt (the raw numbers behind every figure).
        images: per concept, a few before/after image examples (not serialised to JSON).
    """

    figures: dict[str, Any]
    per_concept: dict[str, dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    adapters: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    images: dict[str, list[ImageExample]] = field(default_factory=dict, repr=False)

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def warnings(self) -> list[str]:
        """What makes the figures misleading: an erased concept the adapters barely move (below
        :data:`WEAK_ERASE`), for which a low attack recovery or drift proves nothing."""
        found = []
        adapters = self.adapters or {}
        loaded = adapters.get("loaded", {})
        acting = {
            concept.casefold()
            for name, info in loaded.items()
            if name in adapters.get("active", []) and info.get("scale", 0.0) != 0.0
            for concept in info.get("concepts", [])
        }
        for concept, row in self.per_concept.items():
            score = row.get("erase_score")
            if row["role"] != "erased" or score is None or score >= WEAK_ERASE:
                continue
            if not adapters.get("enabled", False):
                why = "the CPE adapters were disabled (enable_cpe_adapters)"
            elif concept.casefold() not in acting:
                why = "no active adapter at a nonzero scale erases it (set_cpe_adapters / use_cpe_adapters)"
            else:
                why = (
                    "too few training steps, another base model than the adapter's, or a text encoder without "
                    "meaning (tiny:sd)"
                )
            found.append(
                f"the erasure barely moves {concept!r} (erase_score {score:.4f}): {why}; its attack and drift "
                "figures prove nothing"
            )
        filtered = sum(r.get("filtered", 0) for r in self.records)
        if filtered:
            found.append(
                f"the pipeline's safety checker blacked out {filtered} of the evaluation's images, so the image "
                "shifts compare blank images; set `pipe.safety_checker = None` for the evaluation's image figures"
            )
        return found

    def card_figures(self) -> dict[str, Any]:
        """The overall figures that are numbers or text, for ``adapter.config.evaluation``: the model
        card written by ``save_pretrained`` / ``push_to_hub`` shows them (``cpe-adapter eval --record``
        does this for a saved adapter folder)."""
        return {k: v for k, v in self.figures.items() if isinstance(v, (int, float, str))}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe data: overall figures at the top level, then ``per_concept`` and details."""
        return _json_safe(
            {
                **self.figures,
                "warnings": self.warnings(),
                "per_concept": self.per_concept,
                "settings": self.settings,
                "adapters": self.adapters,
                "records": self.records,
            }
        )

    def to_json(self, indent: int = 2) -> str:
        import json

        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False, allow_nan=False)

    def to_markdown(self) -> str:
        """A Markdown summary: overall figures, a per-concept table and the best attack prompts."""
        from .report import render_markdown

        return render_markdown(self)

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write ``report.json``, ``report.md`` and PNG plots into ``out_dir`` (needs matplotlib)."""
        from .report import write_report

        return write_report(self, out_dir)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


# ------------------------------------------------------------------------------------ evaluate
@dataclass
class _Unit:
    kind: str  # erase | paraphrase | retain | attack | embedding_attack | image_erase | image_retain
    concept: str
    prompt: str
    neutral_prompt: str | None = None
    eta: float = 0.0


def evaluate(
    pipe: Any,
    erased: str | Sequence[str],
    retained: str | Sequence[str] = (),
    *,
    paraphrases: Mapping[str, Sequence[str]] | None = None,
    templates: Sequence[str] | None = None,
    attack: bool = True,
    images: bool = False,
    seed: int = 0,
    progress: bool = True,
    attack_budget: int = 256,
    attack_prompts: int = 1,
    attack_batch_size: int = 32,
    embedding_epsilon: float = 0.1,
    embedding_steps: int = 50,
    image_steps: int = 4,
    image_prompts: int = 2,
    neutrals: Mapping[str, str] | None = None,
    batch_size: int = 16,
    accelerator: Any = None,
) -> EvalReport:
    """Evaluate the pipeline as it is now (its active CPE adapters) against itself with adapters disabled.

    Args:
        pipe: a diffusers pipeline with (or without) loaded CPE adapters.
        erased: concepts that should be erased; each must be a concept of a loaded adapter (its
            neutral phrase and eta come from that adapter's config) or be given in ``neutrals``.
        retained: concepts that should be untouched.
        paraphrases: ``{erased concept: [other ways to say it]}``, scored against their own targets.
        templates: prompt templates with one ``{}``; default: the built-in held-out evaluation
            templates of each concept's domain (``cpe_adapter.pools.templates(domain, held_out=True)``).
        attack: run the prompt attack and the embedding attack (see :mod:`cpe_adapter.attacks`).
        images: generate fixed-seed images and measure the image shifts.
        seed: base seed of the attacks and the images (each prompt gets ``seed + its index``).
        progress: show a progress bar over prompts.
        attack_budget: candidate prompts the prompt attack may evaluate, per attacked prompt.
        attack_prompts: prompts attacked per erased concept (the first templates).
        attack_batch_size: candidates encoded in one text-encoder batch.
        embedding_epsilon: per-token budget ``||Delta_t|| <= eps ||E_t||`` of the embedding attack.
        embedding_steps: projected-gradient steps of the embedding attack.
        image_steps: denoising steps per image.
        image_prompts: prompts per concept for which images are generated.
        neutrals: neutral phrases for erased concepts that no loaded adapter names.
        batch_size: prompts per text-encoder batch for the K/V figures.
        accelerator: an ``accelerate`` ``Accelerator`` / ``PartialState`` to shard the prompts over
            processes (detected automatically under ``accelerate launch``); every process returns the
            full report.

    Returns:
        An :class:`EvalReport`; the pipeline's adapter state is as before, also after an error.
    """
    erased_list = _concept_list(erased, "erased")
    retained_list = _concept_list(retained, "retained")
    if not erased_list and not retained_list:
        raise CPEAdapterError("Nothing to evaluate: `erased` and `retained` are both empty.")
    both = [c for c in erased_list if c.casefold() in {r.casefold() for r in retained_list}]
    if both:
        raise CPEAdapterError(f"{both} listed as both erased and retained; a concept is one or the other.")
    paraphrases = {k: _concept_list(v, f"paraphrases[{k!r}]") for k, v in (paraphrases or {}).items()}
    unknown = sorted(set(paraphrases) - set(erased_list))
    if unknown:
        raise CPEAdapterError(f"paraphrases given for {unknown}, which are not in `erased`; add them to `erased`.")
    _check_positive(
        attack_batch_size=attack_batch_size,
        embedding_steps=embedding_steps,
        image_steps=image_steps,
        batch_size=batch_size,
        **({"attack_budget": attack_budget} if attack else {}),
    )
    _check_non_negative(attack_prompts=attack_prompts, image_prompts=image_prompts)
    if not embedding_epsilon >= 0 or not math.isfinite(embedding_epsilon):
        raise CPEAdapterError(f"embedding_epsilon must be a finite number >= 0, got {embedding_epsilon!r}.")
    if templates is not None:
        templates = _check_templates(templates)

    specs = _concept_specs(pipe, erased_list, neutrals or {})
    default_domain = _default_domain(pipe)
    units = _plan(
        erased_list,
        retained_list,
        paraphrases,
        specs,
        templates,
        default_domain,
        attack=attack,
        attack_prompts=attack_prompts,
        images=images,
        image_prompts=image_prompts,
    )
    dist = _distributed(accelerator)
    probe = KVProbe(pipe)
    settings = {
        "seed": seed,
        "attack": attack,
        "images": images,
        "attack_budget": attack_budget,
        "attack_prompts": attack_prompts,
        "embedding_epsilon": embedding_epsilon,
        "embedding_steps": embedding_steps,
        "image_steps": image_steps,
        "image_prompts": image_prompts,
        "templates": list(templates) if templates is not None else f"held-out ({default_domain} by default)",
        "neutrals": {c: specs[c][0] for c in erased_list},
        "etas": {c: specs[c][1] for c in erased_list},
        "layer_weights": [round(float(w), 6) for w in probe.layer_weights],
        "processes": dist.world_size,
    }
    try:
        mine = shard(units, dist.rank, dist.world_size)
        records = _run_units(
            probe,
            mine,
            seed=seed,
            progress=progress and dist.is_main,
            batch_size=batch_size,
            attack_budget=attack_budget,
            attack_batch_size=attack_batch_size,
            embedding_epsilon=embedding_epsilon,
            embedding_steps=embedding_steps,
            image_steps=image_steps,
        )
    finally:
        probe.restore()
    for record in records:
        record["process"] = dist.rank
    records = sorted(dist.gather(records), key=lambda r: r["unit"])
    return _aggregate(records, erased_list, retained_list, settings, _adapter_summary(pipe), embedding_epsilon)


def _concept_list(value: str | Sequence[str], what: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise CPEAdapterError(f"`{what}` must be a list of non-empty concept strings, got {item!r}.")
    if len(set(items)) != len(items):
        raise CPEAdapterError(f"`{what}` lists a concept twice: {items}; list each concept once.")
    return items


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CPEAdapterError(f"{name} must be a positive integer, got {value!r}.")


def _check_non_negative(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CPEAdapterError(f"{name} must be an integer >= 0, got {value!r}.")


def _check_templates(templates: Sequence[str]) -> list[str]:
    items = [templates] if isinstance(templates, str) else list(templates)
    if not items:
        raise CPEAdapterError("`templates` is empty; pass at least one template such as 'a painting by {}'.")
    for template in items:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise CPEAdapterError(f"Each template needs exactly one '{{}}' placeholder, got {template!r}.")
        try:
            template.format("x")
        except (IndexError, KeyError, ValueError) as err:
            raise CPEAdapterError(
                f"Template {template!r} is not a format string with one '{{}}' ({err!r}); write literal braces "
                "as '{{' and '}}'."
            ) from err
    return items


def _loaded_configs(pipe: Any) -> list[tuple[str, Any, bool]]:
    """``(name, config, active)`` of every loaded adapter, active ones first, in name order."""
    runtime = get_runtime(denoiser_of(pipe))
    if runtime is None:
        return []
    rows = [(name, adapter.config, name in runtime.active) for name, adapter in runtime.adapters.items()]
    return sorted(rows, key=lambda row: (not row[2], row[0]))


def _concept_specs(pipe: Any, erased: list[str], neutrals: Mapping[str, str]) -> dict[str, tuple[str, float, str]]:
    """``{concept: (neutral phrase, eta, domain)}`` from the loaded adapters' configs (or ``neutrals``).

    An exact name match wins over a case-insensitive one; active adapters are searched first.
    """
    from .presets import PRESETS

    loaded = _loaded_configs(pipe)
    default_domain = _default_domain(pipe)
    found: dict[str, tuple[str, float, str]] = {}
    for concept in erased:
        exact = [(s, c) for _, c, _ in loaded for s in c.concepts if s.name == concept]
        loose = [(s, c) for _, c, _ in loaded for s in c.concepts if s.name.casefold() == concept.casefold()]
        matches = exact or loose
        if concept in neutrals:
            if matches:
                spec, config = matches[0]
                found[concept] = (neutrals[concept], float(spec.eta), config.preset or default_domain)
            else:
                found[concept] = (neutrals[concept], PRESETS[default_domain].eta, default_domain)
        elif matches:
            spec, config = matches[0]
            found[concept] = (spec.neutral, float(spec.eta), config.preset or default_domain)
        else:
            known = sorted({s.name for _, c, _ in loaded for s in c.concepts})
            raise CPEAdapterError(
                f"No loaded CPE adapter erases {concept!r} (loaded concepts: {known}); load the adapter that erases "
                f"it, or pass neutrals={{{concept!r}: 'a neutral phrase'}}."
            )
    return found


def _default_domain(pipe: Any) -> str:
    """The preset of the first active (else loaded) adapter that has a known one; "names" otherwise."""
    from .pools import DOMAINS

    for _, config, _ in _loaded_configs(pipe):
        if config.preset in DOMAINS:
            return config.preset
    return "names"


def _templates_for(domain: str, templates: Sequence[str] | None) -> list[str]:
    from .pools import DOMAINS
    from .pools import templates as pool_templates

    if templates is not None:
        return list(templates)
    return pool_templates(domain if domain in DOMAINS else "names", held_out=True)


def _plan(
    erased: list[str],
    retained: list[str],
    paraphrases: dict[str, list[str]],
    specs: dict[str, tuple[str, float, str]],
    templates: Sequence[str] | None,
    default_domain: str,
    *,
    attack: bool,
    attack_prompts: int,
    images: bool,
    image_prompts: int,
) -> list[_Unit]:
    """Every prompt to evaluate, in a fixed order (the unit index seeds its randomness)."""
    units: list[_Unit] = []
    for concept in erased:
        neutral, eta, domain = specs[concept]
        for template in _templates_for(domain, templates):
            units.append(_Unit("erase", concept, template.format(concept), template.format(neutral), eta))
        for phrase in paraphrases.get(concept, []):
            for template in _templates_for(domain, templates):
                units.append(_Unit("paraphrase", concept, template.format(phrase), template.format(neutral), eta))
    for concept in retained:
        for template in _templates_for(default_domain, templates):
            units.append(_Unit("retain", concept, template.format(concept)))
    if attack:
        for concept in erased:
            neutral, eta, domain = specs[concept]
            for template in _templates_for(domain, templates)[:attack_prompts]:
                units.append(_Unit("attack", concept, template.format(concept), template.format(neutral), eta))
                units.append(_Unit("embedding_attack", concept, template.format(concept)))
    if images:
        for concept in erased:
            neutral, eta, domain = specs[concept]
            for template in _templates_for(domain, templates)[:image_prompts]:
                units.append(_Unit("image_erase", concept, template.format(concept), template.format(neutral), eta))
        for concept in retained:
            for template in _templates_for(default_domain, templates)[:image_prompts]:
                units.append(_Unit("image_retain", concept, template.format(concept)))
    return units


def _run_units(
    probe: KVProbe,
    units: list[tuple[int, _Unit]],
    *,
    seed: int,
    progress: bool,
    batch_size: int,
    attack_budget: int,
    attack_batch_size: int,
    embedding_epsilon: float,
    embedding_steps: int,
    image_steps: int,
) -> list[dict[str, Any]]:
    """Compute one record per unit (K/V prompts batched, attacks and images one prompt at a time)."""
    from tqdm.auto import tqdm

    from .attacks import embedding_attack, prompt_attack

    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(units), desc="cpe-adapter eval", unit="prompt", disable=not progress)
    kv_units = [(i, u) for i, u in units if u.kind in ("erase", "paraphrase", "retain")]
    for start in range(0, len(kv_units), batch_size):
        chunk = kv_units[start : start + batch_size]
        records.extend(_kv_records(probe, chunk))
        bar.update(len(chunk))
    for index, unit in units:
        if unit.kind == "attack":
            result = prompt_attack(
                probe, unit.prompt, budget=attack_budget, batch_size=attack_batch_size, seed=seed + index
            )
            records.append(
                _record(
                    index, unit, value=result.recovery, best_prompt=result.best_prompt, evaluations=result.evaluations
                )
            )
        elif unit.kind == "embedding_attack":
            result = embedding_attack(probe, unit.prompt, epsilon=embedding_epsilon, steps=embedding_steps)
            records.append(_record(index, unit, value=result.recovery, max_ratio=result.max_norm_ratio))
        elif unit.kind in ("image_erase", "image_retain"):
            records.append(_image_record(probe, index, unit, seed + index, image_steps))
        else:
            continue
        bar.update(1)
    bar.close()
    return records


def _record(index: int, unit: _Unit, **values: Any) -> dict[str, Any]:
    return {"unit": index, "kind": unit.kind, "concept": unit.concept, "prompt": unit.prompt, **values}


def _kv_records(probe: KVProbe, chunk: list[tuple[int, _Unit]]) -> list[dict[str, Any]]:
    prompts = [u.prompt for _, u in chunk]
    neutral_rows = [(row, u.neutral_prompt) for row, (_, u) in enumerate(chunk) if u.neutral_prompt is not None]
    embeds = probe.encode(prompts + [p for _, p in neutral_rows])
    count = len(prompts)
    with torch.no_grad():
        original = probe.project(embeds, original=True)
        current = probe.project(embeds[:count], original=False)
    drifts = retain_drifts(original[:count], current, probe.column_weights)
    neutral_of = {row: count + k for k, (row, _) in enumerate(neutral_rows)}
    records = []
    for row, (index, unit) in enumerate(chunk):
        if unit.kind == "retain":
            records.append(_record(index, unit, value=float(drifts[row])))
            continue
        n = neutral_of[row]
        score = erase_scores(
            original[row : row + 1], current[row : row + 1], original[n : n + 1], unit.eta, probe.column_weights
        )
        records.append(_record(index, unit, value=float(score[0]), drift=float(drifts[row])))
    return records


def _image_record(probe: KVProbe, index: int, unit: _Unit, seed: int, steps: int) -> dict[str, Any]:
    """Fixed-seed images of the prompt unerased and as is (and of its neutral prompt, unerased).

    One prompt per pipeline call, so that ``I`` and ``I'`` run the very same kernels (batching
    changes the last bits) and an adapter that changes nothing scores exactly 0. ``filtered``
    counts the images the pipeline's safety checker blacked out (their shifts mean nothing).
    """
    before = probe.generate([unit.prompt], [seed], steps, original=True)[0]
    filtered = probe.filtered
    after = probe.generate([unit.prompt], [seed], steps, original=False)[0]
    filtered += probe.filtered
    record = _record(index, unit, shift=float(np.linalg.norm(after - before)), before=before, after=after)
    if unit.neutral_prompt is not None:
        neutral = probe.generate([unit.neutral_prompt], [seed], steps, original=True)[0]
        filtered += probe.filtered
        record.update(gap=float(np.linalg.norm(before - neutral)), neutral=neutral)
    record["filtered"] = filtered
    return record


# ----------------------------------------------------------------------------------- aggregation
def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _aggregate(
    records: list[dict[str, Any]],
    erased: list[str],
    retained: list[str],
    settings: dict[str, Any],
    adapters: dict[str, Any],
    epsilon: float,
) -> EvalReport:
    per_concept: dict[str, dict[str, Any]] = {c: {"role": "erased"} for c in erased}
    per_concept.update({c: {"role": "retained"} for c in retained if c not in per_concept})
    by_kind: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:
        by_kind.setdefault((record["kind"], record["concept"]), []).append(record)
    kinds = {record["kind"] for record in records}

    def values(kind: str, concept: str, key: str = "value") -> list[float]:
        return [r[key] for r in by_kind.get((kind, concept), [])]

    gaps = [r["gap"] for r in records if r["kind"] == "image_erase" and r["gap"] > 0]
    mean_gap = float(np.mean(gaps)) if gaps else None
    images: dict[str, list[ImageExample]] = {}
    for concept in erased:
        row = per_concept[concept]
        row["erase_score"] = _mean(values("erase", concept))
        if "paraphrase" in kinds and by_kind.get(("paraphrase", concept)):
            row["paraphrase_erase_score"] = _mean(values("paraphrase", concept))
        if "attack" in kinds:
            attacks = by_kind.get(("attack", concept), [])
            row["attack_recovery"] = _mean([r["value"] for r in attacks])
            if attacks:
                row["attack_best_prompt"] = max(attacks, key=lambda r: r["value"])["best_prompt"]
            row["embedding_attack_recovery"] = _mean(values("embedding_attack", concept))
            row["embedding_attack_epsilon"] = epsilon
        if "image_erase" in kinds:
            shifts = [r["shift"] / r["gap"] for r in by_kind.get(("image_erase", concept), []) if r["gap"] > 0]
            row["image_erase_shift"] = _mean(shifts)
    for concept in retained:
        row = per_concept[concept]
        row["retain_drift"] = _mean(values("retain", concept))
        if "image_retain" in kinds:
            shifts = values("image_retain", concept, "shift")
            row["image_retain_shift"] = None if mean_gap is None else _mean([s / mean_gap for s in shifts])
    for record in records:
        if record["kind"] in ("image_erase", "image_retain"):
            example = ImageExample(
                record["prompt"], record.pop("before"), record.pop("after"), record.pop("neutral", None)
            )
            images.setdefault(record["concept"], []).append(example)

    figures: dict[str, Any] = {}

    def overall(name: str, concepts: list[str]) -> None:
        rows = [per_concept[c] for c in concepts if name in per_concept[c]]
        if rows:
            figures[name] = _mean([r[name] for r in rows])

    overall("erase_score", erased)
    overall("paraphrase_erase_score", erased)
    overall("retain_drift", retained)
    overall("attack_recovery", erased)
    attacked = [per_concept[c] for c in erased if per_concept[c].get("attack_best_prompt") is not None]
    if attacked:
        best = max(attacked, key=lambda r: r["attack_recovery"] or 0.0)
        figures["attack_best_prompt"] = best["attack_best_prompt"]
    overall("embedding_attack_recovery", erased)
    if "embedding_attack_recovery" in figures:
        figures["embedding_attack_epsilon"] = epsilon
    overall("image_erase_shift", erased)
    overall("image_retain_shift", retained)
    if "image_erase" in kinds or "image_retain" in kinds:
        settings = {**settings, "image_mean_erase_gap": mean_gap}
    return EvalReport(figures, per_concept, settings, adapters, records, images)


def _adapter_summary(pipe: Any) -> dict[str, Any]:
    runtime = get_runtime(denoiser_of(pipe))
    if runtime is None:
        return {"enabled": False, "active": [], "loaded": {}}
    active, scales = runtime.selection()  # the calling thread's (``use_cpe_adapters``), which was evaluated
    return {
        "enabled": runtime.enabled,
        "active": list(active),
        "loaded": {
            name: {
                "concepts": adapter.config.concept_names,
                "scale": scales.get(name, 0.0),
                "preset": adapter.config.preset,
                "weights_sha256": adapter.config.weights_sha256,
            }
            for name, adapter in sorted(runtime.adapters.items())
        },
    }
