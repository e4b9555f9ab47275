"""Training presets of docs/training.md: one per domain of concepts."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any

from .config import is_finite_number
from .errors import CPEAdapterError


@dataclass(frozen=True)
class Preset:
    """Hyper-parameters of one preset (every one can be overridden in ``train_cpe``).

    Attributes:
        name: preset name.
        neutral: phrase the erased concept is moved toward.
        eta: erase-target over-shoot.
        anchor_weight: ``lambda_anc``, weight of the attention-anchoring loss.
        residual_rank: ``r``.
        gate_rank: ``m``.
        anchor_samples: ``S``, anchors sampled per step.
        adversaries: ``P``, learnable embedding perturbations per adversarial stage.
        stages: number of erase stages (stage 0 has no adversary).
        erase_iters: erase iterations per stage after the first.
        first_stage_iters: erase iterations of stage 0.
        attack_iters: iterations of each adversarial stage.
        lr: learning rate of the erase stages after the first.
        first_stage_lr: learning rate of stage 0.
        attack_lr: learning rate of the adversary.
        adversarial_weight: ``lambda_adv``.
        alpha: residual strength.
        similar_anchors: how many most-similar pool concepts are used as anchors.
        anchor_templates: how many templates each anchor concept is filled into (``None``: every
            template, as the paper does). The templates rotate from one anchor concept to
            the next, so together the anchors still cover every template; the sampled mixups of two
            anchors then cover many more (concept, template) pairs than are encoded. Encoding is most
            of the one-off cost of training on a CPU, and this keeps it to a fraction.
        prompt_searches: discrete adversaries: after each attack phase, this many greedy token
            searches (substitutions and insertions, :func:`cpe_adapter.attacks.coordinate_search`),
            each from one training prompt of the target, look for a real prompt whose *erased*
            K/V come closest to the target's original K/V; each one found joins the adversarial
            rows of every later stage (up to ``MAX_FOUND_PROMPTS``), pushed to the erase target.
            0 turns them off (the paper's recipe: continuous perturbations only).
        prompt_search_budget: candidate prompts encoded per search.
    """

    name: str
    neutral: str
    eta: float
    anchor_weight: float
    residual_rank: int
    gate_rank: int
    anchor_samples: int
    adversaries: int
    stages: int
    erase_iters: int
    first_stage_iters: int
    attack_iters: int
    lr: float = 3e-5
    first_stage_lr: float = 3e-4
    attack_lr: float = 1e-2
    adversarial_weight: float = 1.0
    alpha: float = 1.0
    similar_anchors: int = 50
    anchor_templates: int | None = 8
    prompt_searches: int = 0
    prompt_search_budget: int = 64

    def replace(self, **overrides: Any) -> Preset:
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise CPEAdapterError(f"Unknown hyper-parameter(s) {unknown}; valid ones are {sorted(fields)}.")
        updated = dataclasses.replace(self, **{k: _plain(getattr(self, k), v) for k, v in overrides.items()})
        updated.check()
        return updated

    def check(self) -> None:
        """Refuse values of the wrong type or range, naming the option (``bool`` is no number here)."""
        counts = {"residual_rank": 1, "gate_rank": 1, "anchor_samples": 1, "adversaries": 0, "stages": 1}
        counts.update(erase_iters=1, first_stage_iters=1, attack_iters=1, similar_anchors=0, prompt_searches=0)
        counts.update(prompt_search_budget=1)
        for key, least in counts.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise CPEAdapterError(f"Training option {key!r} must be an integer >= {least}, got {value!r}.")
        positive = ("lr", "first_stage_lr", "attack_lr", "alpha")
        for key in (*positive, "eta", "adversarial_weight", "anchor_weight"):
            value = getattr(self, key)
            if not is_finite_number(value):
                raise CPEAdapterError(f"Training option {key!r} must be a finite number, got {value!r}.")
            if key in positive and value <= 0:
                raise CPEAdapterError(f"Training option {key!r} must be positive, got {value!r}.")
        for key in ("adversarial_weight", "anchor_weight"):
            if getattr(self, key) < 0:
                raise CPEAdapterError(f"Training option {key!r} must be >= 0, got {getattr(self, key)!r}.")
        if self.eta <= -1:
            raise CPEAdapterError(
                "Training option 'eta' must be above -1 (at -1 the erase target is the concept itself), "
                f"got {self.eta!r}."
            )
        if not isinstance(self.neutral, str) or not self.neutral.strip():
            raise CPEAdapterError(f"Training option 'neutral' must be a non-empty phrase, got {self.neutral!r}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def total_erase_iters(self) -> int:
        return self.first_stage_iters + (self.stages - 1) * self.erase_iters


def _plain(default: Any, value: Any) -> Any:
    """``value`` as a plain ``int``/``float`` when the option's default is one and ``value`` is a
    number of that kind from elsewhere (``numpy.int64`` from ``np.arange`` sweeps); else as given."""
    if isinstance(value, bool) or isinstance(default, bool):
        return value
    if isinstance(default, int) and isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(default, float) and isinstance(value, numbers.Real):
        return float(value)
    return value


PRESETS: dict[str, Preset] = {
    "names": Preset("names", "a person", 0.3, 1e5, 1, 16, 32, 16, 5, 450, 1800, 450),
    "styles": Preset("styles", "real photograph", 0.5, 1e4, 1, 16, 16, 16, 10, 450, 1800, 450),
    "explicit": Preset("explicit", "a person in modest clothing", 3.0, 1e4, 4, 64, 16, 32, 20, 1200, 2400, 1200),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a clear error lists the valid ones."""
    if name not in PRESETS:
        raise CPEAdapterError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name]
