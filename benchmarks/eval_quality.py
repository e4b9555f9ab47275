"""Erasure-quality figures on the semantic testbed (``tiny_pipeline("sd-semantic")``).

Trains one painter eraser (styles preset) and one public-figure eraser (names preset) with the
default presets, and without the adversarial stages two ways (``adversaries=0``: the same stage
schedule without the attack phases; ``stages=1``: stage 0 alone), and evaluates each with
:func:`cpe_adapter.evaluation.evaluate` (``--attack-prompts`` held-out prompts attacked per concept):

- erased: the concept on the held-out templates, plus two paraphrases;
- retained "neighbours": the 5 pool concepts most similar to it (the training's own similarity);
- retained "unrelated": everyday prompts, used whole (template ``"{}"``).

Writes ``quality.md`` (the table in docs/evaluation.md), ``quality.json`` and one full report per run
into ``--out``. Trained adapters are kept in ``--cache`` so that re-running only re-evaluates.

    python benchmarks/eval_quality.py --out benchmarks/results/eval_quality
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

from cpe_adapter import CPEAdapter
from cpe_adapter.evaluation import evaluate
from cpe_adapter.loaders import load_cpe_adapter, unload_cpe_adapter
from cpe_adapter.pools import concept_pool, general_words
from cpe_adapter.testing import tiny_pipeline
from cpe_adapter.training import train_cpe
from cpe_adapter.training_data import similar_concepts

CASES = [
    ("Van Gogh", "styles", ["Vincent van Gogh", "Gogh"]),
    ("Tom Hanks", "names", ["Thomas Hanks", "Hanks"]),
]
VARIANTS = {
    "adversarial (default)": {},
    "no adversary, same schedule (adversaries=0)": {"adversaries": 0},
    "no adversary (stages=1)": {"stages": 1},
}
UNRELATED = [
    "a red car parked on a quiet street",
    "a bowl of fruit on a wooden table",
    "a dog running on the beach",
    "a snowy mountain at sunrise",
    "a cup of coffee next to a laptop",
]
FLOORS = {
    "erase_score": (">=", 0.15),
    "image_erase_shift": (">=", 0.5),
    "retain_drift_neighbours": ("<=", 0.01),
    "image_retain_shift_neighbours": ("<=", 0.02),
    "retain_drift_unrelated": ("<=", 0.005),
    "image_retain_shift_unrelated": ("<=", 0.01),
}
COLUMNS = [
    ("erase_score", "erase"),
    ("paraphrase_erase_score", "paraphrase erase"),
    ("retain_drift_neighbours", "drift neighbours"),
    ("retain_drift_unrelated", "drift unrelated"),
    ("image_erase_shift", "image erase shift"),
    ("image_retain_shift_neighbours", "image retain shift neighbours"),
    ("image_retain_shift_unrelated", "image retain shift unrelated"),
    ("attack_recovery", "prompt-attack recovery"),
    ("embedding_attack_recovery", "embedding-attack recovery (eps 0.1)"),
]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _adapter(
    pipe: Any,
    concept: str,
    preset: str,
    overrides: dict,
    cache: Path,
    steps: int | None,
    anchors: list[str] | None,
    seed: int = 0,
) -> CPEAdapter:
    tag = f"{_slug(json.dumps(overrides)) or 'default'}-{steps or 'full'}-{len(anchors) if anchors else 'all'}"
    tag += f"-seed{seed}" if seed else ""
    folder = cache / f"{_slug(concept)}-{preset}-{tag}"
    if (folder / "cpe_adapter.safetensors").exists():
        return CPEAdapter.from_pretrained(folder)
    started = time.perf_counter()
    adapter = train_cpe(
        pipe, concept, preset=preset, seed=seed, steps=steps, anchors=anchors, progress=True, **overrides
    )
    print(f"trained {concept!r} ({preset}, {overrides or 'default'}) in {time.perf_counter() - started:.0f} s")
    adapter.save_pretrained(folder)
    return adapter


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    pipe = tiny_pipeline("sd-semantic")
    out, cache = Path(args.out), Path(args.cache)
    rows = []
    seeds = [int(seed) for seed in args.seeds.split(",")]
    for concept, preset, paraphrases in CASES:
        if args.concepts and concept not in args.concepts.split(","):
            continue
        neighbours = similar_concepts(pipe, concept, concept_pool(preset), 5)
        anchors = None
        if args.anchors:
            # a reduced anchor set: the first general words and the most similar pool concepts
            half = args.anchors // 2
            anchors = general_words(preset)[:half] + similar_concepts(pipe, concept, concept_pool(preset), half)
        variants = dict(VARIANTS)
        if getattr(args, "prompt_searches", 0):
            searches = {"prompt_searches": args.prompt_searches, "prompt_search_budget": 128}
            variants[f"discrete searches (prompt_searches={args.prompt_searches}, budget 128)"] = searches
        for seed, (variant, overrides) in ((s, v) for s in seeds for v in variants.items()):
            adapter = _adapter(pipe, concept, preset, overrides, cache, args.steps, anchors, seed)
            load_cpe_adapter(pipe, adapter, adapter_name="eraser")
            try:
                started = time.perf_counter()
                main = evaluate(
                    pipe,
                    [concept],
                    neighbours,
                    paraphrases={concept: paraphrases},
                    images=True,
                    image_prompts=args.image_prompts,
                    image_steps=args.image_steps,
                    attack_budget=args.attack_budget,
                    attack_prompts=args.attack_prompts,
                    seed=0,
                )
                unrelated = evaluate(
                    pipe,
                    [concept],
                    UNRELATED,
                    templates=["{}"],
                    attack=False,
                    images=True,
                    image_prompts=1,
                    image_steps=args.image_steps,
                    seed=0,
                )
                seconds = time.perf_counter() - started
            finally:
                unload_cpe_adapter(pipe, "eraser")
            main.save(out / f"{_slug(concept)}-{_slug(variant)}{f'-seed{seed}' if seed else ''}")
            figures, other = main.figures, unrelated.figures
            rows.append(
                {
                    "concept": concept,
                    "preset": preset,
                    "variant": variant if len(seeds) == 1 else f"{variant}, seed {seed}",
                    "seed": seed,
                    "neighbours": neighbours,
                    "erase_score": figures.get("erase_score"),
                    "paraphrase_erase_score": figures.get("paraphrase_erase_score"),
                    "retain_drift_neighbours": figures.get("retain_drift"),
                    "retain_drift_unrelated": other.get("retain_drift"),
                    "image_erase_shift": figures.get("image_erase_shift"),
                    "image_retain_shift_neighbours": figures.get("image_retain_shift"),
                    "image_retain_shift_unrelated": other.get("image_retain_shift"),
                    "attack_recovery": figures.get("attack_recovery"),
                    "attack_best_prompt": figures.get("attack_best_prompt"),
                    "embedding_attack_recovery": figures.get("embedding_attack_recovery"),
                    "eval_seconds": round(seconds, 1),
                }
            )
            print(json.dumps(rows[-1], indent=1))
    return rows


def _check(name: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.4f}"
    if name in FLOORS:
        op, bound = FLOORS[name]
        ok = value >= bound if op == ">=" else value <= bound
        text += "" if ok else " ✗"
    return text


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        "| concept (preset) | variant | " + " | ".join(label for _, label in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        cells = [_check(key, row[key]) for key, _ in COLUMNS]
        lines.append(f"| {row['concept']} ({row['preset']}) | {row['variant']} | " + " | ".join(cells) + " |")
    lines += ["", "✗ = misses the issue's floor: " + ", ".join(f"{k} {op} {v}" for k, (op, v) in FLOORS.items())]
    if len({row.get("seed", 0) for row in rows}) > 1:
        lines += ["", *seed_summary(rows)]
    per_concept = {r["concept"]: r for r in rows}.values()
    lines += ["", "Neighbours: " + "; ".join(f"{r['concept']}: {', '.join(r['neighbours'])}" for r in per_concept)]
    lines += ["", "Best attack prompts: " + "; ".join(f"{r['concept']} / {r['variant']}: `{r['attack_best_prompt']}`"
                                                   for r in rows)]  # fmt: skip
    return "\n".join(lines) + "\n"


def seed_summary(rows: list[dict[str, Any]]) -> list[str]:
    """Per concept and variant, the mean (min-max) over training seeds of the figures that vary most."""
    keys = [("erase_score", "erase"), ("attack_recovery", "prompt-attack recovery")]
    keys += [("embedding_attack_recovery", "embedding-attack recovery")]
    lines = [
        "Over training seeds, mean (min-max):",
        "",
        "| concept | variant | seeds | " + " | ".join(label for _, label in keys) + " |",
        "|---|---|---|" + "---|" * len(keys),
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["concept"], row["variant"].rsplit(", seed ", 1)[0]), []).append(row)
    for (concept, variant), group in groups.items():
        cells = []
        for key, _ in keys:
            values = [row[key] for row in group if row[key] is not None]
            cells.append(f"{sum(values) / len(values):.4f} ({min(values):.4f}-{max(values):.4f})" if values else "n/a")
        seeds = ",".join(str(row.get("seed", 0)) for row in group)
        lines.append(f"| {concept} | {variant} | {seeds} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/eval_quality")
    parser.add_argument("--cache", default="benchmarks/results/eval_quality/adapters")
    parser.add_argument("--steps", type=int, default=None, help="total erase iterations (default: the preset's)")
    parser.add_argument(
        "--anchors",
        type=int,
        default=0,
        help="train with N anchors (N/2 general words + N/2 most similar concepts) instead of the preset's ~100",
    )
    parser.add_argument("--attack-budget", type=int, default=256)
    parser.add_argument("--attack-prompts", type=int, default=1, help="held-out prompts attacked per concept")
    parser.add_argument("--image-prompts", type=int, default=2)
    parser.add_argument("--image-steps", type=int, default=4)
    parser.add_argument("--seeds", default="0", help="training seeds, comma-separated (each variant per seed)")
    parser.add_argument("--concepts", default="", help="only these concepts, comma-separated (default: all)")
    parser.add_argument(
        "--prompt-searches",
        type=int,
        default=0,
        help="also train a variant with N discrete searches per adversarial stage (128 candidates each)",
    )
    parser.add_argument(
        "--from-json", nargs="+", type=Path, default=None, help="write the tables from earlier runs' quality.json"
    )
    args = parser.parse_args()
    if args.from_json:
        rows = [row for path in args.from_json for row in json.loads(path.read_text(encoding="utf-8"))]
    else:
        rows = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    defaults = {
        "steps": None,
        "anchors": 0,
        "attack_budget": 256,
        "attack_prompts": 1,
        "image_prompts": 2,
        "image_steps": 4,
        "seeds": "0",
        "concepts": "",
        "prompt_searches": 0,
    }
    command = "python benchmarks/eval_quality.py" + "".join(
        f" --{key.replace('_', '-')} {json.dumps(getattr(args, key)) if key == 'concepts' else getattr(args, key)}"
        for key, value in defaults.items()
        if getattr(args, key) != value
    )
    text = markdown(rows, command)
    (out / "quality.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
