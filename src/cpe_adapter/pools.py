"""Access to the bundled word lists, concept pools and prompt templates.

All lists live as plain UTF-8 text files (one entry per line) under ``cpe_adapter/data/`` and
are read through :mod:`importlib.resources`, so they work from a source checkout, an installed
wheel, or a zipped package alike.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11+; the annotation is never evaluated
    from importlib.resources.abc import Traversable

__all__ = [
    "DOMAINS",
    "available_lists",
    "concept_pool",
    "general_words",
    "load_list",
    "templates",
]

DOMAINS: tuple[str, ...] = ("names", "styles", "explicit")
"""The supported concept domains."""

_PACKAGE = "cpe_adapter"
_DATA_DIR = "data"

_CONCEPT_POOLS: dict[str, str] = {
    "names": "public_figures",
    "styles": "artists",
    "explicit": "everyday_sentences",
}

_GENERAL_WORDS: dict[str, str] = {
    "names": "general_people",
    "styles": "general_styles",
    "explicit": "general_explicit",
}


def _data_root() -> Traversable:
    return resources.files(_PACKAGE).joinpath(_DATA_DIR)


@functools.lru_cache(maxsize=1)
def available_lists() -> tuple[str, ...]:
    """Return the sorted names of all bundled lists (file stems of ``data/*.txt``)."""
    return tuple(
        sorted(
            entry.name[: -len(".txt")]
            for entry in _data_root().iterdir()
            if entry.is_file() and entry.name.endswith(".txt")
        )
    )


@functools.lru_cache(maxsize=64)
def _load(name: str) -> tuple[str, ...]:
    available = available_lists()
    if name not in available:
        raise ValueError(f"Unknown list {name!r}; available lists: {', '.join(available)}")
    text = _data_root().joinpath(f"{name}.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def load_list(name: str) -> list[str]:
    """Load the bundled list ``data/<name>.txt``.

    Args:
        name: The list name without the ``.txt`` suffix, e.g. ``"artists"``.

    Returns:
        A fresh list of the non-empty, stripped lines (safe to mutate; the file is cached).

    Raises:
        ValueError: If no list with that name is bundled; the message names the available lists.
    """
    return list(_load(name))


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"Unknown domain {domain!r}; valid domains: {', '.join(DOMAINS)}")


def templates(domain: str, *, held_out: bool = False) -> list[str]:
    """Return the prompt templates for ``domain``; each contains exactly one ``{}`` placeholder.

    Args:
        domain: One of :data:`DOMAINS`.
        held_out: If true, return the evaluation templates, which are disjoint from the
            training templates.

    Raises:
        ValueError: If ``domain`` is not one of :data:`DOMAINS`.
    """
    _check_domain(domain)
    prefix = "eval_templates" if held_out else "templates"
    return load_list(f"{prefix}_{domain}")


def concept_pool(domain: str) -> list[str]:
    """Return the candidate concept pool for ``domain``.

    ``"names"`` maps to public figures, ``"styles"`` to artists and ``"explicit"`` to benign
    everyday sentences.

    Raises:
        ValueError: If ``domain`` is not one of :data:`DOMAINS`.
    """
    _check_domain(domain)
    return load_list(_CONCEPT_POOLS[domain])


def general_words(domain: str) -> list[str]:
    """Return generic words/phrases for ``domain`` (e.g. "a person", "a painting").

    Raises:
        ValueError: If ``domain`` is not one of :data:`DOMAINS`.
    """
    _check_domain(domain)
    return load_list(_GENERAL_WORDS[domain])
