"""Writing an :class:`~cpe_adapter.evaluation.EvalReport` to disk: JSON, Markdown and PNG plots.

The plots need matplotlib (the ``[eval]`` extra: ``pip install cpe-adapter[eval]``); it is imported
only when plots are written and drawn on an off-screen Agg canvas, never touching pyplot's global
state, so it works on headless machines and inside notebooks alike.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .serialization import atomic_write_bytes

if TYPE_CHECKING:
    from .evaluation import EvalReport

__all__ = ["MissingExtraError", "render_markdown", "write_report"]

_LABELS = {
    "erase_score": "erase score",
    "paraphrase_erase_score": "paraphrase erase score",
    "retain_drift": "retain drift",
    "attack_recovery": "prompt-attack recovery",
    "embedding_attack_recovery": "embedding-attack recovery",
    "image_erase_shift": "image erase shift",
    "image_retain_shift": "image retain shift",
}
_BETTER = {
    "erase_score": "higher (1 = target reached)",
    "paraphrase_erase_score": "higher",
    "retain_drift": "lower (0 = untouched)",
    "attack_recovery": "lower (0 = attack gains nothing)",
    "embedding_attack_recovery": "lower",
    "image_erase_shift": "higher (1 = one concept's worth)",
    "image_retain_shift": "lower",
}


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency of the evaluation tools is not installed."""


def require(module: str, purpose: str) -> Any:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``pip install cpe-adapter[eval]``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{purpose} needs the optional package {module.split('.')[0]!r}: pip install 'cpe-adapter[eval]'",
            name=module,
        ) from err


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: EvalReport) -> str:
    """Markdown summary: overall figures, a per-concept table, attack prompts and settings."""
    from .evaluation import FIGURES

    lines = ["# CPE evaluation report", ""]
    warnings = report.warnings()
    if warnings:
        lines += ["## Warnings", "", *[f"- {w}" for w in warnings], ""]
    lines += ["## Overall", "", "| figure | value | better |", "|---|---|---|"]
    for name in FIGURES:
        if name in report.figures:
            value = _fmt(report.figures[name])
            if name == "embedding_attack_recovery" and "embedding_attack_epsilon" in report.figures:
                value += f" (eps = {report.figures['embedding_attack_epsilon']})"
            lines.append(f"| {_LABELS[name]} | {value} | {_BETTER[name]} |")
    shown = [n for n in FIGURES if any(n in row for row in report.per_concept.values())]
    lines += ["", "## Per concept", "", "| concept | role | " + " | ".join(_LABELS[n] for n in shown) + " |"]
    lines.append("|---|---|" + "---|" * len(shown))
    for concept, row in report.per_concept.items():
        cells = [_fmt(row[n]) if n in row else "" for n in shown]
        lines.append(f"| {_cell(concept)} | {row['role']} | " + " | ".join(cells) + " |")
    attacked = {c: r["attack_best_prompt"] for c, r in report.per_concept.items() if r.get("attack_best_prompt")}
    if attacked:
        lines += ["", "## Best attack prompts", "", "| concept | prompt |", "|---|---|"]
        lines += [f"| {_cell(c)} | `{_cell(p)}` |" for c, p in attacked.items()]
    active = report.adapters.get("active", [])
    lines += ["", "## Settings", ""]
    lines.append(f"- active adapters: {', '.join(active) if active else 'none'}")
    if report.adapters.get("enabled") is False:
        lines.append("- adapters were disabled: every figure compares the unerased pipeline with itself")
    for key in ("seed", "attack_budget", "embedding_epsilon", "embedding_steps", "image_steps", "processes"):
        if key in report.settings:
            lines.append(f"- {key}: {report.settings[key]}")
    lines.append(f"- prompts evaluated: {len(report.records)}")
    return "\n".join(lines) + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "concept"


def _bar_chart(report: EvalReport, path: Path) -> None:
    """Grouped bars per concept: one panel for erased concepts, one for retained ones."""
    from .evaluation import FIGURES

    require("matplotlib", "Writing evaluation plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = []
    for role in ("erased", "retained"):
        concepts = [c for c, row in report.per_concept.items() if row["role"] == role]
        names = [n for n in FIGURES if any(report.per_concept[c].get(n) is not None for c in concepts)]
        if concepts and names:
            panels.append((role, concepts, names))
    figure = Figure(figsize=(max(6.0, 1.6 * max((len(p[1]) for p in panels), default=1)), 3.6 * max(1, len(panels))))
    FigureCanvasAgg(figure)
    for index, (role, concepts, names) in enumerate(panels):
        axes = figure.add_subplot(len(panels), 1, index + 1)
        width = 0.8 / len(names)
        positions = np.arange(len(concepts))
        for k, name in enumerate(names):
            heights = [report.per_concept[c].get(name) for c in concepts]
            axes.bar(positions + k * width, [np.nan if h is None else h for h in heights], width, label=_LABELS[name])
        axes.set_xticks(positions + width * (len(names) - 1) / 2)
        axes.set_xticklabels(concepts, fontsize=8)
        axes.axhline(0.0, color="black", linewidth=0.5)
        axes.set_title(f"{role} concepts", fontsize=9)
        axes.legend(fontsize=7)
    if not panels:
        figure.text(0.5, 0.5, "no figures", ha="center")
    figure.suptitle("CPE evaluation per concept", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _image_grid(concept: str, examples: list[Any], path: Path) -> None:
    require("matplotlib", "Writing evaluation plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    has_neutral = any(e.neutral is not None for e in examples)
    columns = ["before (unerased)", "after (as is)"] + (["neutral prompt, unerased"] if has_neutral else [])
    figure = Figure(figsize=(2.6 * len(columns), 2.6 * len(examples) + 0.4))
    FigureCanvasAgg(figure)
    for row, example in enumerate(examples):
        images = [example.before, example.after] + ([example.neutral] if has_neutral else [])
        for col, image in enumerate(images):
            axes = figure.add_subplot(len(examples), len(columns), row * len(columns) + col + 1)
            axes.axis("off")
            if image is not None:
                axes.imshow(np.clip(image, 0.0, 1.0))
            title = columns[col] if row == 0 else ""
            axes.set_title(f"{title}\n{example.prompt[:40]}" if col == 0 else title, fontsize=7)
    figure.suptitle(f"{concept}: fixed seeds", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def write_report(report: EvalReport, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``per_concept.png`` and ``images_<concept>.png``.

    Returns the written paths by name. JSON and Markdown are written atomically; the plots need
    matplotlib and raise :class:`MissingExtraError` (after the text files are written) without it.
    Plots of an earlier report in the same folder are removed first, so every plot there belongs to
    this report.
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [folder / "per_concept.png", *folder.glob("images_*.png")]:
        stale.unlink(missing_ok=True)
    paths = {"json": folder / "report.json", "markdown": folder / "report.md"}
    atomic_write_bytes(paths["json"], (report.to_json() + "\n").encode("utf-8"))
    atomic_write_bytes(paths["markdown"], report.to_markdown().encode("utf-8"))
    paths["per_concept_plot"] = folder / "per_concept.png"
    _bar_chart(report, paths["per_concept_plot"])
    used: set[str] = set()
    for concept, examples in report.images.items():
        slug = _slug(concept)
        while slug in used:
            slug += "_"
        used.add(slug)
        key = f"images_{slug}"
        paths[key] = folder / f"{key}.png"
        _image_grid(concept, examples, paths[key])
    return paths
