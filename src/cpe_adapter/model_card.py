"""Hub model cards for adapters, built with ``huggingface_hub``'s ``ModelCard``."""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .config import CPEConfig
from .serialization import atomic_write_bytes

TAGS = ["cpe-adapter", "concept-erasure", "diffusers", "text-to-image"]
# Training settings longer than this (loss histories, anchor lists) stay out of the card's table.
CELL_LIMIT = 120
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(config: CPEConfig, repo_id: str | None = None) -> ModelCard:
    """A model card: front matter (library, base model, tags), concepts, settings, figures, usage."""
    base = config.base_model if config.base_model and _REPO_ID.match(config.base_model) else None
    data = ModelCardData(library_name="cpe-adapter", base_model=base, tags=list(TAGS), license="apache-2.0")
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
    base_hint = config.base_model or "stable-diffusion-v1-5/stable-diffusion-v1-5"
    content = f"""---
{data.to_yaml()}
---

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

pipe = DiffusionPipeline.from_pretrained("{base_hint}")
pipe.load_cpe_adapter("{source}", adapter_name="eraser")
image = pipe("a painting of a starry night").images[0]
```
"""
    return ModelCard(content)


def write_model_card(config: CPEConfig, folder: str | Path, repo_id: str | None = None) -> Path:
    """Write ``README.md`` into ``folder`` atomically."""
    path = Path(folder) / "README.md"
    atomic_write_bytes(path, str(model_card(config, repo_id)).encode("utf-8"))
    return path
