"""Hub model cards for adapters, built with ``huggingface_hub``'s ``ModelCard``.

The generated part of a card (concepts, settings, figures, usage) sits between two HTML comments.
Saving or pushing into a place that already has a ``README.md`` replaces only that part and
merges the front matter (``library_name``, tags, ``base_model``), so what an author wrote around
it — limitations, a license, intended use — survives every re-save and re-push, as with PEFT's
``create_or_update_model_card``.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData

from .config import CPEConfig

TAGS = ["cpe-adapter", "concept-erasure", "diffusers", "text-to-image"]
# Training settings longer than this (loss histories, anchor lists) stay out of the card's table.
CELL_LIMIT = 120
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
START = "<!-- cpe-adapter card: generated from cpe_config.json, rewritten on every save; edit outside -->"
END = "<!-- cpe-adapter card: end -->"
# The title every card written before the markers existed starts with: such a body is all generated.
_OLD_TITLE = "# CPE concept eraser:"


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def hub_base_model(config: CPEConfig) -> str | None:
    """The recorded base model when it names a Hub repo: not a local folder, not a ``tiny:`` testbed."""
    base = config.base_model
    if not base or not _REPO_ID.match(base) or Path(base).expanduser().exists():
        return None
    return base


def generated_section(config: CPEConfig, repo_id: str | None = None) -> str:
    """The generated body: concepts, settings, figures and a usage snippet, between the markers."""
    concepts = "\n".join(f"| {c.name} | {c.neutral} | {_fmt(c.eta)} |" for c in config.concepts)
    shown = {k: _fmt(v) for k, v in sorted(config.training.items())}
    settings = "\n".join(f"| {k} | {v} |" for k, v in shown.items() if len(v) <= CELL_LIMIT)
    if any(len(v) > CELL_LIMIT for v in shown.values()):
        longer = ", ".join(f"`{k}`" for k, v in shown.items() if len(v) > CELL_LIMIT)
        settings += f"\n| {longer} | in `cpe_config.json` |"
    figures = "\n".join(
        f"| {k} | {_fmt(v)} |" for k, v in sorted(config.evaluation.items()) if isinstance(v, (int, float, str))
    )
    source = repo_id or "path/to/this/adapter"
    base = hub_base_model(config)
    load_base = (
        f'DiffusionPipeline.from_pretrained("{base}")'
        if base
        else ('DiffusionPipeline.from_pretrained("path/to/the/base/model")  # the base it was trained for')
    )
    return f"""{START}

# CPE concept eraser: {", ".join(config.concept_names)}

A [cpe-adapter](https://github.com/cpe-adapter/cpe-adapter) eraser (Concept Pinpoint Eraser, Lee et al.,
ICLR 2025): residual attention gates on the cross-attention key/value projections that move the
erased concepts toward their anchors and stay shut for everything else.

## Erased concepts

| concept | mapped toward | eta |
|---|---|---|
{concepts}

Base model: `{config.base_model or "unknown"}` · preset: `{config.preset}` · gate rank {config.gate_rank} ·
residual rank {config.residual_rank} · alpha {config.alpha} · {len(config.target_layers)} projections ·
text dim {config.text_embed_dim}.

## Training settings

| setting | value |
|---|---|
{settings or "| (not recorded) | |"}

## Evaluation

| figure | value |
|---|---|
{figures or "| (not evaluated) | |"}

## Usage

```python
import cpe_adapter
from diffusers import DiffusionPipeline

pipe = {load_base}
pipe.load_cpe_adapter("{source}", adapter_name="eraser")
image = pipe("a painting of a starry night").images[0]
```

{END}
"""


def model_card(config: CPEConfig, repo_id: str | None = None, existing: str | None = None) -> ModelCard:
    """The adapter's card; with ``existing`` (a card's text), that card with its generated part renewed.

    Front matter: ``library_name`` and the tags are always set; ``base_model`` when the adapter
    records a Hub repo; everything else (``license``, ``language``...) is the author's and kept.
    No license is declared by default: an eraser's terms follow its base model's, which only its
    author can state.
    """
    section = generated_section(config, repo_id)
    if existing is None or not existing.strip():
        card = ModelCard(f"---\n{ModelCardData().to_yaml()}\n---\n\n{section}")
    else:
        card = _parse(existing)
        text = card.text
        if START in text and END in text.split(START, 1)[1]:
            before, rest = text.split(START, 1)
            card.text = before + section.rstrip("\n") + rest.split(END, 1)[1]
        elif text.lstrip().startswith(_OLD_TITLE):  # written whole by an earlier version: all of it is ours
            card.text = "\n" + section
            if card.data.license == "apache-2.0":  # which that version claimed for every adapter
                card.data.license = None
        else:
            card.text = text.rstrip("\n") + "\n\n" + section
    card.data.library_name = "cpe-adapter"
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *TAGS]))
    base = hub_base_model(config)
    if base is not None:
        card.data.base_model = base
    elif config.base_model and card.data.base_model == config.base_model:
        card.data.base_model = None  # a local folder or a testbed is no Hub model
    return card


def _parse(text: str) -> ModelCard:
    """``text`` as a card; one whose front matter does not parse (a leading ``---`` rule, broken
    YAML) is kept whole as the body of a card with empty front matter."""
    try:
        return ModelCard(text, ignore_metadata_errors=True)
    except (ValueError, yaml.YAMLError):
        card = ModelCard(f"---\n{ModelCardData().to_yaml()}\n---\n")
        card.text = "\n" + text
        return card
