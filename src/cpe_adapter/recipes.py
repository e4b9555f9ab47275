"""Training recipes: how the erase *target set* of a concept is built.

The faithful recipe (docs/training.md, ``recipe="paper"``, the default) trains the erase loss on one
string, the concept itself, filled into the templates. The other recipes (:data:`RECIPES`) widen
the target set; an erase step then draws its target from

- the concept itself (``concept_share`` of the draws);
- variants generated from the concept string alone (:func:`concept_variants`): contiguous word
  sub-spans ("Gogh" for "Van Gogh", particles such as "van" left out), casing / joined / hyphenated
  / possessive spellings, misspellings (:func:`typos`), and the vocabulary tokens nearest to the
  concept in the text encoder's input-embedding space (words of kept concepts excluded);
- points of the concept's embedding region: mixups ``lam E_a + (1 - lam) E_b`` of two variants'
  prompts of the same template. The erase target ``(1 + eta) P(E_n) - eta P(E)`` is affine in
  ``E``, so a mixup's target is the same mixup of the two targets.

Each variant is mapped to the concept's neutral phrase with its own erase target. Nothing else
changes (losses, anchors, adversarial stages, step count); the cost is encoding the extra prompts.
Measured on the semantic testbed (docs/evaluation.md, "Beyond the paper"), no widened recipe beat
the paper's: they dilute the concept's own erasure without raising the paraphrase ratio, so
``"paper"`` stays the default and the others are options for experiments.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from . import pools
from .errors import CPEAdapterError
from .training_data import PromptSet, encode_prompts, fill, text_encoders_of, tokenizers_of

__all__ = [
    "DEFAULT_RECIPE",
    "RECIPES",
    "AugmentedTargets",
    "Recipe",
    "augment_targets",
    "card_figures",
    "concept_variants",
    "get_recipe",
]

# Words that never stand for a concept alone (name particles, articles, prepositions).
PARTICLES = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "and",
        "or",
        "in",
        "on",
        "at",
        "by",
        "to",
        "for",
        "with",
        "from",
        "van",
        "von",
        "de",
        "der",
        "den",
        "del",
        "della",
        "di",
        "da",
        "du",
        "le",
        "la",
        "los",
        "las",
        "el",
        "st",
        "saint",
        "mr",
        "mrs",
        "ms",
        "dr",
        "sir",
        "jr",
        "sr",
    ]
)
MIN_SPAN_CHARS = 3


@dataclass(frozen=True)
class Recipe:
    """How the target set of one concept is built.

    Attributes:
        name: recipe name (``train_cpe(recipe=...)``).
        sub_spans: add the concept's contiguous word sub-spans.
        spellings: add casing, joined, hyphenated and possessive spellings.
        nearest_tokens: how many nearest vocabulary tokens (input-embedding cosine) to add.
        typos: how many misspellings to add (a letter dropped, doubled, or two neighbours swapped).
        mixups: embedding-region points per template (mixups of two random variants' prompts).
        concept_share: probability that an erase step draws the concept itself rather than a variant.
        widen_from_stage: the first stage that draws from the widened set; earlier stages train on the
            concept alone, as the paper does. Stage 0 (high learning rate, no adversary) is where the
            gate learns to separate the concept from the anchors; a wide target set there can shut the
            gate for everything (a dead sigmoid that never reopens), so widening waits by default.
    """

    name: str
    sub_spans: bool = False
    spellings: bool = False
    nearest_tokens: int = 0
    typos: int = 0
    mixups: int = 0
    concept_share: float = 1.0
    widen_from_stage: int = 1

    @property
    def augments(self) -> bool:
        return self.sub_spans or self.spellings or self.nearest_tokens > 0 or self.typos > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.name,
            "sub_spans": self.sub_spans,
            "spellings": self.spellings,
            "nearest_tokens": self.nearest_tokens,
            "typos": self.typos,
            "mixups": self.mixups,
            "concept_share": self.concept_share,
            "widen_from_stage": self.widen_from_stage,
        }


RECIPES: dict[str, Recipe] = {
    "paper": Recipe("paper"),
    "spans": Recipe("spans", sub_spans=True, spellings=True, concept_share=0.5, widen_from_stage=0),
    "region": Recipe("region", sub_spans=True, spellings=True, mixups=2, concept_share=0.5),
    "typos": Recipe("typos", sub_spans=True, spellings=True, typos=6, mixups=2, concept_share=0.5, widen_from_stage=0),
    "nearest": Recipe(
        "nearest", sub_spans=True, spellings=True, nearest_tokens=4, mixups=1, concept_share=0.5, widen_from_stage=0
    ),
}
DEFAULT_RECIPE = "paper"


def get_recipe(name: str | Recipe | None) -> Recipe:
    """The recipe called ``name`` (``None``: the default); a clear error lists the valid ones."""
    if name is None:
        return RECIPES[DEFAULT_RECIPE]
    if isinstance(name, Recipe):
        return name
    if not isinstance(name, str) or name not in RECIPES:
        raise CPEAdapterError(f"Unknown training recipe {name!r}; choose one of {sorted(RECIPES)}.")
    return RECIPES[name]


# ------------------------------------------------------------------------------------- variants
def _words(concept: str) -> list[str]:
    return concept.split()


def sub_spans(concept: str) -> list[str]:
    """Contiguous proper sub-spans of the concept's words that can name it alone.

    Spans made only of particles ("van", "the") or shorter than ``MIN_SPAN_CHARS`` characters are
    left out: they would teach the gate to fire on ordinary words.
    """
    words = _words(concept)
    spans = []
    for size in range(len(words) - 1, 0, -1):
        for start in range(len(words) - size + 1):
            part = words[start : start + size]
            if all(w.lower().strip(".,'") in PARTICLES for w in part):
                continue
            text = " ".join(part)
            if len(text) >= MIN_SPAN_CHARS:
                spans.append(text)
    return spans


def spellings(concept: str) -> list[str]:
    """Casing variants and joined / hyphenated / possessive spellings of the concept."""
    words = _words(concept)
    out = [concept.lower(), concept.title(), concept.upper()]
    if len(words) > 1:
        out += ["".join(words), "-".join(words)]
    out.append(f"{concept}'s")
    return out


def typos(concept: str, count: int) -> list[str]:
    """``count`` misspellings of the concept, spread evenly over all candidates.

    Candidates, in order of position: each letter (not a word's first) dropped, doubled, or swapped
    with the next one. No letter is ever *inserted* that the concept lacks, so misspellings such as
    "Van Gough" stay a held-out test of generalisation.
    """
    if count <= 0:
        return []
    found: list[str] = []
    for i in range(1, len(concept)):
        if not concept[i].isalpha() or not concept[i - 1].isalpha():
            continue
        found.append(concept[:i] + concept[i + 1 :])
        found.append(concept[:i] + concept[i] + concept[i:])
        if i + 1 < len(concept) and concept[i + 1].isalpha() and concept[i + 1] != concept[i]:
            found.append(concept[:i] + concept[i + 1] + concept[i] + concept[i + 2 :])
    found = list(dict.fromkeys(f for f in found if f != concept))
    if len(found) <= count:
        return found
    return [found[round(k * (len(found) - 1) / max(1, count - 1))] for k in range(count)]


def nearest_tokens(pipe: Any, concept: str, count: int, exclude: Sequence[str] = ()) -> list[str]:
    """The ``count`` whole-word vocabulary tokens nearest to the concept in input-embedding space.

    The concept's tokens' input embeddings are averaged; candidates are alphabetic tokens of at least
    ``MIN_SPAN_CHARS`` characters that are not a word of the concept, a particle, or a word of any
    ``exclude`` phrase (the anchors: concepts that must be kept).
    """
    if count <= 0:
        return []
    tokenizer = tokenizers_of(pipe)[0]
    table = text_encoders_of(pipe)[0].get_input_embeddings().weight.detach().float()
    ids = tokenizer(concept, add_special_tokens=False)["input_ids"]
    if not ids:
        return []
    query = torch.nn.functional.normalize(table[ids].mean(0), dim=0)
    scores = torch.nn.functional.normalize(table, dim=1) @ query
    banned = {w.lower() for phrase in (concept, *exclude) for w in re.findall(r"[A-Za-z]+", phrase)} | PARTICLES
    found: list[str] = []
    for index in torch.argsort(scores, descending=True).tolist():
        word = tokenizer.decode([index]).strip()
        if not word.isalpha() or len(word) < MIN_SPAN_CHARS or word.lower() in banned or index in ids:
            continue
        found.append(word)
        banned.add(word.lower())
        if len(found) == count:
            break
    return found


def concept_variants(pipe: Any, concept: str, recipe: Recipe, exclude: Sequence[str] = ()) -> list[str]:
    """Other ways to say ``concept``, generated from the string (and the encoder's vocabulary) alone.

    Variants the tokenizer reads exactly as the concept (casing, for an uncased tokenizer) or as an
    earlier variant are dropped, so every variant adds a distinct prompt.
    """
    candidates: list[str] = []
    if recipe.sub_spans:
        candidates += sub_spans(concept)
    if recipe.spellings:
        candidates += spellings(concept)
    if recipe.typos:
        candidates += typos(concept, recipe.typos)
    if recipe.nearest_tokens:
        candidates += nearest_tokens(pipe, concept, recipe.nearest_tokens, exclude)
    tokenizer = tokenizers_of(pipe)[0]
    seen = {tuple(tokenizer(concept, add_special_tokens=False)["input_ids"])}
    kept = []
    for text in candidates:
        key = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
        if key and key not in seen:
            seen.add(key)
            kept.append(text)
    return kept


# --------------------------------------------------------------------------------- target sets
@dataclass
class AugmentedTargets:
    """A prompt set whose target rows are the concept's, then the variants', then the mixups'.

    ``weights`` ``[rows]`` are the sampling probabilities of the rows in the erase loss (``None`` for
    the paper recipe: uniform over templates); ``variants`` the generated strings.
    """

    data: PromptSet
    weights: torch.Tensor | None
    variants: list[str]


def augment_targets(
    pipe: Any, data: PromptSet, concept: str, recipe: Recipe, *, domain: str, seed: int = 0
) -> AugmentedTargets:
    """Widen ``data``'s target set according to ``recipe`` (unchanged for ``"paper"``)."""
    if not recipe.augments:
        return AugmentedTargets(data, None, [])
    if not 0.0 < recipe.concept_share <= 1.0:
        raise CPEAdapterError(f"concept_share must be in (0, 1], got {recipe.concept_share!r}.")
    keep = [*_anchor_concepts(data, data.anchor_prompts), *pools.concept_pool(domain), *pools.general_words(domain)]
    own = {w.lower() for w in re.findall(r"[A-Za-z]+", concept)}
    keep = [" ".join(w for w in re.findall(r"[A-Za-z]+", k) if w.lower() not in own) for k in keep]
    variants = concept_variants(pipe, concept, recipe, exclude=keep)
    if not variants:
        return AugmentedTargets(data, None, [])
    templates = data.templates
    n = len(templates)
    rows = [data.target] + [encode_prompts(pipe, fill(templates, v)).float() for v in variants]
    generator = torch.Generator().manual_seed(int(seed) & (2**63 - 1))
    if recipe.mixups > 0 and len(rows) > 1:
        stack = torch.stack(rows)  # [V + 1, n, T, d]
        for _ in range(recipe.mixups):
            pick = torch.randint(stack.shape[0], (2, n), generator=generator)
            lam = torch.rand(n, 1, 1, generator=generator)
            cols = torch.arange(n)
            rows.append(torch.lerp(stack[pick[1], cols], stack[pick[0], cols], lam))
    target = torch.cat(rows)
    neutral_rows = data.neutral.repeat(len(rows), 1, 1)
    others = len(rows) - 1
    share = recipe.concept_share if others else 1.0
    weights = torch.cat([torch.full((n,), share / n), torch.full((n * others,), (1.0 - share) / (n * max(1, others)))])
    augmented = replace(data, target=target, neutral=neutral_rows, templates=list(templates) * len(rows))
    return AugmentedTargets(augmented, weights / weights.sum(), variants)


def _anchor_concepts(data: PromptSet, prompts: Sequence[str]) -> list[str]:
    """Anchor prompts stripped of template words: the words that must stay un-erased."""
    template_words = {w.lower() for t in data.templates for w in re.findall(r"[A-Za-z]+", t)}
    return [" ".join(w for w in re.findall(r"[A-Za-z]+", p) if w.lower() not in template_words) for p in prompts]


def card_figures(report: Any, paraphrases: Sequence[str] = (), recipe: str | None = None) -> dict[str, Any]:
    """The scalar figures of an :class:`~cpe_adapter.evaluation.EvalReport`, ready for
    ``adapter.config.evaluation`` (which the model card renders), with the paraphrases and recipe
    they were measured with, so a card states what "paraphrase" meant."""
    figures = report.card_figures()
    if paraphrases:
        figures["paraphrases_evaluated"] = "; ".join(paraphrases)
    if recipe is not None:
        figures["recipe"] = recipe
    return figures
