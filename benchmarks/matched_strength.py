"""Prompt-attack recovery of the adversarial and the ``stages=1`` erasers at the same erase strength.

The prompt attack's recovery is a fraction of the erased gap ``d_0 = ||P'(E_t) - P(E_t)||``, so an
eraser that moves the concept further counts more of the near misses it leaves alone (prompts whose
*original* K/V lie within ``d_0`` of the concept's) as recovery. To compare the adversarial stages
with their absence without that confound, each pair of erasers of one training seed is also
evaluated at matched strength: the adapter scale of one is set so that its erase score equals the
other's (the residual, hence the erase score, is linear in the scale; the gate is not scaled).

Uses the adapters that ``eval_quality.py`` trained (same cache; missing ones are trained) and its
evaluation settings (held-out templates, 5 nearest neighbours, paraphrases, attack budget 256).

    python benchmarks/matched_strength.py --seeds 0,1,2,3,4,5,6 --out benchmarks/results/matched
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import eval_quality

from cpe_adapter.evaluation import evaluate
from cpe_adapter.loaders import load_cpe_adapter, set_cpe_adapters, unload_cpe_adapter
from cpe_adapter.pools import concept_pool
from cpe_adapter.testing import tiny_pipeline
from cpe_adapter.training_data import similar_concepts

FIGURES = ("erase_score", "attack_recovery", "embedding_attack_recovery", "retain_drift")


def _figures(
    pipe: Any, adapter: Any, scale: float, case: tuple, neighbours: list[str], attack: bool, prompts: int
) -> dict:
    concept, _, paraphrases = case
    load_cpe_adapter(pipe, adapter, adapter_name="eraser")
    try:
        set_cpe_adapters(pipe, ["eraser"], scales=[scale])
        report = evaluate(
            pipe,
            [concept],
            neighbours,
            paraphrases={concept: paraphrases},
            images=False,
            attack=attack,
            attack_budget=256,
            attack_prompts=prompts,
            seed=0,
        )
    finally:
        unload_cpe_adapter(pipe, "eraser")
    return {"scale": scale, **{k: report.figures.get(k) for k in FIGURES}}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    pipe = tiny_pipeline("sd-semantic")
    case = next(c for c in eval_quality.CASES if c[0] == args.concept)
    concept, preset, _ = case
    neighbours = similar_concepts(pipe, concept, concept_pool(preset), 5)
    cache = Path(args.cache)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        adversarial = eval_quality._adapter(pipe, concept, preset, {}, cache, None, None, seed)
        single = eval_quality._adapter(pipe, concept, preset, {"stages": 1}, cache, None, None, seed)
        strength = {
            name: _figures(pipe, adapter, 1.0, case, neighbours, False, args.attack_prompts)["erase_score"]
            for name, adapter in (("adversarial", adversarial), ("stages=1", single))
        }
        ratio = strength["stages=1"] / strength["adversarial"]
        row: dict[str, Any] = {"concept": concept, "seed": seed}
        for label, adapter, scale in (
            ("adversarial", adversarial, 1.0),
            ("stages=1", single, 1.0),
            ("adversarial scaled to stages=1", adversarial, ratio),
            ("stages=1 scaled to adversarial", single, 1.0 / ratio),
        ):
            row[label] = _figures(pipe, adapter, scale, case, neighbours, True, args.attack_prompts)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    labels = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    lines = [
        "| seed | " + " | ".join(f"{label}: prompt-attack recovery (erase)" for label in labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for row in rows:
        cells = [f"{row[k]['attack_recovery']:.3f} ({row[k]['erase_score']:.3f})" for k in labels]
        lines.append(f"| {row['seed']} | " + " | ".join(cells) + " |")
    means = [statistics.mean(row[k]["attack_recovery"] for row in rows) for k in labels]
    lines.append("| mean | " + " | ".join(f"{m:.4f}" for m in means) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="Tom Hanks", choices=[c[0] for c in eval_quality.CASES])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--attack-prompts", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/matched")
    parser.add_argument("--cache", default="benchmarks/results/eval_quality/adapters")
    args = parser.parse_args()
    rows = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "matched.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    text = markdown(rows)
    (out / "matched.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
