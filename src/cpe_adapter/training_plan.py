"""The plan of a training run: preset, overrides and stage schedule, resolved and checked.

:func:`resolve_plan` turns a preset name, ``steps`` and keyword overrides into a frozen
:class:`TrainingPlan` (refusing unknown or mistyped options before anything is trained);
:func:`concept_specs` and :func:`with_paraphrases` turn the user's concepts into the list of
:class:`~cpe_adapter.config.ConceptSpec` that training runs, one after another.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import ConceptSpec, is_finite_number
from .errors import CPEAdapterError
from .presets import Preset, get_preset
from .recipes import Recipe, get_recipe
from .training_data import check_concept

__all__ = ["TrainingPlan", "concept_seed", "concept_specs", "resolve_plan", "stage_schedule", "with_paraphrases"]

ANCHOR_NOISE = 1e-3  # mixup-anchor noise: per-element std = ANCHOR_NOISE * token norm / sqrt(d)
WEIGHT_DECAY = 0.01
# Options of a run that are not preset hyper-parameters.
_RUN_OPTIONS = {
    "tie_gate_qk",
    "name",
    "warmup_steps",
    "templates",
    "log_every",
    "num_threads",
    "recipe",
    "paraphrases",
}


@dataclass(frozen=True)
class TrainingPlan:
    """Resolved hyper-parameters and stage schedule of one training run."""

    preset: Preset
    erase_iters: tuple[int, ...]
    attack_iters: int
    warmup_steps: int = 10
    log_every: int = 50
    tie_gate_qk: bool = False
    templates: tuple[str, ...] | None = None
    anchors: tuple[str, ...] | None = None
    num_threads: int | None = None
    recipe: Recipe = field(default_factory=get_recipe)
    paraphrases: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def stages(self) -> int:
        return len(self.erase_iters)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.preset.to_dict(),
            "stages": self.stages,
            "first_stage_iters": self.erase_iters[0],  # as run: ``steps`` scales the preset's schedule
            "erase_iters": list(self.erase_iters),
            "attack_iters": self.attack_iters,
            "total_erase_iters": sum(self.erase_iters),
            "warmup_steps": self.warmup_steps,
            "tie_gate_qk": self.tie_gate_qk,
            "templates": None if self.templates is None else list(self.templates),
            "anchors": None if self.anchors is None else list(self.anchors),
            "optimizer": (
                f"AdamW(weight_decay={WEIGHT_DECAY}), cosine per stage, {self.warmup_steps} warm-up steps "
                "(at most a quarter of a stage)"
            ),
            "num_threads": self.num_threads,
            "anchor_noise": ANCHOR_NOISE,
            **self.recipe.to_dict(),
            **({"paraphrases": {name: list(texts) for name, texts in self.paraphrases}} if self.paraphrases else {}),
        }


def stage_schedule(preset: Preset, steps: int | None) -> tuple[tuple[int, ...], int]:
    """Erase iterations per stage and attack iterations per adversarial stage.

    ``steps`` (total erase iterations) scales the preset's schedule proportionally, attack
    iterations included; every stage keeps at least one iteration (with fewer ``steps`` than
    stages, there are only ``steps`` stages).
    """
    base = (preset.first_stage_iters,) + (preset.erase_iters,) * (preset.stages - 1)
    if steps is None:
        return base, preset.attack_iters
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise CPEAdapterError(f"`steps` must be a positive integer (total erase iterations), got {steps!r}.")
    stages = min(preset.stages, steps)
    factor = steps / preset.total_erase_iters
    first = max(1, min(round(preset.first_stage_iters * factor), steps - (stages - 1)))
    rest = steps - first
    share, extra = divmod(rest, stages - 1) if stages > 1 else (0, 0)
    later = [share + (1 if i < extra else 0) for i in range(stages - 1)]
    return (first, *later), max(1, round(preset.attack_iters * factor))


def resolve_plan(
    preset: str, steps: int | None, anchors: Sequence[str] | None, overrides: dict[str, Any]
) -> tuple[TrainingPlan, str | None]:
    """The plan for ``preset`` with ``overrides`` applied, and the adapter name (if given)."""
    if not isinstance(preset, str):
        raise CPEAdapterError(f"`preset` must be one of 'names', 'styles', 'explicit', got {preset!r}.")
    settings = get_preset(preset)
    valid = (set(settings.to_dict()) - {"name"}) | _RUN_OPTIONS
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise CPEAdapterError(f"Unknown training option(s) {unknown}; valid ones are {sorted(valid)}.")
    run = {k: overrides[k] for k in overrides if k in _RUN_OPTIONS}
    settings = settings.replace(**{k: v for k, v in overrides.items() if k not in _RUN_OPTIONS})
    _check_run_options(run)
    per_anchor = settings.anchor_templates
    if per_anchor is not None and (isinstance(per_anchor, bool) or not isinstance(per_anchor, int) or per_anchor < 1):
        raise CPEAdapterError(
            f"Training option 'anchor_templates' must be a positive integer or None (every template), "
            f"got {per_anchor!r}."
        )
    erase_iters, attack_iters = stage_schedule(settings, steps)
    templates = run.get("templates")
    if isinstance(anchors, str):
        anchors = [anchors]
    plan = TrainingPlan(
        preset=settings,
        erase_iters=erase_iters,
        attack_iters=attack_iters,
        warmup_steps=run.get("warmup_steps", 10),
        log_every=run.get("log_every", 50),
        tie_gate_qk=run.get("tie_gate_qk", False),
        templates=None if templates is None else tuple(templates),
        anchors=None if anchors is None else tuple(str(a) for a in anchors),
        num_threads=run.get("num_threads"),
        recipe=get_recipe(run.get("recipe")),
        paraphrases=_paraphrases(run.get("paraphrases")),
    )
    return plan, run.get("name")


def _check_run_options(run: dict[str, Any]) -> None:
    """Refuse run options of the wrong type (``tie_gate_qk="false"`` is not False; 2.0 is no count)."""
    for key, least in (("warmup_steps", 0), ("log_every", 1), ("num_threads", 1)):
        value = run.get(key)
        if key not in run or (value is None and key == "num_threads"):
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise CPEAdapterError(f"Training option {key!r} must be an integer >= {least}, got {value!r}.")
        run[key] = int(value)
    if "tie_gate_qk" in run and not isinstance(run["tie_gate_qk"], bool):
        raise CPEAdapterError(f"Training option 'tie_gate_qk' must be True or False, got {run['tie_gate_qk']!r}.")


def _paraphrases(given: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``{concept: [other ways to say it]}`` as a plan field; a clear error for anything else."""
    if given is None:
        return ()
    if not isinstance(given, Mapping):
        raise CPEAdapterError(
            f"`paraphrases` must map each concept to its other wordings, e.g. {{'Van Gogh': ['Vincent van Gogh']}}; "
            f"got {type(given).__name__}."
        )
    checked = []
    for concept, texts in given.items():
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(concept, str) or not isinstance(texts, Sequence) or not texts:
            raise CPEAdapterError(f"`paraphrases[{concept!r}]` must be a non-empty list of strings.")
        if any(not isinstance(t, str) or not t.strip() for t in texts):
            raise CPEAdapterError(f"`paraphrases[{concept!r}]` holds an empty or non-string entry: {texts!r:.120}.")
        checked.append((concept, tuple(t.strip() for t in texts)))
    return tuple(checked)


def concept_specs(pipe: Any, concepts: Any, plan: TrainingPlan) -> list[ConceptSpec]:
    """Concepts as :class:`ConceptSpec` (preset neutral phrase and eta for plain strings), checked."""
    if isinstance(concepts, (str, ConceptSpec)):
        concepts = [concepts]
    if concepts is not None and not isinstance(concepts, (list, tuple)):
        raise CPEAdapterError(
            f"`concepts` must be a string, a ConceptSpec or a list of them, got {type(concepts).__name__}."
        )
    if concepts is None or len(concepts) == 0:
        raise CPEAdapterError("No concepts to erase; pass a concept string such as 'Van Gogh' or a list of them.")
    specs = []
    for concept in concepts:
        if isinstance(concept, ConceptSpec):
            eta = concept.eta
            if not is_finite_number(eta) or eta <= -1:
                raise CPEAdapterError(
                    f"ConceptSpec {concept.name!r}: eta must be a finite number above -1, got {eta!r}."
                )
            if not isinstance(concept.neutral, str):
                raise CPEAdapterError(
                    f"ConceptSpec {concept.name!r}: neutral must be a phrase, got {concept.neutral!r}."
                )
            spec = ConceptSpec(check_concept(pipe, concept.name), concept.neutral, float(eta))
        else:
            if not isinstance(concept, str):
                raise CPEAdapterError(f"Each concept must be a string or a ConceptSpec, got {concept!r:.80}.")
            spec = ConceptSpec(check_concept(pipe, concept), plan.preset.neutral, float(plan.preset.eta))
        check_concept(pipe, spec.neutral)
        if spec.neutral.strip().casefold() == spec.name.casefold():
            raise CPEAdapterError(
                f"The concept {spec.name!r} is its own neutral phrase, so there is nothing to move it toward; pass "
                "another neutral (ConceptSpec(name, neutral) or `neutral=`)."
            )
        specs.append(spec)
    names = [s.name.lower() for s in specs]
    if len(set(names)) != len(names):
        raise CPEAdapterError(f"A concept is listed twice in {[s.name for s in specs]}; list each once.")
    return specs


def with_paraphrases(pipe: Any, specs: list[ConceptSpec], plan: TrainingPlan) -> list[ConceptSpec]:
    """``specs``, then each user paraphrase as a concept of its own with its concept's neutral and eta.

    A paraphrase gets its own gate and residual: folded into its concept's target set instead, it
    competes for the concept's rank-``r`` residual (a description has other tokens and another
    erase direction), which on short, high-learning-rate runs shut the concept's own gate. As
    separate concepts, the concepts themselves train exactly as without paraphrases.
    """
    by_name = {spec.name: spec for spec in specs}
    unknown = sorted(concept for concept, _ in plan.paraphrases if concept not in by_name)
    if unknown:
        raise CPEAdapterError(
            f"`paraphrases` names {unknown}, which are not among the concepts to erase {list(by_name)}."
        )
    added = []
    seen = {name.casefold() for name in by_name}
    for concept, texts in plan.paraphrases:
        parent = by_name[concept]
        for text in texts:
            if text.casefold() not in seen:  # as concept_specs: "van gogh" is "Van Gogh" again
                seen.add(text.casefold())
                added.append(ConceptSpec(check_concept(pipe, text), parent.neutral, parent.eta))
    return [*specs, *added]


def concept_seed(seed: int, index: int, name: str) -> int:
    """The seed of concept ``index``: depends only on ``(seed, index, name)``, so sharding concepts
    over processes (:mod:`distributed`) gives the same weights as one process."""
    digest = hashlib.sha256(f"cpe-adapter/{int(seed)}/{index}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
